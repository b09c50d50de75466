"""The Kubernetes operator: Model and Tenant resources in, the controller in the middle,
engine pods and status out — by responsibility:

- ``leadership``: one operator acts at a time (a Lease; work starts when it is won and stops
  when it is lost);
- ``models``: Model resources into the controller; each model's Service, disruption budget
  and loader Jobs;
- ``tenants``: Tenant resources into the store and the cluster;
- ``status``: the status written back;
- ``placement``: where a new replica goes (the planner on the nodes' inventory);
- ``objects``: owned objects kept as written, without rewriting what already is;
- ``engine_key``: the Secret engines answer to, made when missing;
- ``process``: the process, wired in one place.
"""

from gpufleet.operator.leadership import LeaderElection, Leadership
from gpufleet.operator.models import WAKE_ANNOTATION, ModelMirror
from gpufleet.operator.placement import CLUSTER_PLANNING, ClusterPlacer
from gpufleet.operator.process import Operator, OperatorConfig, run_operator
from gpufleet.operator.status import model_status, tenant_status
from gpufleet.operator.tenants import TenantMirror

__all__ = [
    "CLUSTER_PLANNING",
    "WAKE_ANNOTATION",
    "ClusterPlacer",
    "LeaderElection",
    "Leadership",
    "ModelMirror",
    "Operator",
    "OperatorConfig",
    "TenantMirror",
    "model_status",
    "run_operator",
    "tenant_status",
]
