"""Closed-loop load at fixed concurrency, pinned to one core: how many requests/s a path takes.

wrk (C, epoll; ``apt-get install wrk``) when it is installed, else this file's own generator:
aiohttp on uvloop, one process (the load generator has one core; more processes would only
share it). A Python generator tops out far sooner than wrk, so the bench reports which one ran
and whether the proxy's core was saturated at all.
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
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Load", "run_load", "tool"]


@dataclass(frozen=True)
class Load:
    requests: int
    errors: int
    seconds: float

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
    return Load(int(done.group(1)), errors, float(done.group(2)) * unit)


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
    return Load(result["requests"], result["errors"], result["seconds"])


async def _drive(
    url: str, seconds: float, connections: int, body: bytes, headers: dict[str, str]
) -> dict[str, float]:
    import aiohttp

    counts = {"requests": 0, "errors": 0}
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as http:
        start = time.perf_counter()
        deadline = start + seconds

        async def worker() -> None:
            while time.perf_counter() < deadline:
                async with http.post(url, data=body, headers=headers) as resp:
                    await resp.read()
                    counts["requests" if resp.status == 200 else "errors"] += 1

        await asyncio.gather(*(worker() for _ in range(connections)))
        return {**counts, "seconds": time.perf_counter() - start}


if __name__ == "__main__":
    import uvloop

    url, secs, conns, spec_file = sys.argv[1:5]
    spec = json.loads(Path(spec_file).read_text())
    headers = {"content-type": "application/json", **spec["headers"]}
    result = uvloop.run(_drive(url, float(secs), int(conns), spec["body"].encode(), headers))
    print(json.dumps(result))
