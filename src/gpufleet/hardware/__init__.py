"""Accelerators: the catalog of what each GPU offers, and discovery of what this machine has."""

from gpufleet.hardware.catalog import (
    CATALOG,
    Accelerator,
    MigProfile,
    accelerator,
    normalise_gpu_name,
    with_prices,
)
from gpufleet.hardware.discovery import discover
from gpufleet.hardware.inventory import check_inventory, load_inventory, mig_layout_problem

__all__ = [
    "CATALOG",
    "Accelerator",
    "MigProfile",
    "accelerator",
    "check_inventory",
    "discover",
    "load_inventory",
    "mig_layout_problem",
    "normalise_gpu_name",
    "with_prices",
]
