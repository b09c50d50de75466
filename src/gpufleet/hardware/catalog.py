"""What each accelerator offers: memory, bandwidth, compute, MIG profiles and a default price.

Figures are data-sheet values (see ../shared/REFERENCE.md): memory in decimal GB as vendors
state it, HBM/GDDR bandwidth, dense bf16 TFLOPs (fp16 for the T4, which has no bf16). Prices
per hour are defaults for cost reports — typical on-demand cloud rates in late 2026 — and users
override them (``with_prices``), since an owned GPU's cost is amortisation plus power.

MIG profiles list how many instances of each profile fit one GPU. Which *combinations* are
valid is the planner's concern (a placement rule of NVIDIA's, not a property of one profile).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = [
    "CATALOG",
    "Accelerator",
    "MigProfile",
    "accelerator",
    "normalise_gpu_name",
    "with_prices",
]

GB = 10**9


@dataclass(frozen=True, slots=True)
class MigProfile:
    name: str  # e.g. "1g.10gb"
    compute_slices: int  # the "1g" part: sevenths of the GPU's SMs
    memory_bytes: int
    max_count: int  # how many fit one GPU alone


@dataclass(frozen=True, slots=True)
class Accelerator:
    name: str
    memory_bytes: int
    bandwidth_bytes_per_s: float
    bf16_flops: float
    price_per_hour: float
    mig_profiles: tuple[MigProfile, ...] = ()
    aliases: tuple[str, ...] = ()

    @property
    def is_gpu(self) -> bool:
        return self.name != "cpu"

    @property
    def supports_mig(self) -> bool:
        return bool(self.mig_profiles)

    def mig_profile(self, name: str) -> MigProfile | None:
        return next((p for p in self.mig_profiles if p.name == name), None)


def _mig(*specs: tuple[str, int]) -> tuple[MigProfile, ...]:
    out = []
    for name, count in specs:
        m = re.fullmatch(r"(\d)g\.(\d+)gb", name)
        assert m, name
        out.append(MigProfile(name, int(m.group(1)), int(m.group(2)) * GB, count))
    return tuple(out)


_ENTRIES = (
    Accelerator(
        "H200", 141 * GB, 4.8e12, 989e12, 5.50,
        _mig(("1g.18gb", 7), ("1g.35gb", 4), ("2g.35gb", 3), ("3g.71gb", 2), ("4g.71gb", 1), ("7g.141gb", 1)),
        ("H200 SXM", "H200-141GB", "NVIDIA H200"),
    ),
    Accelerator(
        "H100", 80 * GB, 3.35e12, 989e12, 4.00,
        _mig(("1g.10gb", 7), ("1g.20gb", 4), ("2g.20gb", 3), ("3g.40gb", 2), ("4g.40gb", 1), ("7g.80gb", 1)),
        ("H100 SXM", "H100-80GB", "H100 80GB HBM3", "NVIDIA H100 80GB HBM3"),
    ),
    Accelerator(
        "A100-80GB", 80 * GB, 2.0e12, 312e12, 2.50,
        _mig(("1g.10gb", 7), ("2g.20gb", 3), ("3g.40gb", 2), ("4g.40gb", 1), ("7g.80gb", 1)),
        ("A100 80GB", "A100-SXM4-80GB", "A100 80GB PCIe", "NVIDIA A100-SXM4-80GB"),
    ),
    Accelerator(
        "A100-40GB", 40 * GB, 1.555e12, 312e12, 1.80,
        _mig(("1g.5gb", 7), ("2g.10gb", 3), ("3g.20gb", 2), ("4g.20gb", 1), ("7g.40gb", 1)),
        ("A100 40GB", "A100-SXM4-40GB", "A100-PCIE-40GB", "NVIDIA A100-SXM4-40GB"),
    ),
    Accelerator(
        "A30", 24 * GB, 0.933e12, 165e12, 0.90,
        _mig(("1g.6gb", 4), ("2g.12gb", 2), ("4g.24gb", 1)),
        ("NVIDIA A30",),
    ),
    Accelerator("L40S", 48 * GB, 0.864e12, 362e12, 1.20, (), ("NVIDIA L40S",)),
    Accelerator("L4", 24 * GB, 0.300e12, 121e12, 0.70, (), ("NVIDIA L4",)),
    Accelerator("T4", 16 * GB, 0.320e12, 65e12, 0.35, (), ("Tesla T4", "NVIDIA T4")),
    # The host CPU: a nominal two-channel DDR5 server socket; llama.cpp runs here.
    Accelerator("cpu", 0, 0.1e12, 2e12, 0.05, (), ("CPU",)),
)  # fmt: skip

CATALOG: dict[str, Accelerator] = {a.name: a for a in _ENTRIES}

_BY_KEY: dict[str, str] = {}
for _a in _ENTRIES:
    for _n in (_a.name, *_a.aliases):
        _BY_KEY[re.sub(r"[^a-z0-9]", "", _n.lower())] = _a.name


def normalise_gpu_name(name: str) -> str | None:
    """The catalog name for a GPU name as NVML or a node label writes it, if known."""
    key = re.sub(r"[^a-z0-9]", "", name.lower().removeprefix("nvidia").strip())
    return _BY_KEY.get(key) or _BY_KEY.get(re.sub(r"[^a-z0-9]", "", name.lower()))


def accelerator(name: str, catalog: Mapping[str, Accelerator] = CATALOG) -> Accelerator:
    canonical = normalise_gpu_name(name)
    if canonical is None or canonical not in catalog:
        known = ", ".join(catalog)
        raise KeyError(f"unknown accelerator {name!r}; known: {known}")
    return catalog[canonical]


def with_prices(
    prices: Mapping[str, float], catalog: Mapping[str, Accelerator] = CATALOG
) -> dict[str, Accelerator]:
    """A copy of the catalog with the given prices per hour (keys may be aliases)."""
    out = dict(catalog)
    for name, price in prices.items():
        if price < 0:
            raise ValueError(f"price for {name!r} must not be negative (got {price})")
        a = accelerator(name, out)
        out[a.name] = dataclasses.replace(a, price_per_hour=price)
    return out
