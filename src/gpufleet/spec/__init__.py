"""Declarative resources (``gpufleet.io/v1alpha1``) and their YAML reading.

Pure: no HTTP, database, subprocess or Kubernetes code may be imported here (import-linter
checks it), because the CLI, the server, the operator and the simulator all read specs.
"""

from gpufleet.spec.inventory import (
    GpuGroup,
    Inventory,
    InventorySpec,
    NodeSpec,
    load_inventory_text,
)
from gpufleet.spec.io import (
    KINDS,
    load_file,
    load_file_resources,
    load_text,
    load_text_resources,
    parse_document,
    parse_tenant,
)
from gpufleet.spec.quantity import format_bytes, parse_bytes, parse_duration
from gpufleet.spec.resources import (
    API_VERSION,
    ENGINES,
    AccessSpec,
    AutoscalingSpec,
    BudgetSpec,
    EngineName,
    LimitsSpec,
    Metadata,
    Model,
    ModelSpec,
    PlacementPolicy,
    PricingSpec,
    Replicas,
    Resources,
    RolloutSpec,
    RoutingPolicyName,
    RoutingSpec,
    ScheduleSpec,
    Tenant,
    TenantSpec,
    TrafficSplit,
)
from gpufleet.spec.source import BUNDLED_PACKAGES, Source, parse_source

__all__ = [
    "API_VERSION",
    "BUNDLED_PACKAGES",
    "ENGINES",
    "KINDS",
    "AccessSpec",
    "AutoscalingSpec",
    "BudgetSpec",
    "EngineName",
    "GpuGroup",
    "Inventory",
    "InventorySpec",
    "LimitsSpec",
    "Metadata",
    "Model",
    "ModelSpec",
    "NodeSpec",
    "PlacementPolicy",
    "PricingSpec",
    "Replicas",
    "Resources",
    "RolloutSpec",
    "RoutingPolicyName",
    "RoutingSpec",
    "ScheduleSpec",
    "Source",
    "Tenant",
    "TenantSpec",
    "TrafficSplit",
    "format_bytes",
    "load_file",
    "load_file_resources",
    "load_inventory_text",
    "load_text",
    "load_text_resources",
    "parse_bytes",
    "parse_document",
    "parse_duration",
    "parse_source",
    "parse_tenant",
]
