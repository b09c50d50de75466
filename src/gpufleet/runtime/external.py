"""The replicas of ``engine: external`` models: OpenAI-compatible servers gpufleet does not run.

One replica stands for each of the model's ``spec.endpoints``: nothing is started or stopped,
no weights fetched, no GPU placed. The controller converges such a model as any other — its
wanted count is the number of endpoints (``Autoscaler.desired``), a new generation's replicas
replace the old ones after they are ready — and the gateway routes among them as among
engines (retries, outlier ejection, the fair queue, the ledger).

A replica's URL is the endpoint's base URL without its ``/v1`` (the gateway appends
``/v1/chat/completions``, as for engines); its key is read when it starts and again at every
probe, so a rotated key file is picked up: from an environment variable of this process
(``apiKey.env``) or the first line of a file (``apiKey.file``) under ``gpufleet up``; from a
Secret (``apiKey.secretKeyRef``) on Kubernetes, where the Kubernetes runtime passes its own
reader (``runtime.kubernetes.secret_keys``). A key that cannot be read fails the replica,
naming the field and the fix; the key itself is never logged or shown.

Readiness is the endpoint's own answer: ``GET /v1/models`` with the key, every ``probe_s``;
2xx → Ready, anything else (a refusal of the key included) → Unready with the reason, until it
answers again. The replica's ``served_model`` is the endpoint's name for the model (the gateway
sends that), its ``external`` flag the endpoint's ``location`` (only tenants that opt in are
routed there).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

import aiohttp

from gpufleet.errors import PermanentError
from gpufleet.runtime.base import Phase, Replica, ReplicaRequest
from gpufleet.spec import ApiKeySource, ExternalEndpoint

__all__ = ["ExternalEndpoints", "KeyError_", "KeyReader", "base_url", "read_key"]

log = logging.getLogger("gpufleet.runtime.external")


class KeyError_(Exception):
    """An endpoint's key cannot be read: what is wrong and how to fix it."""


def base_url(url: str) -> str:
    """The endpoint's URL without the ``/v1`` the gateway's routes begin with."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def read_key(source: ApiKeySource, environ: Mapping[str, str] = os.environ) -> str:
    """The key ``source`` names; raises ``KeyError_`` saying what to fix."""
    if source.env is not None:
        value = environ.get(source.env, "").strip()
        if not value:
            raise KeyError_(
                f"apiKey.env: {source.env} is not set in gpufleet up's environment; export it "
                "before gpufleet up (or name a file with apiKey.file)"
            )
        return value
    if source.file is not None:
        try:
            lines = Path(source.file).read_text().splitlines()
        except OSError as exc:
            raise KeyError_(
                f"apiKey.file: cannot read {source.file} ({exc.strerror or exc}); put the key "
                "on its first line, readable by gpufleet up"
            ) from None
        value = lines[0].strip() if lines else ""
        if not value:
            raise KeyError_(f"apiKey.file: {source.file} is empty; put the key on its first line")
        return value
    raise KeyError_(
        "apiKey.secretKeyRef is read on Kubernetes; under gpufleet up give apiKey.env or "
        "apiKey.file"
    )


#: Reads an endpoint's key from its source; raises ``KeyError_`` saying what to fix.
KeyReader = Callable[[ApiKeySource], Awaitable[str]]


@dataclasses.dataclass(eq=False)
class _Held:
    replica: Replica
    endpoint: ExternalEndpoint
    task: asyncio.Task[None] | None = None


class ExternalEndpoints:
    """Replicas standing for external endpoints, published through ``publish``."""

    def __init__(
        self,
        publish: Callable[[Replica], None],
        *,
        probe_s: float = 5.0,
        timeout_s: float = 5.0,
        environ: Mapping[str, str] = os.environ,
        keys: KeyReader | None = None,
        keep_trying: bool = False,
    ) -> None:
        self._publish = publish
        self.probe_s = probe_s
        self.timeout_s = timeout_s
        self._environ = environ
        self._keys = keys or self._local_key
        #: An unreadable key leaves the replica Unready and probed again (a Secret may be
        #: made, or access to it granted, at any time) instead of failing it for the
        #: controller to replace: on Kubernetes, where a gateway follows endpoints by itself.
        self.keep_trying = keep_trying
        self._held: dict[str, _Held] = {}
        self._http: aiohttp.ClientSession | None = None

    def has(self, replica_id: str) -> bool:
        return replica_id in self._held

    def replicas(self, model: str | None = None) -> list[Replica]:
        return [h.replica for h in self._held.values() if model is None or h.replica.model == model]

    async def start(self, request: ReplicaRequest) -> Replica:
        """The replica of the first of the model's endpoints that this generation has none for
        yet (the controller starts one per endpoint)."""
        spec = request.spec
        taken = {
            h.replica.id
            for h in self._held.values()
            if h.replica.model == request.model and h.replica.generation == request.generation
        }
        free = [i for i in range(len(spec.endpoints)) if _id(request, i) not in taken]
        if not free:
            raise PermanentError(
                f"{request.model}: each of its {len(spec.endpoints)} endpoints has a replica"
            )
        endpoint = spec.endpoints[free[0]]
        replica = Replica(
            id=_id(request, free[0]),
            model=request.model,
            generation=request.generation,
            phase=Phase.STARTING,
            message=f"probing {endpoint.url}",
            started_at=time.time(),
            embeddings=spec.embeddings,
            served_model=endpoint.model or request.model,
            external=endpoint.location == "external",
        )
        held = self._held[replica.id] = _Held(replica, endpoint)
        self._publish(replica)
        held.task = asyncio.create_task(self._probe(held), name=f"external:{replica.id}")
        return replica

    async def stop(self, replica_id: str) -> None:
        held = self._held.pop(replica_id, None)
        if held is None:
            return
        if held.task is not None:
            held.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await held.task
        self._publish(
            dataclasses.replace(held.replica, phase=Phase.STOPPED, url=None, message="stopped")
        )

    async def close(self) -> None:
        for rid in list(self._held):
            await self.stop(rid)
        if self._http is not None:
            await self._http.close()
            self._http = None

    # -- probing ----------------------------------------------------------------------------

    async def _local_key(self, source: ApiKeySource) -> str:
        return read_key(source, self._environ)

    async def _probe(self, held: _Held) -> None:
        url = base_url(held.endpoint.url)
        while True:
            try:
                key = await self._keys(held.endpoint.api_key) if held.endpoint.api_key else None
            except KeyError_ as exc:
                if not self.keep_trying:
                    self._set(held, phase=Phase.FAILED, url=None, message=str(exc))
                    return
                if held.replica.phase is not Phase.STARTING or held.replica.message != str(exc):
                    phase = Phase.UNREADY if held.replica.phase is Phase.READY else Phase.STARTING
                    self._set(held, phase=phase, message=str(exc))
                await asyncio.sleep(self.probe_s)
                continue
            ok, why = await self._answers(url, key)
            if ok:
                if held.replica.phase is not Phase.READY:
                    now = time.time()
                    started = held.replica.started_at or now
                    self._set(held, phase=Phase.READY, url=url, api_key=key, ready_at=now,
                              message="ready", startup_s=now - started)  # fmt: skip
                elif held.replica.api_key != key:
                    self._set(held, api_key=key)  # a rotated key
            elif held.replica.phase is Phase.READY:
                log.warning("external endpoint %s of %s: %s", held.endpoint.url,
                            held.replica.model, why)  # fmt: skip
                self._set(held, phase=Phase.UNREADY, message=f"{held.endpoint.url}: {why}")
            elif held.replica.message != f"{held.endpoint.url}: {why}":
                self._set(held, message=f"{held.endpoint.url}: {why}")
            await asyncio.sleep(self.probe_s)

    async def _answers(self, url: str, key: str | None) -> tuple[bool, str]:
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        headers = {"authorization": f"Bearer {key}"} if key else {}
        try:
            async with self._http.get(f"{url}/v1/models", headers=headers) as resp:
                await resp.read()
                if 200 <= resp.status < 300:
                    return True, ""
                if resp.status in (401, 403):
                    return False, f"refused the key ({resp.status}): check apiKey"
                return False, f"GET /v1/models answered {resp.status}"
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            return False, f"not answering ({type(exc).__name__}: {exc})"

    def _set(self, held: _Held, **changes: object) -> None:
        held.replica = dataclasses.replace(held.replica, **changes)  # type: ignore[arg-type]
        self._publish(held.replica)


def _id(request: ReplicaRequest, index: int) -> str:
    return f"{request.model}-g{request.generation}-ext{index}"
