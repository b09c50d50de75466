"""Engine replicas as child processes of this one (``gpufleet up``).

Each replica has one supervisor task: pick a free port, launch, probe readiness, watch liveness,
and on an unexpected exit restart with exponential back-off (1 s doubling to 30 s, reset after a
minute of healthy running — the kubelet's CrashLoopBackOff shape, shorter).

No orphans, ever. Children run in their own session (so a terminal's Ctrl-C reaches gpufleet,
which stops them in order, rather than every engine at once) and are stopped by process group
(SIGTERM, then SIGKILL after the engine's grace period). If gpufleet itself is killed outright,
``PR_SET_PDEATHSIG`` makes the kernel send SIGKILL to each engine.

Engines listen on loopback and each replica gets a random secret of its own (the engine's API
key, passed by environment where the engine allows it): only this process, its probes and its
gateway hold it, so another local user cannot reach an engine around the gateway's keys, quotas
and ledger. The secret is kept off the replica's log (the launch line shows ``***``).

Start-up is measured per attempt (``runtime.startup``): fetch is the weights' look-up in
``start`` (nothing is downloaded here); load runs from the process's launch to the first 2xx of
its health path, which the readiness wait asks first; the first probe from there to the first 2xx
of the readiness probe. An engine whose health path is not 2xx by then (a 503 while it loads) is
probed for readiness too, as before: its load then ends where it became ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp

from gpufleet.engines import EngineAdapter, KvEvents, Launch, adapter_for
from gpufleet.runtime.base import Capabilities, Phase, Replica, ReplicaFeed, ReplicaRequest
from gpufleet.runtime.external import ExternalEndpoints
from gpufleet.runtime.weights import resolve_weights
from gpufleet.supervise import wait_set

__all__ = ["LocalRuntime"]

_PR_SET_PDEATHSIG = 1


def _parent_death_hook() -> Callable[[], None]:
    """A ``preexec_fn`` asking the kernel to SIGKILL the child when gpufleet dies (Linux)."""
    parent = os.getpid()
    if not sys.platform.startswith("linux"):
        return lambda: None
    libc = ctypes.CDLL(None, use_errno=True)

    def hook() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before the prctl took effect
            os._exit(1)

    return hook


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


@dataclasses.dataclass(eq=False)
class _Handle:
    replica: Replica
    request: ReplicaRequest
    adapter: EngineAdapter
    weights: Path
    log_path: Path
    proc: asyncio.subprocess.Process | None = None
    launch: Launch | None = None
    task: asyncio.Task[None] | None = None
    stopping: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    #: When ``start`` was called (the runtime's clock): the first attempt's start-up counts
    #: from here.
    created: float = 0.0


class LocalRuntime:
    capabilities = Capabilities(mig=False, multi_node=False, sleep_wake=False)

    def __init__(
        self,
        data_dir: Path,
        *,
        host: str = "127.0.0.1",
        probe_interval_s: float = 1.0,
        probe_timeout_s: float = 1.5,
        liveness_failures: int = 2,
        backoff_initial_s: float = 1.0,
        backoff_max_s: float = 30.0,
        backoff_reset_after_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log_dir = data_dir / "logs"
        self._host = host
        self._probe_interval = probe_interval_s
        self._probe_timeout = probe_timeout_s
        self._liveness_failures = liveness_failures
        self._backoff = (backoff_initial_s, backoff_max_s, backoff_reset_after_s)
        self._handles: dict[str, _Handle] = {}
        self._feed = ReplicaFeed()
        #: ``engine: external`` models' replicas: endpoints probed, nothing run.
        self._external = ExternalEndpoints(self._feed.publish)
        self._http: aiohttp.ClientSession | None = None
        self._death_hook = _parent_death_hook()
        #: What the start-up figures are measured with (tests pass a controllable one).
        self._clock = clock

    # -- Runtime protocol -------------------------------------------------------------------

    async def start(self, request: ReplicaRequest) -> Replica:
        if request.spec.engine == "external":
            return await self._external.start(request)
        adapter = adapter_for(request.spec.engine)
        created = self._clock()
        weights = resolve_weights(request.spec.parsed_source)
        fetched = self._clock()
        pool = f"{request.role}-" if request.role == "prefill" else ""
        rid = f"{request.model}-{pool}g{request.generation}-{secrets.token_hex(3)}"
        log_path = self._log_dir / request.model / f"{rid}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        replica = Replica(
            id=rid,
            model=request.model,
            generation=request.generation,
            phase=Phase.STARTING,
            embeddings=request.spec.embeddings,
            role=request.role,
            api_key=secrets.token_urlsafe(32),
            fetch_s=fetched - created,
        )
        handle = _Handle(replica, request, adapter, weights, log_path, created=created)
        self._handles[rid] = handle
        handle.task = asyncio.create_task(self._supervise(handle), name=f"replica:{rid}")
        self._publish(handle)
        return replica

    async def stop(self, replica_id: str) -> None:
        if self._external.has(replica_id):
            await self._external.stop(replica_id)
            return
        handle = self._handles.get(replica_id)
        if handle is None:
            return
        if not handle.stopping.is_set():
            handle.stopping.set()
            self._update(handle, phase=Phase.STOPPING, message="stopping")
        await self._terminate(handle)
        if handle.task is not None:
            await handle.task
        if self._handles.pop(replica_id, None) is not None:
            self._update(handle, phase=Phase.STOPPED, message="stopped", url=None)

    def replicas(self, model: str | None = None) -> list[Replica]:
        return [
            h.replica for h in self._handles.values() if model is None or h.replica.model == model
        ] + self._external.replicas(model)

    def watch(self) -> AsyncIterator[Replica]:
        return self._feed.watch()

    async def logs(self, replica_id: str, tail: int = 200) -> str:
        handle = self._handles.get(replica_id)
        path = handle.log_path if handle else None
        if path is None:
            found = list(self._log_dir.glob(f"*/{replica_id}.log"))
            path = found[0] if found else None
        if path is None or not path.exists():
            return ""
        text = await asyncio.to_thread(_tail, path, tail)
        key = handle.replica.api_key if handle else None
        # An engine that prints its own settings (SGLang's server arguments) prints its key.
        return text.replace(key, "***") if key else text

    def log_path(self, replica_id: str) -> Path | None:
        handle = self._handles.get(replica_id)
        return handle.log_path if handle else None

    async def close(self) -> None:
        await asyncio.gather(*(self.stop(rid) for rid in list(self._handles)))
        await self._external.close()
        if self._http is not None:
            await self._http.close()
            self._http = None

    # -- supervision ------------------------------------------------------------------------

    async def _supervise(self, h: _Handle) -> None:
        initial, maximum, reset_after = self._backoff
        delay = initial
        attempt = 0
        while not h.stopping.is_set():
            attempt += 1
            ready_at = await self._run_once(h, attempt)
            if h.stopping.is_set():
                return
            code = h.proc.returncode if h.proc else None
            if ready_at is not None and time.monotonic() - ready_at >= reset_after:
                delay = initial
            reason = f"exited with code {code}" if code is not None else "did not become ready"
            self._update(
                h,
                phase=Phase.BACKOFF,
                url=None,
                pid=None,
                restarts=h.replica.restarts + 1,
                message=f"{reason}; restarting in {delay:g}s (see gpufleet logs {h.replica.model})",
            )
            await wait_set(h.stopping, delay)
            delay = min(delay * 2, maximum)

    async def _run_once(self, h: _Handle, attempt: int) -> float | None:
        """Launch the engine and serve until it exits. Returns when it became ready, if it did."""
        port = _free_port(self._host)
        host = f"[{self._host}]" if ":" in self._host else self._host
        url = f"http://{host}:{port}"
        events: KvEvents | None = None
        if h.request.spec.routing.prefix_index == "precise":
            events = KvEvents(_free_port(self._host), _free_port(self._host))
        try:
            launch = h.adapter.launch(
                h.request.spec,
                weights=h.weights,
                served_name=h.request.model,
                host=self._host,
                port=port,
                api_key=h.replica.api_key,
                kv_events=events,
            )
        except ValueError as exc:
            self._update(h, phase=Phase.FAILED, message=str(exc))
            h.stopping.set()
            return None
        h.launch = launch
        with h.log_path.open("ab") as log:
            line = " ".join(launch.argv)
            if h.replica.api_key:
                line = line.replace(h.replica.api_key, "***")
            log.write(f"--- gpufleet: attempt {attempt}: {line}\n".encode())
            log.flush()
            h.proc = await asyncio.create_subprocess_exec(
                *launch.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **launch.env},
                start_new_session=True,
                preexec_fn=self._death_hook,
            )
        launched = self._clock()
        self._update(
            h,
            phase=Phase.STARTING,
            url=url,
            kv_events=f"tcp://{host}:{events.port}" if events is not None else None,
            kv_replay=f"tcp://{host}:{events.replay_port}" if events is not None else None,
            pid=h.proc.pid,
            started_at=time.time(),
            message="starting",
            # A restart fetches nothing, and counts from its own launch.
            fetch_s=h.replica.fetch_s if attempt == 1 else None,
            load_s=None,
            ready_s=None,
            startup_s=None,
        )
        begun = h.created if attempt == 1 else launched
        exited = asyncio.ensure_future(h.proc.wait())
        try:
            times = await self._await_ready(h, launch, url, exited, launched)
            if times is None:
                if not exited.done():
                    await self._terminate(h)
                return None
            answered, ready = times
            ready_at = time.monotonic()
            self._update(
                h,
                phase=Phase.READY,
                ready_at=time.time(),
                message="ready",
                load_s=answered - launched,
                ready_s=ready - answered,
                startup_s=ready - begun,
            )
            await self._watch_liveness(h, launch, url, exited)
            return ready_at
        finally:
            if not exited.done():
                await self._terminate(h)
            await exited

    async def _await_ready(
        self,
        h: _Handle,
        launch: Launch,
        url: str,
        exited: asyncio.Future[int],
        launched: float,
    ) -> tuple[float, float] | None:
        """Wait until the readiness probe passes: when the engine first answered its health
        path and when it passed, by the runtime's clock; None if it exited or timed out."""
        deadline = time.monotonic() + launch.readiness.timeout_s
        probe = launch.readiness
        answered: float | None = None
        while time.monotonic() < deadline and not h.stopping.is_set():
            if exited.done():
                return None
            if answered is None:
                health = await self._request(
                    "GET", url + launch.liveness_path, None, h.replica, timeout=5.0
                )
                if health is None:  # not listening yet: no probe can pass
                    await asyncio.wait({exited}, timeout=0.05)
                    continue
                if 200 <= health < 300:
                    answered = self._clock()
                    self._update(h, load_s=answered - launched)
            status = await self._request(
                probe.method, url + probe.path, probe.body, h.replica, timeout=5.0
            )
            if status is not None and 200 <= status < 300:
                ready = self._clock()
                return (answered if answered is not None else ready), ready
            await asyncio.wait({exited}, timeout=0.05 if status is None else 0.2)
        return None

    async def _watch_liveness(
        self, h: _Handle, launch: Launch, url: str, exited: asyncio.Future[int]
    ) -> None:
        """Mark the replica Unready while it stops answering HTTP, Ready again when it does.

        Any HTTP answer counts as alive: llama-cpp-python holds a lock on most routes while it
        generates, so a route-specific probe would flap under load.
        """
        failures = 0
        while not h.stopping.is_set():
            done, _ = await asyncio.wait({exited}, timeout=self._probe_interval)
            if done:
                return
            status = await self._request(
                "GET", url + launch.liveness_path, None, h.replica, timeout=self._probe_timeout
            )
            if status is None:
                failures += 1
                if failures >= self._liveness_failures and h.replica.phase is Phase.READY:
                    self._update(
                        h, phase=Phase.UNREADY, message=f"not answering for {failures} probes"
                    )
            else:
                if h.replica.phase is Phase.UNREADY:
                    self._update(h, phase=Phase.READY, message="answering again")
                failures = 0

    async def _request(
        self, method: str, url: str, body: bytes | None, replica: Replica, *, timeout: float
    ) -> int | None:
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))
        headers = replica.auth_headers()
        if body is not None:
            headers["content-type"] = "application/json"
        try:
            async with self._http.request(
                method,
                url,
                data=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as resp:
                await resp.read()
                return resp.status
        except (aiohttp.ClientError, TimeoutError, OSError):
            return None

    async def _terminate(self, h: _Handle) -> None:
        proc = h.proc
        if proc is None or proc.returncode is not None:
            return
        grace = h.launch.stop_grace_s if h.launch else 10.0
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), timeout=grace)
        except TimeoutError:
            _signal_group(proc.pid, signal.SIGKILL)
            await proc.wait()
        # Grandchildren an engine left behind in its group go too.
        _signal_group(proc.pid, signal.SIGKILL)

    # -- snapshots --------------------------------------------------------------------------

    def _update(self, h: _Handle, **changes: object) -> None:
        h.replica = dataclasses.replace(h.replica, **changes)  # type: ignore[arg-type]
        self._publish(h)

    def _publish(self, h: _Handle) -> None:
        self._feed.publish(h.replica)


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _tail(path: Path, lines: int) -> str:
    with path.open("rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - 512 * 1024))
        data = f.read()
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])
