"""The proxies the gateway is compared with, started as their docs recommend for production.

Each peer is launched as a child process with its output in a log file; one that is missing or
fails to start becomes an ``Unavailable`` with the reason (and its log's tail on stderr), so the
comparison still runs without it. The peers live in their own virtualenv,
``.cache/bench-peers``, made by ``scripts/setup-bench-peers`` — LiteLLM pins dozens of packages
that have no business in gpufleet's environment.

- gpufleet: ``gpufleet up`` as users run it, a process of its own with a temporary data dir:
  API keys (``common.BENCH_KEY`` is its admin key), quotas (tenant ``bench`` and its user key
  have limits, high enough never to refuse), the SQLite usage ledger, its controller and engine
  scraper. Its one model, ``null-model``, is ``engine: emulator`` with the emulator replaced by
  the null engine through ``GPUFLEET_EMULATOR_COMMAND``: gpufleet launches and supervises the
  upstream as it would any engine, ``ENGINE_ARGS`` on its command line, pinned to
  ``ENGINE_CPU``. Requests carry the user key, made through the admin API once it is ready.
  ``GPUFLEET_ARGS`` is appended to its command line (``--no-auth``: no key is made),
  ``GPUFLEET_HEADERS`` to every request. Rows ``gpufleet:LABEL`` run the same from another
  source tree (``gpufleet_src``: its ``src`` folder goes first on ``PYTHONPATH``). Its CPU and
  pinning are of the gateway process alone, not of the engine it launched. A bench that needs
  more of it (``gateway_soak.py``: 10,000 streams) calls ``start_gpufleet`` with a ``Fleet``:
  more replicas, a higher ``routing.maxInFlightPerReplica`` — fields a user writes in YAML —
  and the open-files limit asked for the process.
- LiteLLM proxy: one uvicorn worker (its docs: one worker per pod, scale out with pods),
  a master key (it refuses to start without one), no database, no callbacks,
  ``LITELLM_LOG=ERROR``; the model is ``openai/null`` with ``api_base`` the null engine.
- vllm-router (Rust): log level ``warning``, otherwise its defaults — the ``cache_aware``
  policy, which for every request first asks the engine for ``/v1/chat/completions/render`` and
  ``/tokenize`` (the null engine answers both 404 at once; vLLM would tokenize), so it is also
  run as ``vllm-router-rr`` with ``--policy round_robin``: the Rust proxy's floor.
"""

from __future__ import annotations

import json
import os
import resource
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import BENCH_KEY, ROOT, free_port, stop

__all__ = [
    "ENGINE_ARGS",
    "ENGINE_CPU",
    "GPUFLEET_ARGS",
    "GPUFLEET_HEADERS",
    "LIMITS",
    "VENV",
    "Fleet",
    "Peer",
    "Unavailable",
    "core_times",
    "cpu_seconds",
    "open_files",
    "pin",
    "process_tree",
    "start",
    "start_gpufleet",
]

VENV = Path(os.environ.get("GPUFLEET_PEERS_VENV", ROOT / ".cache" / "bench-peers")).absolute()
#: Appended to ``gpufleet up``'s command line.
GPUFLEET_ARGS: list[str] = []
#: Added to every request to gpufleet, after (and over) its user key's authorization header.
GPUFLEET_HEADERS: dict[str, str] = {}
#: The null engine's arguments after its port (GAP_MS, TOKENS, flags), for the engine gpufleet
#: launches.
ENGINE_ARGS: list[str] = []
#: The core gpufleet's engine is pinned to (``taskset``), None for no pinning.
ENGINE_CPU: int | None = 0 if (os.cpu_count() or 1) >= 2 else None
#: Checked on every request, high enough never to refuse one in a benchmark.
LIMITS = {"requestsPerMinute": 10**9, "tokensPerMinute": 10**12, "concurrency": 10**6}
FLEET = """apiVersion: gpufleet.io/v1alpha1
kind: Tenant
metadata: {{name: bench}}
spec:
  limits: {limits}
---
apiVersion: gpufleet.io/v1alpha1
kind: Model
metadata: {{name: null-model}}
spec:
  # the emulator's architecture, for a revision without the hook: it then answers, and the
  # smoke request says so, instead of a replica that never becomes ready
  source: "file:{config}"
  engine: emulator
  replicas: {{min: {replicas}, max: {replicas}}}{routing}
"""
EMULATED = "gpufleet-emulator"  # the emulator's system_fingerprint
LITELLM_KEY = "sk-bench-5e0c3a1f9b2d4c6e8a7f1b3d5c9e2a4f"
START_TIMEOUT_S = 180.0
SETUP_HINT = "run scripts/setup-bench-peers"


@dataclass(frozen=True)
class Fleet:
    """What ``gpufleet up`` serves beyond the defaults every bench shares: ``replicas`` of
    ``null-model``, the requests the gateway sends each at once (``routing.maxInFlightPerReplica``;
    None: the gateway's default, 64), and the open-files limit (RLIMIT_NOFILE) asked for the
    process before it starts (None: what it inherits). gpufleet lifts its soft limit to the hard
    one itself, and its engines inherit it; the hard one rises only with CAP_SYS_RESOURCE."""

    replicas: int = 1
    max_in_flight_per_replica: int | None = None
    nofile: int | None = None

    def yaml(self, config: Path) -> str:
        routing = ""
        if self.max_in_flight_per_replica is not None:
            routing = f"\n  routing: {{maxInFlightPerReplica: {self.max_in_flight_per_replica}}}"
        return FLEET.format(
            limits=json.dumps(LIMITS), config=config, replicas=self.replicas, routing=routing
        )


def open_files(limit: int) -> Callable[[], None]:
    """A ``preexec_fn`` setting RLIMIT_NOFILE to ``limit``, the hard limit too where the process
    may raise it (CAP_SYS_RESOURCE), else the soft one as far as the hard one allows."""

    def raise_limit() -> None:
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, max(limit, hard)))
        except (ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(limit, hard), hard))

    return raise_limit


@dataclass
class Peer:
    """A running path to the null engine: where to send requests, and the process serving it."""

    name: str
    url: str
    model: str
    headers: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    start_s: float = 0.0
    #: CPU and pinning of the process alone: its children are engines, not the proxy.
    alone: bool = False
    #: gpufleet's data dir: its store (``gpufleet.db``, the usage ledger) and engine logs.
    data_dir: Path | None = None

    def close(self) -> None:
        if self.proc is not None:
            stop(self.proc)  # type: ignore[arg-type]

    def cpu_seconds(self) -> float:
        assert self.proc is not None
        return cpu_seconds(self.proc.pid, family=not self.alone)

    def pin(self, cpu: int) -> None:
        if self.proc is not None:
            pin(self.proc.pid, cpu, family=not self.alone)


@dataclass(frozen=True)
class Unavailable:
    name: str
    reason: str


def drop_broken(
    broken: dict[str, str],
    running: list[Peer],
    rows: dict[str, Any],
    missing: list[Unavailable],
) -> None:
    """Peers that broke during a run: their rows out, a "not available" row in, and the end of
    each one's log on stderr for whoever reads the run."""
    for name, why in broken.items():
        rows.pop(name, None)
        missing.append(Unavailable(name, why))
        peer = next(p for p in running if p.name == name)
        if peer.log is not None:
            tail = peer.log.read_text(errors="replace").splitlines()[-25:]
            print(f"--- {name} broke ({why}); last lines of {peer.log}:", file=sys.stderr)
            print("\n".join(tail), file=sys.stderr)


def start(
    name: str, upstream_port: int, tmp: Path, *, gpufleet_src: Path | None = None
) -> Peer | Unavailable:
    """Start one path; ``gpufleet`` and ``gpufleet:LABEL`` run ``gpufleet up`` from
    ``gpufleet_src`` (this checkout's ``src`` when None), the others in front of the engine at
    ``upstream_port``."""
    upstream = f"http://127.0.0.1:{upstream_port}"
    if name == "direct":
        return Peer("direct", f"{upstream}/v1/chat/completions", "null")
    if name == "gpufleet" or name.startswith("gpufleet:"):
        return start_gpufleet(tmp, name=name, src=gpufleet_src)
    if name == "litellm":
        exe = VENV / "bin" / "litellm"
        if not exe.exists():
            return Unavailable(name, f"{exe} missing ({SETUP_HINT})")
        port = free_port()
        config = tmp / "litellm.yaml"
        config.write_text(_litellm_config(upstream))
        env = {
            "LITELLM_LOG": "ERROR",
            "LITELLM_MODE": "PRODUCTION",
            # the machine has no route to GitHub; skip the cost-map download at start-up
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        }
        cmd = [str(exe), "--config", str(config), "--host", "127.0.0.1", "--port", str(port)]
        cmd += ["--num_workers", "1"]
        headers = {"authorization": f"Bearer {LITELLM_KEY}"}
        return _launch(
            Peer("litellm", _chat(port), "null-model", headers),
            cmd,
            f"http://127.0.0.1:{port}/health/liveliness",
            tmp,
            env,
        )
    if name in ("vllm-router", "vllm-router-rr"):
        exe = VENV / "bin" / "vllm-router"
        if not exe.exists():
            return Unavailable(name, f"{exe} missing ({SETUP_HINT})")
        port = free_port()
        cmd = [str(exe), "--host", "127.0.0.1", "--port", str(port)]
        cmd += ["--worker-urls", upstream, "--log-level", "warning"]
        cmd += ["--prometheus-port", str(free_port())]
        if name == "vllm-router-rr":
            cmd += ["--policy", "round_robin"]
        return _launch(
            Peer(name, _chat(port), "null"),
            cmd,
            f"http://127.0.0.1:{port}/health",
            tmp,
        )
    raise ValueError(f"unknown peer {name!r}")


def _chat(port: int) -> str:
    return f"http://127.0.0.1:{port}/v1/chat/completions"


def start_gpufleet(
    tmp: Path, *, name: str = "gpufleet", src: Path | None = None, fleet: Fleet | None = None
) -> Peer | Unavailable:
    """``gpufleet up`` from ``src`` (this checkout's ``src`` when None) serving ``fleet``, ready
    (one replica ready, its user key made, one request answered by the null engine)."""
    src = (src or ROOT / "src").absolute()
    fleet = fleet or Fleet()
    if not (src / "gpufleet" / "__init__.py").exists():
        return Unavailable(name, f"{src} holds no gpufleet package")
    work = tmp / name.replace(":", "-")
    work.mkdir()
    spec = work / "fleet.yaml"
    spec.write_text(fleet.yaml(ROOT / "tests" / "data" / "configs" / "llama-3-8b.json"))
    engine = [sys.executable, str(ROOT / "bench" / "null_engine.py"), "{port}", *ENGINE_ARGS]
    if ENGINE_CPU is not None:
        engine = ["taskset", "-c", str(ENGINE_CPU), *engine]
    port = free_port()
    cmd = [sys.executable, "-m", "gpufleet", "up", "-f", str(spec), "--port", str(port)]
    cmd += ["--data-dir", str(work / "data"), *GPUFLEET_ARGS]
    env = {
        "PYTHONPATH": os.pathsep.join(p for p in (str(src), os.environ.get("PYTHONPATH")) if p),
        "GPUFLEET_ADMIN_KEY": BENCH_KEY,
        "GPUFLEET_EMULATOR_COMMAND": shlex.join(engine),
    }
    peer = Peer(name, _chat(port), "null-model", alone=True, data_dir=work / "data")

    def user_key(peer: Peer) -> str | None:
        """The requests' key: a user key of tenant ``bench``, so its quotas are checked."""
        if "--no-auth" not in GPUFLEET_ARGS:
            body = {"tenant": "bench", "name": "bench", "role": "user", "limits": LIMITS}
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/admin/v1/keys",
                data=json.dumps(body).encode(),
                headers={"authorization": f"Bearer {BENCH_KEY}"},
            )
            try:
                with urllib.request.urlopen(request, timeout=30) as resp:
                    key = json.loads(resp.read())["key"]
            except (OSError, KeyError, ValueError) as exc:
                return f"cannot make its user key: {exc}"
            peer.headers["authorization"] = f"Bearer {key}"
        peer.headers.update(GPUFLEET_HEADERS)
        return None

    preexec = None if fleet.nofile is None else open_files(fleet.nofile)
    return _launch(peer, cmd, f"http://127.0.0.1:{port}/readyz", work, env, user_key, preexec)


def _litellm_config(upstream: str) -> str:
    return f"""model_list:
  - model_name: null-model
    litellm_params:
      model: openai/null
      api_base: {upstream}/v1
      api_key: none
litellm_settings:
  set_verbose: false
  request_timeout: 600
general_settings:
  master_key: {LITELLM_KEY}
"""


def _launch(
    peer: Peer,
    cmd: list[str],
    ready: str,
    tmp: Path,
    env: dict[str, str] | None = None,
    prepare: Callable[[Peer], str | None] | None = None,
    preexec: Callable[[], None] | None = None,
) -> Peer | Unavailable:
    """Start ``cmd`` (``preexec`` run in the child before it execs), wait until ``ready``
    answers 200, run ``prepare`` (None or why it failed), and send one real request; any
    failure is an ``Unavailable`` with its log."""
    log = tmp / f"{peer.name.replace(':', '-')}.log"
    started = time.perf_counter()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            preexec_fn=preexec,
        )
    peer.proc, peer.log = proc, log
    why = _wait_ready(proc, ready)
    if why is None and prepare is not None:
        why = prepare(peer)
    if why is None:
        why = _smoke(peer)
    if why is not None:
        peer.close()
        tail = log.read_text(errors="replace").splitlines()[-25:]
        print(f"--- {peer.name} failed to start ({why}); last lines of {log}:", file=sys.stderr)
        print("\n".join(tail), file=sys.stderr)
        return Unavailable(peer.name, f"failed to start: {why}")
    peer.start_s = time.perf_counter() - started
    return peer


def _wait_ready(proc: subprocess.Popen[bytes], url: str) -> str | None:
    deadline = time.perf_counter() + START_TIMEOUT_S
    while time.perf_counter() < deadline:
        if proc.poll() is not None:
            return f"exited with {proc.returncode}"
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return None
        except (OSError, urllib.error.HTTPError):
            pass
        time.sleep(0.1)
    return f"not ready after {START_TIMEOUT_S:.0f} s"


def _smoke(peer: Peer) -> str | None:
    """One real request, so a peer that is up but cannot reach the engine is caught here."""
    body = b'{"model":"%s","messages":[{"role":"user","content":"hi"}]}' % peer.model.encode()
    headers = {"content-type": "application/json", **peer.headers}
    try:
        with urllib.request.urlopen(
            urllib.request.Request(peer.url, data=body, headers=headers), timeout=60
        ) as resp:
            text = resp.read()
    except urllib.error.HTTPError as exc:
        return f"smoke request answered {exc.code}: {exc.read()[:200]!r}"
    except OSError as exc:
        return f"smoke request failed: {exc}"
    if EMULATED.encode() in text:
        return (
            "answered by the engine emulator, not the null engine: this gpufleet has no "
            "GPUFLEET_EMULATOR_COMMAND (bench/gateway_process.py says how to add it)"
        )
    return None if b'"content":"ok' in text else f"unexpected answer {text[:200]!r}"


def process_tree(pid: int, family: bool = True) -> list[int]:
    """The process and all its descendants (LiteLLM may fork workers); with ``family`` False,
    the process alone."""
    if not family:
        return [pid]
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
    return found


def pin(pid: int, cpu: int, *, family: bool = True) -> None:
    """All threads of the process (and its descendants, with ``family``) onto core ``cpu``."""
    for p in process_tree(pid, family):
        subprocess.run(
            ["taskset", "-a", "-p", "-c", str(cpu), str(p)], check=True, capture_output=True
        )


def cpu_seconds(pid: int, *, family: bool = True) -> float:
    """CPU time of the process tree (the process alone without ``family``), all threads:
    nanosecond run times from schedstat, where the kernel keeps them (clock ticks of 10 ms
    would blur a Rust proxy's ~70 µs requests)."""
    total = 0.0
    for p in process_tree(pid, family):
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                total += int((task / "schedstat").read_text().split()[0]) / 1e9
            except FileNotFoundError:
                return _cpu_ticks(pid, family)
            except OSError:
                continue
    return total


def _cpu_ticks(pid: int, family: bool) -> float:
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for p in process_tree(pid, family):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / ticks


def core_times(cpu: int) -> dict[str, float]:
    """Seconds core ``cpu`` has spent, by kind: ``tasks`` (any process, user and system),
    ``softirq`` (interrupts, mostly the loopback network stack), ``steal`` and ``idle``."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{cpu} "):
            user, nice, system, idle, iowait, irq, softirq, steal = map(int, line.split()[1:9])
            hz = os.sysconf("SC_CLK_TCK")
            return {
                "tasks": (user + nice + system) / hz,
                "softirq": (irq + softirq) / hz,
                "steal": steal / hz,
                "idle": (idle + iowait) / hz,
            }
    raise ValueError(f"no cpu{cpu} in /proc/stat")
