"""The placement planner: which GPU, MIG instance or time-slice every replica gets, and why.

Pure: it reads an inventory and sized deployments and returns a Plan; the controller, the
Kubernetes operator and the simulator all call the same ``plan``.
"""

from gpufleet.planner.apply import apply_relayouts
from gpufleet.planner.inputs import (
    PREFILL_POOL_SUFFIX,
    deployment_for,
    pool_deployments,
    pool_preference,
)
from gpufleet.planner.model import (
    DEFAULT_PRIORITIES,
    Deployment,
    Eviction,
    Migration,
    MigRelayout,
    Placement,
    Plan,
    PlanSettings,
    ReplicaKey,
    Stage,
    Unplaced,
)
from gpufleet.planner.plan import plan

__all__ = [
    "DEFAULT_PRIORITIES",
    "PREFILL_POOL_SUFFIX",
    "Deployment",
    "Eviction",
    "MigRelayout",
    "Migration",
    "Placement",
    "Plan",
    "PlanSettings",
    "ReplicaKey",
    "Stage",
    "Unplaced",
    "apply_relayouts",
    "deployment_for",
    "plan",
    "pool_deployments",
    "pool_preference",
]
