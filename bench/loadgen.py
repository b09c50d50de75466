"""Closed-loop load at fixed concurrency, pinned to one core: how many requests/s a path takes.

wrk (C, epoll; ``apt-get install wrk``) when it is installed, else this file's own generator:
aiohttp on uvloop, one process (the load generator has one core; more processes would only
share it). A Python generator tops out far sooner than wrk, so the bench reports which one ran
and whether the proxy's core was saturated at all. Either reports the requests' latency at
``PERCENTILES`` (wrk from its histogram, through a ``done`` hook in its script).
Run (the Python generator alone): python bench/loadgen.py URL SECONDS CONNECTIONS BODY_FILE
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["PERCENTILES", "Load", "run_load", "tool"]

PERCENTILES = (50.0, 90.0, 99.0, 99.9)


@dataclass(frozen=True)
class Load:
    requests: int
    errors: int
    seconds: float
    #: Percentile → latency in ms, for ``PERCENTILES``.
    latency_ms: dict[float, float] = field(default_factory=dict)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds


PREFER = "auto"  # or "wrk" or "python"


def tool() -> str:
    if PREFER == "wrk" or (PREFER == "auto" and shutil.which("wrk")):
        return "wrk"
    return "python (aiohttp + uvloop)"


def run_load(
    url: str, body: bytes, headers: dict[str, str], seconds: float, connections: int, cpu: int
) -> Load:
    with tempfile.TemporaryDirectory() as tmp:
        if tool() == "wrk":
            return _wrk(url, body, headers, seconds, connections, cpu, Path(tmp))
        return _python(url, body, headers, seconds, connections, cpu, Path(tmp))


def _wrk(
    url: str,
    body: bytes,
    headers: dict[str, str],
    seconds: float,
    connections: int,
    cpu: int,
    tmp: Path,
) -> Load:
    lines = ['wrk.method = "POST"', f"wrk.body = [[{body.decode()}]]"]
    for k, v in {"content-type": "application/json", **headers}.items():
        lines.append(f'wrk.headers["{k}"] = "{v}"')
    lines += [
        "function done(summary, latency, requests)",
        f"  for _, p in ipairs({{{', '.join(map(str, PERCENTILES))}}}) do",
        '    io.write(string.format("latency-us %g %.0f\\n", p, latency:percentile(p)))',
        "  end",
        "end",
    ]
    script = tmp / "post.lua"
    script.write_text("\n".join(lines) + "\n")
    cmd = ["taskset", "-c", str(cpu), "wrk", "-t1", f"-c{connections}", f"-d{seconds:.0f}s"]
    cmd += ["--timeout", "10s", "-s", str(script), url]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    done = re.search(r"(\d+) requests in ([\d.]+)(m?s|m)\b", out)
    if done is None:
        raise RuntimeError(f"cannot read wrk's output:\n{out}")
    unit = {"s": 1.0, "ms": 0.001, "m": 60.0}[done.group(3)]
    errors = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses: (\d+)", out))
    socket = re.search(r"connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if socket is not None:
        errors += sum(int(n) for n in socket.groups())
    latency = {float(p): int(us) / 1000 for p, us in re.findall(r"latency-us ([\d.]+) (\d+)", out)}
    return Load(int(done.group(1)), errors, float(done.group(2)) * unit, latency)


def _python(
    url: str,
    body: bytes,
    headers: dict[str, str],
    seconds: float,
    connections: int,
    cpu: int,
    tmp: Path,
) -> Load:
    spec = tmp / "spec.json"
    spec.write_text(json.dumps({"body": body.decode(), "headers": headers}))
    cmd = ["taskset", "-c", str(cpu), sys.executable, __file__, url, str(seconds)]
    cmd += [str(connections), str(spec)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    result = json.loads(out)
    latency = {float(p): ms for p, ms in result["latency_ms"].items()}
    return Load(result["requests"], result["errors"], result["seconds"], latency)


async def _drive(
    url: str, seconds: float, connections: int, body: bytes, headers: dict[str, str]
) -> dict[str, object]:
    import aiohttp

    counts = {"requests": 0, "errors": 0}
    took: list[float] = []
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as http:
        start = time.perf_counter()
        deadline = start + seconds

        async def worker() -> None:
            while time.perf_counter() < deadline:
                sent = time.perf_counter()
                async with http.post(url, data=body, headers=headers) as resp:
                    await resp.read()
                    counts["requests" if resp.status == 200 else "errors"] += 1
                took.append(time.perf_counter() - sent)

        await asyncio.gather(*(worker() for _ in range(connections)))
        seconds = time.perf_counter() - start
    took.sort()
    latency = {
        p: took[min(len(took) - 1, round(p / 100 * (len(took) - 1)))] * 1000
        for p in (PERCENTILES if took else ())
    }
    return {**counts, "seconds": seconds, "latency_ms": latency}


if __name__ == "__main__":
    import uvloop

    url, secs, conns, spec_file = sys.argv[1:5]
    spec = json.loads(Path(spec_file).read_text())
    headers = {"content-type": "application/json", **spec["headers"]}
    result = uvloop.run(_drive(url, float(secs), int(conns), spec["body"].encode(), headers))
    print(json.dumps(result))
