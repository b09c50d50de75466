"""``kind: Inventory``: the machines a plan is made for, written by hand or by discovery.

A node lists its GPUs in groups of one type. A group may be split into MIG instances (one
layout, applied to each GPU of the group) or shared by time-slicing (N replicas per card, no
memory isolation — how the NVIDIA device plugin advertises it). Whether a GPU type and its MIG
layout exist is checked against the catalog by ``gpufleet.hardware``, which this layer may not
import; here only the shape is checked.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator
from pydantic_core import PydanticCustomError

from gpufleet.errors import SpecError
from gpufleet.spec.io import read_documents, validate
from gpufleet.spec.resources import ByteQuantity, DnsName, Metadata, _Resource

__all__ = ["GpuGroup", "Inventory", "InventorySpec", "NodeSpec", "load_inventory_text"]


class GpuGroup(_Resource):
    type: str = Field(min_length=1)
    count: int = Field(default=1, ge=1, le=64)
    #: MIG instances on each GPU of the group, e.g. ["3g.40gb", "3g.40gb"]; empty: whole GPUs.
    mig_layout: list[str] = Field(default_factory=list)
    #: Time-slicing replicas per GPU (1: not shared).
    time_slicing: int = Field(default=1, ge=1, le=64)
    #: Memory per GPU when it differs from the catalog's figure (e.g. a PCIe variant).
    memory: ByteQuantity = None

    @model_validator(mode="after")
    def _exclusive(self) -> GpuGroup:
        if self.mig_layout and self.time_slicing > 1:
            raise PydanticCustomError(
                "gpufleet_path",
                "{path}: use either migLayout or timeSlicing on a GPU group, not both",
            )
        return self


class NodeSpec(_Resource):
    name: DnsName
    labels: dict[str, str] = Field(default_factory=dict)
    gpus: list[GpuGroup] = Field(default_factory=list)
    cpus: int = Field(default=0, ge=0)
    memory: ByteQuantity = None
    #: Models whose weights are already on this node's disk (placement prefers them).
    cached_models: list[str] = Field(default_factory=list)

    @property
    def gpu_count(self) -> int:
        return sum(g.count for g in self.gpus)


class InventorySpec(_Resource):
    nodes: list[NodeSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> InventorySpec:
        seen: set[str] = set()
        for node in self.nodes:
            if node.name in seen:
                raise PydanticCustomError(
                    "gpufleet_path",
                    "{path}.nodes: node name {name} appears twice",
                    {"name": repr(node.name)},
                )
            seen.add(node.name)
        return self


class Inventory(_Resource):
    api_version: Literal["gpufleet.io/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["Inventory"] = "Inventory"
    metadata: Metadata
    spec: InventorySpec

    @property
    def nodes(self) -> list[NodeSpec]:
        return self.spec.nodes


def load_inventory_text(text: str, *, filename: str = "<input>") -> Inventory:
    """Read one ``kind: Inventory`` document (shape only; see ``gpufleet.hardware``)."""
    docs = read_documents(text, filename, expected="Inventory")
    inventories = [d for d in docs if isinstance(d, dict) and d.get("kind") == "Inventory"]
    if len(inventories) != 1:
        raise SpecError(
            [
                f"{filename}: expected exactly one 'kind: Inventory' document (found {len(inventories)})"
            ]
        )
    try:
        return validate(Inventory, inventories[0])
    except SpecError as exc:
        raise SpecError([f"{filename}: {p}" for p in exc.problems]) from exc
