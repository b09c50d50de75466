"""Forwarding requests to engine replicas, streams chunk by chunk.

The body is forwarded as the client sent it (no re-serialisation). A replica is chosen by
least outstanding requests counted here — the gateway's own count is the freshest signal there
is — with round-robin among ties. A request that fails before any byte reached the client
(connection refused or reset, engine 502/503) is retried on another ready replica; a stream
that breaks after its first byte ends with an OpenAI-shaped error event and a clean close.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from starlette.responses import Response, StreamingResponse

from gpufleet.controller import ModelEntry
from gpufleet.gateway.errors import ApiError, error_response, no_replica, sse_error, upstream_failed
from gpufleet.gateway.metrics import GatewayMetrics
from gpufleet.runtime import Replica

__all__ = ["Upstream"]

_RETRYABLE_STATUS = frozenset({502, 503})
_HOP_HEADERS = ("content-type",)


class Upstream:
    def __init__(
        self, metrics: GatewayMetrics, *, connect_timeout_s: float = 5.0, max_attempts: int = 3
    ) -> None:
        self._metrics = metrics
        self._session: aiohttp.ClientSession | None = None
        self._connect_timeout = connect_timeout_s
        self._max_attempts = max_attempts
        self._in_flight: dict[str, int] = {}
        self._rr = itertools.count()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self._connect_timeout),
                auto_decompress=False,
                skip_auto_headers=("User-Agent", "Accept-Encoding"),
            )
        return self._session

    def pick(self, endpoints: tuple[Replica, ...], exclude: set[str]) -> Replica | None:
        candidates = [r for r in endpoints if r.id not in exclude]
        if not candidates:
            return None
        least = min(self._in_flight.get(r.id, 0) for r in candidates)
        tied = [r for r in candidates if self._in_flight.get(r.id, 0) == least]
        return tied[next(self._rr) % len(tied)]

    async def forward(
        self, entry: ModelEntry, route: str, body: bytes, *, stream: bool, request_id: str
    ) -> Response:
        started = time.perf_counter()
        tried: set[str] = set()
        last_error = ""
        headers = {"content-type": "application/json", "x-request-id": request_id}
        for _ in range(self._max_attempts):
            replica = self.pick(entry.endpoints, tried)
            if replica is None:
                break
            tried.add(replica.id)
            self._acquire(replica, entry.name)
            released = False
            try:
                resp = await self._http().post(f"{replica.url}{route}", data=body, headers=headers)
            except (aiohttp.ClientConnectionError, TimeoutError) as exc:
                self._release(replica, entry.name)
                last_error = f"{type(exc).__name__}: {exc}"
                self._metrics.upstream_errors.labels(entry.name, "connect").inc()
                continue
            try:
                if resp.status in _RETRYABLE_STATUS:
                    last_error = f"engine answered {resp.status}"
                    self._metrics.upstream_errors.labels(entry.name, f"http_{resp.status}").inc()
                    continue
                if stream and resp.status == 200:
                    released = True  # the stream releases when it ends
                    return self._stream(entry, route, replica, resp, started)
                payload = await resp.read()
                return self._finish(entry, route, resp, payload, started)
            except (aiohttp.ClientError, TimeoutError) as exc:
                self._metrics.upstream_errors.labels(entry.name, "read").inc()
                raise upstream_failed(entry.name, f"{type(exc).__name__}: {exc}") from exc
            finally:
                if not released:
                    resp.release()
                    self._release(replica, entry.name)
        if last_error:
            raise upstream_failed(entry.name, f"{last_error} (tried {len(tried)} replica(s))")
        detail = entry.problem or (
            "replicas are starting" if entry.replicas else "no replica is running"
        )
        raise no_replica(entry.name, detail, retry_after=30 if entry.problem else 2)

    def _finish(
        self,
        entry: ModelEntry,
        route: str,
        resp: aiohttp.ClientResponse,
        payload: bytes,
        started: float,
    ) -> Response:
        status = resp.status
        if status >= 500:
            raise upstream_failed(entry.name, f"engine answered {status}: {_error_text(payload)}")
        if status >= 400:
            error = _as_openai_error(status, payload)
            self._observe(entry.name, route, status, started)
            return error
        self._observe(entry.name, route, status, started)
        return Response(payload, status_code=status, media_type=resp.headers.get("content-type"))

    def _stream(
        self,
        entry: ModelEntry,
        route: str,
        replica: Replica,
        resp: aiohttp.ClientResponse,
        started: float,
    ) -> Response:
        metrics = self._metrics

        async def chunks() -> AsyncIterator[bytes]:
            first = True
            status = 200
            try:
                async for chunk in resp.content.iter_any():
                    if first:
                        metrics.ttft.labels(entry.name).observe(time.perf_counter() - started)
                        first = False
                    yield chunk
            except (aiohttp.ClientError, TimeoutError) as exc:
                status = 502
                metrics.upstream_errors.labels(entry.name, "stream").inc()
                yield sse_error(
                    upstream_failed(entry.name, f"stream broke: {type(exc).__name__}: {exc}")
                )
            finally:
                resp.release()
                self._release(replica, entry.name)
                self._observe(entry.name, route, status, started)

        return StreamingResponse(
            chunks(),
            media_type=resp.headers.get("content-type", "text/event-stream"),
            headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
        )

    def _acquire(self, replica: Replica, model: str) -> None:
        self._in_flight[replica.id] = self._in_flight.get(replica.id, 0) + 1
        self._metrics.in_flight.labels(model).inc()

    def _release(self, replica: Replica, model: str) -> None:
        left = self._in_flight.get(replica.id, 1) - 1
        if left:
            self._in_flight[replica.id] = left
        else:
            self._in_flight.pop(replica.id, None)
        self._metrics.in_flight.labels(model).dec()

    def _observe(self, model: str, route: str, status: int, started: float) -> None:
        self._metrics.requests.labels(model, route, str(status)).inc()
        self._metrics.duration.labels(model, route).observe(time.perf_counter() - started)


def _error_text(payload: bytes) -> str:
    text = payload[:500].decode("utf-8", "replace").strip()
    try:
        data: Any = json.loads(payload)
    except ValueError:
        return text or "(empty body)"
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return str(err["message"])
        if "detail" in data:
            return str(data["detail"])[:500]
    return text


def _as_openai_error(status: int, payload: bytes) -> Response:
    """Pass an engine's 4xx through, reshaped to OpenAI's error body when it is not already."""
    try:
        data: Any = json.loads(payload)
    except ValueError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        return Response(payload, status_code=status, media_type="application/json")
    return error_response(
        ApiError(status, f"The engine rejected the request: {_error_text(payload)}")
    )
