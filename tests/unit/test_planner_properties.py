"""Planner properties over random fleets and deployments (hypothesis)."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpufleet.hardware import CATALOG, mig_layout_problem
from gpufleet.planner import Deployment, Plan, PlanSettings, apply_relayouts, plan
from gpufleet.planner.fleet import Fleet
from gpufleet.planner.placer import Placer
from gpufleet.spec import API_VERSION, Inventory

GiB = 1 << 30
SETTINGS = PlanSettings(optimise_max_replicas=0)  # the heuristic alone; the MILP is tested apart

GPU_GROUP = st.one_of(
    st.fixed_dictionaries(
        {"type": st.sampled_from(["H100", "A100-80GB", "L4", "L40S"]), "count": st.integers(1, 4)}
    ),
    st.fixed_dictionaries(
        {
            "type": st.just("A100-80GB"),
            "count": st.integers(1, 2),
            "migLayout": st.sampled_from(
                [["3g.40gb", "3g.40gb"], ["4g.40gb", "3g.40gb"], ["1g.10gb"] * 7, ["2g.20gb"] * 3]
            ),
        }
    ),
    st.fixed_dictionaries(
        {"type": st.just("L4"), "count": st.integers(1, 2), "timeSlicing": st.integers(2, 4)}
    ),
)


@st.composite
def inventories(draw: st.DrawFn) -> Inventory:
    n = draw(st.integers(1, 3))
    nodes = [
        {
            "name": f"node-{i}",
            "gpus": draw(st.lists(GPU_GROUP, min_size=1, max_size=3)),
            "cachedModels": draw(st.sampled_from([[], ["d0"], ["d1", "d2"]])),
        }
        for i in range(n)
    ]
    return Inventory.model_validate(
        {
            "apiVersion": API_VERSION,
            "kind": "Inventory",
            "metadata": {"name": "p"},
            "spec": {"nodes": nodes},
        }
    )


@st.composite
def deployment_sets(draw: st.DrawFn) -> list[Deployment]:
    out = []
    for i in range(draw(st.integers(1, 6))):
        gib = draw(st.integers(2, 60))
        # 8 GPUs is more than many drawn nodes hold: TP within nodes × PP across them.
        degrees = draw(st.sampled_from([[1], [1, 2], [2], [1, 2, 4], [8], [4, 8]]))
        out.append(
            Deployment(
                name=f"d{i}",
                replicas=draw(st.integers(0, 3)),
                memory_per_gpu={tp: gib * GiB // tp for tp in degrees},
                priority=draw(st.sampled_from([10, 50, 100])),
                gpu_types=draw(st.sampled_from([(), ("H100",), ("L4", "A100-80GB")])),
                sharing=draw(st.sampled_from(["memory", "memory", "mig", "exclusive"])),
                spread=draw(st.sampled_from(["preferred", "required", "none"])),
            )
        )
    return out


def check_capacity(inventory: Inventory, result: Plan) -> None:
    fleet = Fleet(apply_relayouts(inventory, result), SETTINGS)
    for p in result.placements:
        if p.workers:
            # Across nodes only when no node of the type could hold it; equal stages, one type.
            assert len(set(p.nodes)) == p.pp and all(len(g) == p.tp for _, g in p.workers)
            assert p.gpu_type is not None and p.mig_instance is None
            assert p.gpu_count > max(fleet.node_sizes(p.gpu_type).values())
            for node, gpus in p.stages:
                assert len(set(gpus)) == len(gpus)
                for index in gpus:
                    gpu = fleet.gpu(node, index)
                    assert gpu is not None and gpu.type == p.gpu_type and gpu.layout is None
        if p.mig_instance is not None:
            gpu = fleet.gpu(p.node, p.gpus[0])
            assert gpu is not None and gpu.layout is not None
            assert gpu.layout[p.mig_instance] == p.mig_profile
            assert gpu.instance_owner[p.mig_instance] is None, "two replicas on one MIG instance"
            assert p.memory_per_gpu <= gpu.instance_memory[p.mig_instance]
        fleet.add(p)
    for gpu in fleet.gpus:
        assert gpu.used <= gpu.usable, f"{gpu.name} over-committed"
        assert len(gpu.replicas) <= gpu.max_replicas
        if gpu.layout is not None:
            assert not gpu.replicas, "whole-GPU replica on a MIG GPU"
            assert mig_layout_problem(CATALOG[gpu.type], gpu.layout) is None
        slices = [fleet.placements[r].time_slice for r in gpu.replicas]
        if gpu.time_slicing > 1:
            assert len(set(slices)) == len(slices)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(inventories(), deployment_sets())
def test_never_over_commits_and_mig_layouts_stay_valid(
    inventory: Inventory, deps: list[Deployment]
) -> None:
    result = plan(inventory, deps, settings=SETTINGS)
    check_capacity(inventory, result)
    assert len(result.placements) + len(result.unplaced) == sum(d.replicas for d in deps)
    assert all(u.reason for u in result.unplaced)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(inventories(), deployment_sets())
def test_higher_priority_is_never_left_out_while_lower_holds_its_room(
    inventory: Inventory, deps: list[Deployment]
) -> None:
    result = plan(inventory, deps, settings=SETTINGS)
    by_name = {d.name: d for d in deps}
    for u in result.unplaced:
        prio = by_name[u.replica.deployment].priority
        # Take away everything of lower priority: if the replica would then fit, the plan was wrong.
        fleet = Fleet(apply_relayouts(inventory, result), SETTINGS)
        for p in result.placements:
            if by_name[p.replica.deployment].priority >= prio:
                fleet.add(p, exclusive=by_name[p.replica.deployment].sharing == "exclusive")
        assert Placer(fleet, by_name).place(u.replica) is None, f"{u.replica} left out: {u.reason}"


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(inventories(), deployment_sets())
def test_plans_are_deterministic_and_replanning_moves_nothing(
    inventory: Inventory, deps: list[Deployment]
) -> None:
    first = plan(inventory, deps, settings=SETTINGS)
    assert plan(inventory, deps, settings=SETTINGS) == first
    applied = apply_relayouts(inventory, first)
    again = plan(applied, deps, first.placements, settings=SETTINGS)
    assert again.placements == first.placements
    assert not again.evictions and not again.migrations and not again.relayouts
    assert [u.replica for u in again.unplaced] == [u.replica for u in first.unplaced]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(inventories(), deployment_sets(), deployment_sets())
def test_properties_hold_when_replanning_over_running_replicas(
    inventory: Inventory, before: list[Deployment], after: list[Deployment]
) -> None:
    """What runs was planned for other deployments; the new plan must still be sound."""
    first = plan(inventory, before, settings=SETTINGS)
    applied = apply_relayouts(inventory, first)
    result = plan(applied, after, first.placements, settings=SETTINGS)
    check_capacity(applied, result)
    by_name = {d.name: d for d in after}
    for e in result.evictions:
        assert e.placement in first.placements and "preempted by" in e.reason
    for u in result.unplaced:
        prio = by_name[u.replica.deployment].priority
        fleet = Fleet(apply_relayouts(applied, result), SETTINGS)
        for p in result.placements:
            if by_name[p.replica.deployment].priority >= prio:
                fleet.add(p, exclusive=by_name[p.replica.deployment].sharing == "exclusive")
        assert Placer(fleet, by_name).place(u.replica) is None, f"{u.replica} left out: {u.reason}"
