"""What the inventory looks like once a plan's MIG re-layouts are carried out.

The controller (and the property tests) feed this back into the next ``plan``: a GPU that was
re-laid out keeps its new instances. Groups are split into single GPUs where needed, keeping
each GPU's index on its node.
"""

from __future__ import annotations

from typing import Any

from gpufleet.planner.model import Plan
from gpufleet.spec import Inventory

__all__ = ["apply_relayouts"]


def apply_relayouts(inventory: Inventory, plan: Plan) -> Inventory:
    if not plan.relayouts:
        return inventory
    layouts = {(r.node, r.gpu): list(r.layout) for r in plan.relayouts}
    doc = inventory.model_dump(by_alias=True)
    for node in doc["spec"]["nodes"]:
        gpus: list[dict[str, Any]] = []
        index = 0
        for group in node["gpus"]:
            for _ in range(group["count"]):
                single = {**group, "count": 1}
                if (node["name"], index) in layouts:
                    single["migLayout"] = layouts[(node["name"], index)]
                    single["timeSlicing"] = 1
                gpus.append(single)
                index += 1
        node["gpus"] = gpus
    return Inventory.model_validate(doc)
