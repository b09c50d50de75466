"""The crash window on the real engine: llama.cpp SIGKILLed under one replica of SmolLM2, and
requests (plain and streamed) sent at once, before the runtime has seen the crash — or one
request in flight on the engine as it dies. They are held and answered once the engine is back
— or, with a hold bound shorter than the restart, answered 503 with Retry-After; never 502.
The request the engine died under has one ledger row, naming the replica that had it."""

from __future__ import annotations

import json
import os
import signal
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from tests.integration.fleet import (
    ADMIN_KEY,
    SMOLLM2_YAML,
    Fleet,
    alive,
    start_fleet,
    wait_until,
)

#: Each request: (status, Retry-After, body); a stream's body is its whole event text.
Answer = tuple[int, str | None, bytes]


def fleet_with(root: Path, *options: str) -> Iterator[Fleet]:
    models = root / "models.yaml"
    models.write_text(SMOLLM2_YAML)
    fleet = start_fleet(root / "data", models, options=options)
    yield fleet
    pids = fleet.engine_pids()
    assert fleet.stop(signal.SIGTERM) == 0, fleet.stderr()
    assert not [p for p in pids if alive(p)]


@pytest.fixture
def patient(tmp_path: Path) -> Iterator[Fleet]:
    yield from fleet_with(tmp_path, "--hold-seconds", "120")


@pytest.fixture
def hasty(tmp_path: Path) -> Iterator[Fleet]:
    yield from fleet_with(tmp_path, "--hold-seconds", "0.2")


def ask(fleet: Fleet, stream: bool) -> Answer:
    body = {
        "model": "smollm2",
        "messages": [{"role": "user", "content": "Say hi"}],
        "max_tokens": 4,
        "stream": stream,
    }
    with requests.post(
        fleet.base_url + "/chat/completions",
        json=body,
        headers={"authorization": f"Bearer {ADMIN_KEY}"},
        stream=stream,
        timeout=180,
    ) as resp:
        return resp.status_code, resp.headers.get("retry-after"), resp.content


def kill_and_ask(fleet: Fleet, n: int = 3) -> tuple[dict[str, object], list[Answer]]:
    """SIGKILL the engine, then at once ``n`` plain and ``n`` streamed requests."""
    (before,) = fleet.replicas("smollm2")
    os.kill(before["pid"], signal.SIGKILL)
    with ThreadPoolExecutor(2 * n) as pool:
        futures = [pool.submit(ask, fleet, i % 2 == 1) for i in range(2 * n)]
        return before, [f.result() for f in futures]


def restarted(fleet: Fleet, before: dict[str, object]) -> bool:
    return any(
        r["phase"] == "Ready" and r["pid"] != before["pid"] for r in fleet.replicas("smollm2")
    )


def test_requests_in_the_crash_window_are_held_and_answered(patient: Fleet) -> None:
    before, answers = kill_and_ask(patient)
    for i, (status, _, body) in enumerate(answers):
        assert status == 200, body
        if i % 2:
            assert body.startswith(b"data: ") and body.rstrip().endswith(b"data: [DONE]")
        else:
            assert json.loads(body)["choices"][0]["message"]["content"] is not None
    assert restarted(patient, before)  # answered by the engine that came back
    assert "could not connect" not in "".join(b.decode() for _, _, b in answers)


def test_a_hold_shorter_than_the_restart_is_503_with_retry_after(hasty: Fleet) -> None:
    before, answers = kill_and_ask(hasty)
    # Loading SmolLM2 takes far longer than the 0.2 s hold: the first requests find no engine.
    assert answers[0][0] == 503
    for status, retry_after, body in answers:
        assert status in (200, 503), body  # never 502
        if status == 503:
            assert retry_after is not None and int(retry_after) >= 1
            error = json.loads(body)["error"]
            assert (error["type"], error["code"]) == ("service_unavailable", "no_ready_replica")
    wait_until(lambda: restarted(hasty, before), timeout=120)
    status, _, body = ask(hasty, False)
    assert status == 200, body


def metric(fleet: Fleet, name: str) -> float:
    """A sample of the gateway's ``/metrics`` (``name`` with its labels, as exposed)."""
    with urllib.request.urlopen(fleet.server + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def cpu_seconds(pid: int) -> float:
    """CPU time ``pid`` has used (user + system)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def ask_long(fleet: Fleet, rid: str) -> Answer:
    """A plain request that generates 256 tokens (``min_tokens``: no early end of sequence),
    a second or more on CPU: long enough to be killed under."""
    body = {
        "model": "smollm2",
        "messages": [{"role": "user", "content": "Write a long story about the sea."}],
        "max_tokens": 256,
        "min_tokens": 256,
    }
    with requests.post(
        fleet.base_url + "/chat/completions",
        json=body,
        headers={"authorization": f"Bearer {ADMIN_KEY}", "x-request-id": rid},
        timeout=600,
    ) as resp:
        return resp.status_code, resp.headers.get("retry-after"), resp.content


def kill_under_a_request(fleet: Fleet, rid: str) -> tuple[dict[str, object], Answer]:
    """SIGKILL the engine while it computes a plain request's answer."""
    (before,) = fleet.replicas("smollm2")
    pid = int(str(before["pid"]))
    with ThreadPoolExecutor(1) as pool:
        asked = pool.submit(ask_long, fleet, rid)
        wait_until(lambda: metric(fleet, "gpufleet_requests_in_flight") == 1, timeout=60)
        idle = cpu_seconds(pid)
        wait_until(lambda: cpu_seconds(pid) > idle + 0.2, timeout=60)  # it computes
        os.kill(pid, signal.SIGKILL)
        answer = asked.result()
    # The engine died under the request (its connection broke), not before it was sent.
    assert metric(fleet, 'gpufleet_upstream_errors_total{kind="read"') == 1
    return before, answer


def row_of(fleet: Fleet, rid: str) -> dict[str, object]:
    rows = fleet.admin("/admin/v1/usage/requests?limit=1000")["requests"]
    (row,) = [r for r in rows if r["client_request_id"] == rid]
    return dict(row)


def test_a_request_its_engine_dies_under_is_held_and_answered(patient: Fleet) -> None:
    before, (status, _, body) = kill_under_a_request(patient, "died-under-1")
    assert status == 200, body
    assert json.loads(body)["usage"]["completion_tokens"] == 256
    assert restarted(patient, before)  # answered by the engine that came back
    row = row_of(patient, "died-under-1")  # one row (GPU time: SmolLM2 runs on no GPU)
    assert row["status"] == 200 and row["replica"] == before["id"]


def test_a_request_its_engine_dies_under_is_503_when_the_hold_ends_first(hasty: Fleet) -> None:
    before, (status, retry_after, body) = kill_under_a_request(hasty, "died-under-2")
    assert status == 503, body  # never 502
    assert retry_after is not None and int(retry_after) >= 1
    error = json.loads(body)["error"]
    assert (error["type"], error["code"]) == ("service_unavailable", "no_ready_replica")
    # One row all the same, naming the replica that had it (tests/unit/test_crash_window.py
    # has its GPU time and price on an emulated GPU).
    row = row_of(hasty, "died-under-2")
    assert row["status"] == 503 and row["replica"] == before["id"]
    assert float(str(row["duration_ms"])) > 0
