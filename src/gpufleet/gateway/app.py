"""The gateway's ASGI application: the request path, the batch runner and the route table.

Starlette without FastAPI's dependency injection on the hot path, and pure ASGI middleware
(``BaseHTTPMiddleware`` buffers and costs a task per request). Bodies are read with a size limit
before any parsing; validation names the offending field; the model is looked up in the
control plane's in-memory directory; the proxy streams the engine's answer back unbuffered.
``build_app`` wires a bare app around the parts it is given; a process — keys, quotas, the
ledger, the engine scraper, started and stopped in order — is built by ``assembly.assemble``.
"""

from __future__ import annotations

import secrets
import time

from starlette.applications import Starlette

from gpufleet.controller import ControlPlane
from gpufleet.gateway.asgi import GatewayApp
from gpufleet.gateway.auth import Keyring
from gpufleet.gateway.batch_runner import BatchRunner
from gpufleet.gateway.ledger import Ledger
from gpufleet.gateway.metrics import GatewayMetrics
from gpufleet.gateway.quotas import Quotas
from gpufleet.gateway.routes import EXCEPTION_HANDLERS, route_table
from gpufleet.gateway.service import Gateway
from gpufleet.gateway.settings import GatewaySettings

__all__ = ["GatewaySettings", "build_app"]


def build_app(
    controller: ControlPlane,
    *,
    settings: GatewaySettings | None = None,
    metrics: GatewayMetrics | None = None,
    keyring: Keyring | None = None,
    quotas: Quotas | None = None,
    ledger: Ledger | None = None,
) -> GatewayApp:
    """The gateway. Without a ``keyring`` every caller is an admin of the default tenant (the
    explicit ``--no-auth`` mode); without ``ledger`` no usage rows are written.

    ``app.state`` carries the parts others reach: ``gateway`` (the request path; ``execute``
    is its method), ``upstream``, ``queues``, ``demand``, ``quotas``, ``batches``,
    ``close`` (the batch runner, then what requests left running), and ``telemetry``: the
    GPUs' readings (``telemetry.GpuReadings``), None until the process that runs the gateway
    sets them (none where no GPU is seen)."""
    settings = settings or GatewaySettings()
    gateway = Gateway(
        controller,
        settings=settings,
        metrics=metrics,
        keyring=keyring,
        quotas=quotas,
        ledger=ledger,
    )
    batches = BatchRunner(
        controller.store,
        gateway.execute,
        gateway.admission.principal_for,
        gateway_id=f"gw-{secrets.token_hex(6)}",
        concurrency=settings.batch_concurrency,
        take_over=settings.batch_take_over,
        outages=gateway.outages,
    )
    hot, routes = route_table(gateway, batches)
    app = Starlette(routes=routes, exception_handlers=EXCEPTION_HANDLERS)

    async def close() -> None:
        await batches.close()
        await gateway.close()

    state = app.state
    state.started = time.time()
    state.gateway = gateway
    state.upstream = gateway.upstream
    state.queues = gateway.queues
    state.demand = gateway.demand
    state.quotas = gateway.quotas
    state.execute = gateway.execute
    state.batches = batches
    state.close = close
    state.telemetry = None
    return GatewayApp(app, hot)
