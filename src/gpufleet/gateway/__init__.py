"""The gateway: an OpenAI-compatible ASGI app in front of engine replicas.

``assemble`` builds a whole gateway (what ``gpufleet up`` and ``gpufleet gateway`` serve);
``build_app`` the bare app around given parts; ``Gateway`` is the request path both wrap.
docs/gateway.md maps the modules.
"""

from gpufleet.gateway.app import build_app
from gpufleet.gateway.assembly import GatewayStack, assemble
from gpufleet.gateway.errors import ApiError
from gpufleet.gateway.metrics import GatewayMetrics
from gpufleet.gateway.service import Gateway
from gpufleet.gateway.settings import GatewaySettings

__all__ = [
    "ApiError",
    "Gateway",
    "GatewayMetrics",
    "GatewaySettings",
    "GatewayStack",
    "assemble",
    "build_app",
]
