"""The proxies the gateway is compared with, started as their docs recommend for production.

Each peer is launched as a child process with its output in a log file; one that is missing or
fails to start becomes an ``Unavailable`` with the reason (and its log's tail on stderr), so the
comparison still runs without it. The peers live in their own virtualenv,
``.cache/bench-peers``, made by ``scripts/setup-bench-peers`` — LiteLLM pins dozens of packages
that have no business in gpufleet's environment.

- gpufleet: ``bench/gateway_only.py`` (the production ``build_app`` under uvloop + httptools,
  with whatever auth, quotas and ledger it turns on); ``GPUFLEET_ARGS`` is appended to its
  command line, ``GPUFLEET_HEADERS`` (its bench key) to every request.
- LiteLLM proxy: one uvicorn worker (its docs: one worker per pod, scale out with pods),
  a master key (it refuses to start without one), no database, no callbacks,
  ``LITELLM_LOG=ERROR``; the model is ``openai/null`` with ``api_base`` the null engine.
- vllm-router (Rust): log level ``warning``, otherwise its defaults — the ``cache_aware``
  policy, which for every request first asks the engine for ``/v1/chat/completions/render`` and
  ``/tokenize`` (the null engine answers both 404 at once; vLLM would tokenize), so it is also
  run as ``vllm-router-rr`` with ``--policy round_robin``: the Rust proxy's floor.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import common
from common import ROOT, free_port, stop

__all__ = [
    "GPUFLEET_ARGS",
    "GPUFLEET_HEADERS",
    "VENV",
    "Peer",
    "Unavailable",
    "core_times",
    "cpu_seconds",
    "pin",
    "start",
]

VENV = Path(os.environ.get("GPUFLEET_PEERS_VENV", ROOT / ".cache" / "bench-peers")).absolute()
GPUFLEET_ARGS: list[str] = []
# bench/gateway_only.py authenticates with common.AUTH unless given --no-auth
GPUFLEET_HEADERS: dict[str, str] = dict(getattr(common, "AUTH", {}))
LITELLM_KEY = "sk-bench-5e0c3a1f9b2d4c6e8a7f1b3d5c9e2a4f"
START_TIMEOUT_S = 180.0
SETUP_HINT = "run scripts/setup-bench-peers"


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

    def close(self) -> None:
        if self.proc is not None:
            stop(self.proc)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Unavailable:
    name: str
    reason: str


def start(name: str, upstream_port: int, tmp: Path) -> Peer | Unavailable:
    upstream = f"http://127.0.0.1:{upstream_port}"
    if name == "direct":
        return Peer("direct", f"{upstream}/v1/chat/completions", "null")
    if name == "gpufleet":
        port = free_port()
        cmd = [sys.executable, "bench/gateway_only.py", str(port), upstream, *GPUFLEET_ARGS]
        return _launch(
            Peer("gpufleet", _chat(port), "null-model", dict(GPUFLEET_HEADERS)),
            cmd,
            f"http://127.0.0.1:{port}/readyz",
            tmp,
        )
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
    peer: Peer, cmd: list[str], ready: str, tmp: Path, env: dict[str, str] | None = None
) -> Peer | Unavailable:
    log = tmp / f"{peer.name}.log"
    started = time.perf_counter()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
    peer.proc, peer.log = proc, log
    why = _wait_ready(proc, ready)
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
    return None if b'"ok"' in text else f"unexpected answer {text[:200]!r}"


def _family(pid: int) -> list[int]:
    """The process and all its descendants (LiteLLM may fork workers)."""
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


def pin(pid: int, cpu: int) -> None:
    for p in _family(pid):
        subprocess.run(
            ["taskset", "-a", "-p", "-c", str(cpu), str(p)], check=True, capture_output=True
        )


def cpu_seconds(pid: int) -> float:
    """CPU time of the process tree, all threads: nanosecond run times from schedstat, where
    the kernel keeps them (clock ticks of 10 ms would blur a Rust proxy's ~70 µs requests)."""
    total = 0.0
    for p in _family(pid):
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                total += int((task / "schedstat").read_text().split()[0]) / 1e9
            except FileNotFoundError:
                return _cpu_ticks(pid)
            except OSError:
                continue
    return total


def _cpu_ticks(pid: int) -> float:
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for p in _family(pid):
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
