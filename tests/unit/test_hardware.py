"""GPU catalog, inventory files and discovery (with a fake NVML: no GPU on this machine)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from gpufleet.errors import SpecError
from gpufleet.hardware import (
    CATALOG,
    accelerator,
    discover,
    load_inventory,
    mig_layout_problem,
    normalise_gpu_name,
    with_prices,
)

GB = 10**9


def test_catalog_holds_the_required_accelerators_with_data_sheet_figures() -> None:
    assert set(CATALOG) >= {
        "H200",
        "H100",
        "A100-80GB",
        "A100-40GB",
        "A30",
        "L40S",
        "L4",
        "T4",
        "cpu",
    }
    h100 = CATALOG["H100"]
    assert (h100.memory_bytes, h100.bandwidth_bytes_per_s, h100.bf16_flops) == (
        80 * GB,
        3.35e12,
        989e12,
    )
    assert [p.name for p in h100.mig_profiles] == [
        "1g.10gb",
        "1g.20gb",
        "2g.20gb",
        "3g.40gb",
        "4g.40gb",
        "7g.80gb",
    ]
    assert CATALOG["H200"].mig_profile("3g.71gb") is not None
    assert [p.max_count for p in CATALOG["A30"].mig_profiles] == [4, 2, 1]
    assert not CATALOG["L40S"].supports_mig and not CATALOG["T4"].supports_mig
    assert all(a.price_per_hour > 0 for a in CATALOG.values())


@pytest.mark.parametrize(
    ("raw", "name"),
    [
        ("NVIDIA H100 80GB HBM3", "H100"),
        ("NVIDIA A100-SXM4-80GB", "A100-80GB"),
        ("NVIDIA A100-SXM4-40GB", "A100-40GB"),
        ("Tesla T4", "T4"),
        ("NVIDIA L40S", "L40S"),
        ("h200", "H200"),
        ("GeForce RTX 4090", None),
    ],
)
def test_gpu_names_from_nvml_and_labels_normalise(raw: str, name: str | None) -> None:
    assert normalise_gpu_name(raw) == name


def test_unknown_accelerator_lists_known_ones() -> None:
    with pytest.raises(KeyError, match="known: H200, H100"):
        accelerator("B300")


def test_prices_are_user_overridable_without_touching_the_defaults() -> None:
    custom = with_prices({"NVIDIA H100 80GB HBM3": 1.25})
    assert custom["H100"].price_per_hour == 1.25
    assert CATALOG["H100"].price_per_hour != 1.25
    with pytest.raises(ValueError, match="negative"):
        with_prices({"H100": -1})


@pytest.mark.parametrize(
    ("gpu", "layout", "problem"),
    [
        ("H100", ["3g.40gb", "3g.40gb"], None),
        ("H100", ["1g.10gb"] * 7, None),
        ("A100-80GB", ["4g.40gb", "3g.40gb"], None),
        ("A100-80GB", ["2g.20gb", "2g.20gb", "2g.20gb", "1g.10gb"], None),
        ("A30", ["2g.12gb", "1g.6gb", "1g.6gb"], None),
        ("H100", ["4g.40gb", "4g.40gb"], "needs 8 compute slices"),
        ("H100", ["1g.10gb"] * 8, "needs 8 compute slices"),
        ("H100", ["3g.20gb"], "'3g.20gb' is not a MIG profile of H100"),
        ("A30", ["4g.24gb", "1g.6gb"], "needs 5 compute slices; A30 has 4"),
        ("L4", ["1g.6gb"], "does not support MIG"),
        ("H100", ["1g.20gb"] * 5, "at most 4 × 1g.20gb"),
    ],
)
def test_mig_layouts(gpu: str, layout: list[str], problem: str | None) -> None:
    found = mig_layout_problem(CATALOG[gpu], layout)
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found


INVENTORY = """\
apiVersion: gpufleet.io/v1alpha1
kind: Inventory
metadata: {name: lab}
spec:
  nodes:
    - name: node-1
      labels: {zone: a}
      gpus:
        - {type: H100, count: 8}
      cachedModels: [llama-3-8b]
    - name: node-2
      gpus:
        - {type: NVIDIA A100-SXM4-80GB, count: 2, migLayout: [3g.40gb, 3g.40gb]}
        - {type: L4, count: 4, timeSlicing: 4}
"""


def test_inventory_file(tmp_path: Path) -> None:
    path = tmp_path / "inventory.yaml"
    path.write_text(INVENTORY)
    inv = load_inventory(path)
    assert [n.name for n in inv.nodes] == ["node-1", "node-2"]
    assert inv.nodes[0].gpu_count == 8 and inv.nodes[0].cached_models == ["llama-3-8b"]
    assert inv.nodes[1].gpus[0].mig_layout == ["3g.40gb", "3g.40gb"]
    assert inv.nodes[1].gpus[1].time_slicing == 4


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (
            ("type: L4, count: 4", "type: Quadro, count: 4"),
            "spec.nodes[1].gpus[1].type: unknown GPU type 'Quadro'",
        ),
        (
            ("[3g.40gb, 3g.40gb]", "[4g.40gb, 4g.40gb]"),
            "spec.nodes[1].gpus[0].migLayout: the layout needs 8",
        ),
        (
            ("timeSlicing: 4}", "timeSlicing: 4, migLayout: [1g.6gb]}"),
            "use either migLayout or timeSlicing",
        ),
        (("name: node-2", "name: node-1"), "node name 'node-1' appears twice"),
        (("count: 8}", "count: 8, mig: true}"), "spec.nodes[0].gpus[0].mig: unknown field"),
    ],
)
def test_bad_inventories_name_the_field(
    tmp_path: Path, edit: tuple[str, str], problem: str
) -> None:
    path = tmp_path / "inventory.yaml"
    path.write_text(INVENTORY.replace(*edit))
    with pytest.raises(SpecError) as info:
        load_inventory(path)
    assert any(problem in p for p in info.value.problems), info.value.problems
    assert all(p.startswith(str(path)) for p in info.value.problems)


def test_discovery_without_nvml_is_cpu_only() -> None:
    inv = discover(node_name="My_Host")
    (node,) = inv.nodes
    assert node.name == "my-host"
    assert node.gpus == [] and node.cpus >= 1 and node.memory and node.memory > 0


@dataclass
class FakeNvml:
    """The few NVML calls discovery makes, over a described machine."""

    gpus: list[tuple[str, int, list[str]]]
    calls: list[str] = field(default_factory=list)

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> tuple[str, int]:
        return ("gpu", i)

    def nvmlDeviceGetName(self, handle: tuple[str, ...]) -> bytes:
        if handle[0] == "mig":
            return f"{self.gpus[handle[1]][0]} MIG {self.gpus[handle[1]][2][handle[2]]}".encode()
        return self.gpus[handle[1]][0].encode()

    def nvmlDeviceGetMemoryInfo(self, handle: tuple[str, int]) -> object:
        return type("Mem", (), {"total": self.gpus[handle[1]][1]})()

    def nvmlDeviceGetMigMode(self, handle: tuple[str, int]) -> tuple[int, int]:
        return (1, 1) if self.gpus[handle[1]][2] else (0, 0)

    def nvmlDeviceGetMaxMigDeviceCount(self, handle: tuple[str, int]) -> int:
        return 7

    def nvmlDeviceGetMigDeviceHandleByIndex(
        self, handle: tuple[str, int], j: int
    ) -> tuple[str, int, int]:
        if j >= len(self.gpus[handle[1]][2]):
            raise LookupError("not found")
        return ("mig", handle[1], j)


def test_discovery_through_nvml_groups_gpus_and_reads_mig() -> None:
    h100 = "NVIDIA H100 80GB HBM3"
    nvml = FakeNvml(
        [
            (h100, 85_520_809_984, []),
            (h100, 85_520_809_984, []),
            (h100, 85_520_809_984, ["3g.40gb", "3g.40gb"]),
        ]
    )
    (node,) = discover(nvml=nvml, node_name="gpu-1").nodes
    assert [(g.type, g.count, g.mig_layout) for g in node.gpus] == [
        ("H100", 2, []),
        ("H100", 1, ["3g.40gb", "3g.40gb"]),
    ]
    assert node.gpus[0].memory == 85_520_809_984
