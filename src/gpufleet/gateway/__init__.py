"""The gateway: an OpenAI-compatible ASGI app in front of engine replicas."""

from gpufleet.gateway.app import GatewaySettings, build_app
from gpufleet.gateway.errors import ApiError
from gpufleet.gateway.metrics import GatewayMetrics

__all__ = ["ApiError", "GatewayMetrics", "GatewaySettings", "build_app"]
