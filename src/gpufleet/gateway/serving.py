"""Serving a gateway: the listening socket, the HTTP server and the process's open-files limit.

Shared by ``gpufleet up`` and ``gpufleet gateway`` (Kubernetes)."""

from __future__ import annotations

import logging
import socket

import uvicorn
from starlette.types import ASGIApp

from gpufleet.errors import PermanentError
from gpufleet.gateway.client_timeouts import HeaderDeadline, header_timeout_protocol
from gpufleet.gateway.metrics import GatewayMetrics
from gpufleet.gateway.settings import GatewaySettings

__all__ = ["PortInUseError", "bind_socket", "gateway_server", "raise_open_files_limit"]

log = logging.getLogger("gpufleet")


class PortInUseError(PermanentError):
    pass


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted connections inherit it. Without it, asyncio's own loop (no uvloop) leaves Nagle
    # on for a pre-bound socket and every response waits ~40 ms for a delayed ACK (measured).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise PortInUseError(
            f"cannot listen on {host}:{port}: {exc.strerror} "
            f"(is another gpufleet running? choose another with --port)"
        ) from exc
    sock.listen(2048)
    sock.set_inheritable(False)
    return sock


def raise_open_files_limit() -> int:
    """Lift the soft limit on open files to the hard one and return it.

    Every stream holds two descriptors in the gateway (client and engine); the usual soft limit
    of 1,024 would cap a gateway near 500 concurrent streams while the hard limit (often
    524,288) allows far more. Servers such as nginx raise it the same way."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-files limit from %d: %s", soft, exc)
    return soft


def gateway_server(
    app: ASGIApp,
    settings: GatewaySettings | None = None,
    metrics: GatewayMetrics | None = None,
) -> uvicorn.Server:
    """The HTTP server a gateway runs on (``serve(sockets=[bind_socket(…)])``): httptools, with
    a deadline on each request's headers (``client_timeouts``); slow clients closed are counted
    in ``metrics``."""
    settings = settings or GatewaySettings()
    on_slow = None
    if metrics is not None:
        counter = metrics.slow_clients

        def on_slow(stage: str) -> None:
            counter.labels(stage).inc()

    return uvicorn.Server(
        uvicorn.Config(
            app,
            http=header_timeout_protocol(HeaderDeadline(settings.header_timeout_s, on_slow)),
            lifespan="off",
            log_level="warning",
            access_log=False,
            # No client addresses are used: skip uvicorn's X-Forwarded-For rewriting.
            proxy_headers=False,
            timeout_graceful_shutdown=5,
        )
    )
