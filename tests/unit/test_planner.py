"""Planner scenarios: the seed's idle GPUs, day and night, fragmentation, TP, MIG, time-slicing."""

from __future__ import annotations

from typing import Any

from gpufleet.planner import Deployment, Placement, Plan, PlanSettings, ReplicaKey, plan
from gpufleet.spec import API_VERSION, Inventory

GiB = 1 << 30
GB = 10**9


def inventory(*nodes: dict[str, Any]) -> Inventory:
    return Inventory.model_validate(
        {
            "apiVersion": API_VERSION,
            "kind": "Inventory",
            "metadata": {"name": "t"},
            "spec": {"nodes": list(nodes)},
        }
    )


def node(name: str, *gpus: dict[str, Any], cached: list[str] | None = None) -> dict[str, Any]:
    return {"name": name, "gpus": list(gpus), "cachedModels": cached or []}


def dep(name: str, gib: float, replicas: int = 1, **kw: Any) -> Deployment:
    memory = kw.pop("memory", {1: int(gib * GiB)})
    return Deployment(name=name, replicas=replicas, memory_per_gpu=memory, **kw)


def where(p: Plan) -> dict[str, str]:
    return {str(x.replica): x.where() for x in p.placements}


def test_small_models_share_a_card_instead_of_one_each() -> None:
    """The seed's complaint: one model per card leaves cards idle. Four 15 GiB models fit one H100."""
    fleet = inventory(node("node-1", {"type": "H100", "count": 4}))
    result = plan(fleet, [dep(f"m{i}", 15) for i in range(4)])
    assert result.gpus_used == 1 and not result.unplaced
    assert {p.gpus for p in result.placements} == {(0,)} or len(
        {p.gpus for p in result.placements}
    ) == 1
    assert sum(p.memory_fraction for p in result.placements) <= 0.9
    # The freed cards take a model that needs tensor parallelism: 140 GiB at TP 1, 36 GiB per GPU at TP 4... TP 2 fits 70.
    big = dep("llama-70b", 0, memory={1: 140 * GiB, 2: 70 * GB // 1, 4: 36 * GiB})
    result = plan(fleet, [dep(f"m{i}", 15) for i in range(4)] + [big], result.placements)
    (p70,) = [p for p in result.placements if p.replica.deployment == "llama-70b"]
    assert p70.tp == 2 and 0 not in p70.gpus
    assert not result.migrations and not result.evictions


def test_engine_gets_its_memory_share() -> None:
    result = plan(inventory(node("n", {"type": "H100"})), [dep("a", 20), dep("b", 30)])
    shares = {p.replica.deployment: p.memory_fraction for p in result.placements}
    assert shares == {"a": round(20 * GiB / (80 * GB), 4), "b": round(30 * GiB / (80 * GB), 4)}


def test_day_and_night() -> None:
    """Batch fills the GPUs by night; interactive demand by day preempts it; at night it returns."""
    fleet = inventory(node("n", {"type": "H100", "count": 2}))
    batch = dep("batch-finetune", 60, replicas=2, priority=50, priority_class="batch")
    night = plan(fleet, [batch, dep("chat", 60, replicas=0)])
    assert night.gpus_used == 2 and not night.unplaced
    day = plan(fleet, [batch, dep("chat", 60, replicas=2)], night.placements)
    assert {str(e.placement.replica) for e in day.evictions} == {
        "batch-finetune#0",
        "batch-finetune#1",
    }
    assert all(
        "preempted by chat#" in e.reason and "priority 100 > 50" in e.reason for e in day.evictions
    )
    assert {str(u.replica) for u in day.unplaced} == {"batch-finetune#0", "batch-finetune#1"}
    assert all(u.reason.startswith("preempted by chat#") for u in day.unplaced)
    assert sorted(str(p.replica) for p in day.placements) == ["chat#0", "chat#1"]
    back = plan(fleet, [batch, dep("chat", 60, replicas=0)], day.placements)
    assert sorted(str(p.replica) for p in back.placements) == [
        "batch-finetune#0",
        "batch-finetune#1",
    ]
    assert not back.evictions


def test_lower_priority_is_never_preempted_for_equal_priority() -> None:
    fleet = inventory(node("n", {"type": "H100"}))
    first = plan(fleet, [dep("a", 60)])
    second = plan(fleet, [dep("a", 60), dep("b", 60)], first.placements)
    assert not second.evictions and [str(u.replica) for u in second.unplaced] == ["b#0"]


def test_fragmented_cluster_is_consolidated() -> None:
    """Four GPUs each running one 20 GiB replica: three fit one card, so two GPUs are freed."""
    fleet = inventory(node("n", {"type": "H100", "count": 4}))
    deps = [dep(f"m{i}", 20) for i in range(4)]
    running = [
        Placement(
            ReplicaKey(f"m{i}", 0), "n", (i,), "H100", 20 * GiB, round(20 * GiB / (80 * GB), 4)
        )
        for i in range(4)
    ]
    result = plan(fleet, deps, running)
    assert result.gpus_used == 2
    assert len(result.migrations) == 2
    assert all(m.reason.startswith("frees n/gpu-") for m in result.migrations)
    again = plan(fleet, deps, result.placements)
    assert again.placements == result.placements and not again.migrations


def test_defragmentation_can_be_switched_off() -> None:
    fleet = inventory(node("n", {"type": "H100", "count": 2}))
    running = [
        Placement(
            ReplicaKey(f"m{i}", 0), "n", (i,), "H100", 20 * GiB, round(20 * GiB / (80 * GB), 4)
        )
        for i in range(2)
    ]
    result = plan(fleet, [dep("m0", 20), dep("m1", 20)], running, PlanSettings(defragment=False))
    assert result.gpus_used == 2 and not result.migrations


def test_running_replicas_stay_put() -> None:
    fleet = inventory(node("n", {"type": "H100", "count": 2}))
    first = plan(fleet, [dep("a", 30), dep("b", 30)])
    again = plan(fleet, [dep("a", 30), dep("b", 30), dep("c", 10)], first.placements)
    assert [p for p in again.placements if p.replica.deployment != "c"] == list(first.placements)


def test_tensor_parallel_picks_the_smallest_degree_that_fits() -> None:
    fleet = inventory(node("n", {"type": "A100-80GB", "count": 8}))
    big = dep("llama-70b", 0, memory={1: 150 * GiB, 2: 76 * GiB, 4: 40 * GiB, 8: 22 * GiB})
    (p,) = plan(fleet, [big]).placements
    assert p.tp == 4 and len(set(p.gpus)) == 4


def test_unplaced_reason_says_what_is_missing() -> None:
    fleet = inventory(node("node-3", {"type": "L4", "count": 2}))
    result = plan(fleet, [dep("big", 38, memory={1: 38 * GiB, 2: 22 * GiB}), dep("other", 1)])
    (u,) = [u for u in result.unplaced if u.replica.deployment == "big"]
    assert "needs 38.0 GiB per GPU at TP 1; largest free is" in u.reason
    assert "on node-3/gpu-" in u.reason
    assert (
        "TP 2 needs 2 GPUs with 22.0 GiB free each on one node; the best, node-3, has 0 GPUs "
        "with that much free" in u.reason
    )


def test_gpu_type_requirements_and_preferences() -> None:
    fleet = inventory(node("a", {"type": "L4"}), node("b", {"type": "H100"}))
    (p,) = plan(fleet, [dep("m", 10, gpu_types=("H100",))]).placements
    assert p.node == "b"
    (p,) = plan(fleet, [dep("m", 10, gpu_types=("L4", "H100"))]).placements
    assert p.node == "a"


def test_replicas_spread_across_nodes_and_prefer_cached_weights() -> None:
    fleet = inventory(node("a", {"type": "H100"}), node("b", {"type": "H100"}, cached=["m"]))
    result = plan(fleet, [dep("m", 10, replicas=2)])
    assert {p.node for p in result.placements} == {"a", "b"}
    (p,) = plan(fleet, [dep("m", 10)]).placements
    assert p.node == "b"


def test_required_spread_leaves_a_replica_unplaced_rather_than_doubling_up() -> None:
    fleet = inventory(node("a", {"type": "H100", "count": 2}))
    result = plan(fleet, [dep("m", 10, replicas=2, spread="required")])
    assert len(result.placements) == 1 and len(result.unplaced) == 1


def test_exclusive_replicas_get_whole_gpus() -> None:
    fleet = inventory(node("a", {"type": "H100", "count": 2}))
    result = plan(fleet, [dep("solo", 10, sharing="exclusive"), dep("x", 10)])
    solo = next(p for p in result.placements if p.replica.deployment == "solo")
    other = next(p for p in result.placements if p.replica.deployment == "x")
    assert solo.gpus != other.gpus and solo.memory_fraction == 0.9


def test_mig_instances_and_relayout() -> None:
    fleet = inventory(
        node("a", {"type": "A100-80GB", "migLayout": ["3g.40gb", "3g.40gb"]}),
        node("b", {"type": "H100"}),
    )
    result = plan(
        fleet,
        [dep("m", 30, replicas=2, sharing="mig"), dep("n", 8, sharing="mig", gpu_types=("H100",))],
    )
    ms = [p for p in result.placements if p.replica.deployment == "m"]
    assert {(p.node, p.mig_instance, p.mig_profile) for p in ms} == {
        ("a", 0, "3g.40gb"),
        ("a", 1, "3g.40gb"),
    }
    (relayout,) = result.relayouts
    assert (relayout.node, relayout.gpu) == ("b", 0)
    assert relayout.layout == ("1g.10gb",) * 7
    n = next(p for p in result.placements if p.replica.deployment == "n")
    assert n.mig_profile == "1g.10gb" and n.where() == "b/gpu-0/mig-0:1g.10gb"


def test_time_slices_are_numbered() -> None:
    fleet = inventory(node("a", {"type": "L4", "timeSlicing": 4}))
    result = plan(fleet, [dep(f"m{i}", 4) for i in range(4)])
    assert sorted(p.time_slice for p in result.placements) == [0, 1, 2, 3]
    assert result.gpus_used == 1


def test_cpu_replicas_use_node_memory() -> None:
    fleet = inventory({"name": "cpu-box", "memory": 8 * GiB, "gpus": []})
    result = plan(fleet, [dep("smol", 0, memory={0: 300 << 20}, replicas=2)])
    assert [p.where() for p in result.placements] == ["cpu-box/cpu", "cpu-box/cpu"]
    assert result.gpus_used == 0


def test_optimising_pass_beats_best_fit_on_a_tight_mix() -> None:
    """Best-fit decreasing needs 3 GPUs for these; 2 suffice (and the MILP finds them)."""
    usable = 0.9 * 80 * GB
    sizes = [
        0.42,
        0.42,
        0.32,
        0.32,
        0.26,
        0.26,
    ]  # of a GPU's usable memory: 2 × (0.42 + 0.32 + 0.26)
    fleet = inventory(node("a", {"type": "H100", "count": 4}))
    deps = [dep(f"m{i}", 0, memory={1: int(s * usable)}) for i, s in enumerate(sizes)]
    heuristic_only = plan(fleet, deps, settings=PlanSettings(optimise_max_replicas=0))
    best = plan(fleet, deps)
    assert best.gpus_used == 2 and best.solver.startswith("milp")
    assert heuristic_only.gpus_used == 3 and heuristic_only.solver == "heuristic"


def test_plans_are_deterministic() -> None:
    fleet = inventory(
        node("a", {"type": "H100", "count": 3}), node("b", {"type": "A100-80GB", "count": 2})
    )
    deps = [dep(f"m{i}", 5 + 7 * i, replicas=1 + i % 3) for i in range(6)]
    assert plan(fleet, deps) == plan(fleet, deps)


def test_a_pool_prefers_the_gpu_types_that_suit_its_phase() -> None:
    from gpufleet.planner import pool_preference

    types = ("H100", "L4", "L40S", "A30", "MI300X")  # the last is not in the catalog
    # Prefill: bf16 FLOP/s per dollar; decode: memory bandwidth per dollar.
    assert pool_preference(types, "prefill") == ("L40S", "H100", "A30", "L4", "MI300X")
    assert pool_preference(types, "decode") == ("A30", "H100", "L40S", "L4", "MI300X")
    assert pool_preference((), "decode") == ()
