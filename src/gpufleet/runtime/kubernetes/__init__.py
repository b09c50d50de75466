"""The Kubernetes backend: manifests (``render``), the runtime (pods), the node inventory.

``gpufleet render`` prints objects for GitOps; ``KubernetesRuntime`` runs replicas as pods
with the very same pod spec, under the same controller as ``gpufleet up``.
"""

from gpufleet.runtime.kubernetes.api import FakeKube, KubeApi, WatchEvent
from gpufleet.runtime.kubernetes.manifests import (
    DEFAULT_IMAGES,
    EngineGroup,
    RenderError,
    RenderSettings,
    render,
    to_yaml,
)
from gpufleet.runtime.kubernetes.nodes import inventory_from_nodes
from gpufleet.runtime.kubernetes.runtime import KubernetesRuntime

__all__ = [
    "DEFAULT_IMAGES",
    "EngineGroup",
    "FakeKube",
    "KubeApi",
    "KubernetesRuntime",
    "RenderError",
    "RenderSettings",
    "WatchEvent",
    "inventory_from_nodes",
    "render",
    "to_yaml",
]
