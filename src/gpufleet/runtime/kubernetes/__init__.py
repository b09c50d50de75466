"""The Kubernetes backend: manifests from models (``render``) — the operator builds on them.

``gpufleet render`` prints these objects for GitOps; the operator (next) applies the same
ones, so what a platform team reviews in Git is what the operator would create.
"""

from gpufleet.runtime.kubernetes.manifests import (
    DEFAULT_IMAGES,
    RenderError,
    RenderSettings,
    render,
    to_yaml,
)

__all__ = ["DEFAULT_IMAGES", "RenderError", "RenderSettings", "render", "to_yaml"]
