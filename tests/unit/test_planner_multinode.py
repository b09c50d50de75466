"""Replicas bigger than a node: tensor parallel within nodes × pipeline parallel across them."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from gpufleet.planner import Deployment, Placement, PlanSettings, ReplicaKey, plan
from gpufleet.spec import API_VERSION, Inventory

GiB = 1 << 30
#: As the operator plans on Kubernetes: one engine per whole GPU.
CLUSTER = PlanSettings(max_replicas_per_gpu=1, defragment=False, optimise_max_replicas=0)
EIGHT = tuple(range(8))


def inventory(*nodes: tuple[str, int] | tuple[str, int, str]) -> Inventory:
    return Inventory.model_validate(
        {
            "apiVersion": API_VERSION,
            "kind": "Inventory",
            "metadata": {"name": "t"},
            "spec": {
                "nodes": [
                    {
                        "name": n[0],
                        "gpus": [{"type": n[2] if len(n) > 2 else "H100", "count": n[1]}],
                    }
                    for n in nodes
                ]
            },
        }
    )


def big(name: str = "big", replicas: int = 1, gpus: int = 16, **kw: Any) -> Deployment:
    """A model whose spec fixes ``gpus`` GPUs (resources.gpus): one degree, 40 GiB each."""
    return Deployment(name=name, replicas=replicas, memory_per_gpu={gpus: 40 * GiB}, **kw)


def small(name: str, replicas: int = 1, **kw: Any) -> Deployment:
    return Deployment(name=name, replicas=replicas, memory_per_gpu={1: 30 * GiB}, **kw)


def test_a_16_gpu_model_on_two_8_gpu_nodes_runs_tp_8_by_pp_2() -> None:
    result = plan(inventory(("a", 8), ("b", 8)), [big()], settings=CLUSTER)
    assert not result.unplaced
    (p,) = result.placements
    assert (p.tp, p.pp, p.gpu_count) == (8, 2, 16)
    assert p.node == "a" and p.gpus == EIGHT
    assert p.workers == (("b", EIGHT),)
    assert p.nodes == ("a", "b") and p.stages == (("a", EIGHT), ("b", EIGHT))
    assert p.gpu_type == "H100" and p.memory_per_gpu == 40 * GiB
    assert p.where() == "a/gpu-0,1,2,3,4,5,6,7 + b/gpu-0,1,2,3,4,5,6,7"
    assert result.gpus_used == 16


def test_on_one_node_it_is_not_placed_and_the_reason_says_what_is_missing() -> None:
    result = plan(inventory(("a", 8)), [big()], settings=CLUSTER)
    assert not result.placements
    (u,) = result.unplaced
    assert "TP 8 × PP 2 needs 2 nodes with 8 free H100 each (40.0 GiB per GPU); have 1" in u.reason
    assert "on one node" not in u.reason  # no node could ever hold 16: not the way to run it


def test_two_replicas_need_four_nodes() -> None:
    four = plan(inventory(*((f"n{i}", 8) for i in range(4))), [big(replicas=2)], settings=CLUSTER)
    assert not four.unplaced
    spans = [set(p.nodes) for p in four.placements]
    assert [len(s) for s in spans] == [2, 2] and not spans[0] & spans[1]
    three = plan(inventory(*((f"n{i}", 8) for i in range(3))), [big(replicas=2)], settings=CLUSTER)
    assert len(three.placements) == 1
    (u,) = three.unplaced
    assert u.replica == ReplicaKey("big", 1) and "have 1" in u.reason


def test_mixed_with_single_gpu_models() -> None:
    fleet = inventory(("a", 8), ("b", 8), ("c", 8))
    result = plan(fleet, [big(), small("chat", replicas=4)], settings=CLUSTER)
    assert not result.unplaced
    (p,) = [p for p in result.placements if p.replica.deployment == "big"]
    chats = [p for p in result.placements if p.replica.deployment == "chat"]
    assert p.pp == 2 and len(chats) == 4
    used = {(node, g) for node, gpus in p.stages for g in gpus}
    assert not used & {(c.node, c.gpus[0]) for c in chats}  # one engine per GPU
    # Single-GPU replicas running on two nodes first: the big one has one whole node left.
    running = plan(fleet, [small("chat", replicas=2)], settings=CLUSTER).placements
    assert {c.node for c in running} == {"a", "b"}  # spread
    later = plan(fleet, [big(), small("chat", replicas=2)], running, settings=CLUSTER)
    assert [p for p in later.placements if p.replica.deployment == "chat"] == list(running)
    assert not later.evictions
    (u,) = later.unplaced
    assert "needs 2 nodes with 8 free H100 each" in u.reason and "have 1" in u.reason


def test_a_higher_priority_multi_node_model_preempts_lower_ones_across_nodes() -> None:
    fleet = inventory(("a", 8), ("b", 8), ("c", 8))
    batch = small("batch", replicas=3, priority=50, priority_class="batch")
    running = plan(fleet, [batch], settings=CLUSTER).placements
    assert {p.node for p in running} == {"a", "b", "c"}
    result = plan(fleet, [batch, big()], running, settings=CLUSTER)
    (p,) = [p for p in result.placements if p.replica.deployment == "big"]
    assert p.pp == 2
    evicted = {str(e.placement.replica) for e in result.evictions}
    assert len(evicted) == 2  # the two on the nodes the big one takes; the third stays
    assert all("preempted by big#0 (priority 100 > 50)" in e.reason for e in result.evictions)
    # An equal priority never preempts: the same model at batch priority stays out.
    equal = plan(fleet, [batch, big(priority=50)], running, settings=CLUSTER)
    assert not equal.evictions and [str(u.replica) for u in equal.unplaced] == ["big#0"]


def test_a_model_that_fits_one_node_is_never_split_across_nodes() -> None:
    """Fragmentation is no reason to trade NVLink for the network: TP 4 on two half-free
    4-GPU nodes stays unplaced, with the one-node reason."""
    fleet = inventory(("a", 4), ("b", 4))
    running = plan(fleet, [small("chat", replicas=4)], settings=CLUSTER).placements
    result = plan(fleet, [small("chat", replicas=4), big("tp4", gpus=4)], running, settings=CLUSTER)
    (u,) = result.unplaced
    assert "TP 4 needs 4 GPUs with 40.0 GiB free each on one node" in u.reason
    assert "PP" not in u.reason


def test_tp_is_a_node_size_that_divides_the_degree() -> None:
    # 4-GPU nodes: 16 GPUs run TP 4 × PP 4.
    result = plan(inventory(*((f"n{i}", 4) for i in range(4))), [big()], settings=CLUSTER)
    (p,) = result.placements
    assert (p.tp, p.pp) == (4, 4) and p.nodes == ("n0", "n1", "n2", "n3")
    # No node size divides 12 GPUs on 8-GPU nodes.
    (u,) = plan(inventory(("a", 8), ("b", 8)), [big(gpus=12)], settings=CLUSTER).unplaced
    assert "more than any node has (the largest has 8)" in u.reason
    # One GPU type across the group: an H100 node and an A100 node are not one group.
    mixed = inventory(("a", 8), ("b", 8, "A100-80GB"))
    (u,) = plan(mixed, [big()], settings=CLUSTER).unplaced
    assert "needs 2 nodes with 8 free H100 each" in u.reason and "have 1" in u.reason


def test_placements_read_back_from_json_are_the_same_and_stay_put() -> None:
    fleet = inventory(("a", 8), ("b", 8), ("c", 8))
    first = plan(fleet, [big(), small("chat", replicas=2)], settings=CLUSTER)
    # As the operator keeps them on pods: dataclasses.asdict → JSON → Placement(**data).
    back = []
    for p in first.placements:
        data = json.loads(json.dumps(dataclasses.asdict(p)))
        data["replica"] = ReplicaKey(**data["replica"])
        back.append(Placement(**data))
    assert back == list(first.placements) and {hash(p) for p in back}
    again = plan(fleet, [big(), small("chat", replicas=2)], back, settings=CLUSTER)
    assert again.placements == first.placements and not again.evictions
    # A placement written before multi-node ones existed reads back as one node's.
    old = {k: v for k, v in dataclasses.asdict(first.placements[-1]).items() if k != "workers"}
    old["replica"] = ReplicaKey(**old["replica"])
    assert Placement(**old).pp == 1


def test_a_running_multi_node_placement_that_lost_a_node_is_placed_again() -> None:
    (p,) = plan(inventory(("a", 8), ("b", 8)), [big()], settings=CLUSTER).placements
    result = plan(inventory(("a", 8), ("c", 8)), [big()], [p], settings=CLUSTER)
    (q,) = result.placements
    assert q.nodes == ("a", "c")


def test_required_spread_keeps_replicas_on_disjoint_nodes() -> None:
    fleet = inventory(*((f"n{i}", 16) for i in range(2)), *((f"m{i}", 8) for i in range(2)))
    result = plan(fleet, [big(replicas=2, gpus=32, spread="required")], settings=CLUSTER)
    assert len(result.placements) == 1 and len(result.unplaced) == 1
    (p,) = result.placements
    assert (p.tp, p.pp) == (16, 2)
