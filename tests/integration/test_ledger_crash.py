"""gpufleet SIGKILLed right after answering: every answered request has exactly one ledger row
after it starts again on the same data directory (the spool is replayed); a stream the engine
broke has its row with its status; refusals (429) are counted in the daily rollup."""

from __future__ import annotations

import http.client
import json
import os
import signal
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.integration.fleet import (
    ADMIN_KEY,
    SMOLLM2_YAML,
    Fleet,
    alive,
    gpufleet,
    start_fleet,
    wait_until,
)

pytestmark = pytest.mark.engine

N = 24


def post(fleet: Fleet, key: str, rid: str, body: dict[str, Any]) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", fleet.port, timeout=120)
    conn.request(
        "POST",
        "/v1/chat/completions",
        body=json.dumps(body),
        headers={
            "authorization": f"Bearer {key}",
            "x-request-id": rid,
            "content-type": "application/json",
        },
    )
    return conn.getresponse()


def ask(fleet: Fleet, key: str, rid: str, *, stream: bool, max_tokens: int = 8) -> tuple[int, str]:
    """One chat request; its status and the echoed x-request-id (read to the stream's end)."""
    body: dict[str, Any] = {
        "model": "smollm2",
        "messages": [{"role": "user", "content": f"Say a word about {rid}"}],
        "max_tokens": max_tokens,
        "stream": stream,
    }
    resp = post(fleet, key, rid, body)
    text = resp.read().decode()
    assert not stream or resp.status != 200 or "[DONE]" in text, text[-300:]
    return resp.status, str(resp.getheader("x-request-id"))


def rows_by_client_id(fleet: Fleet) -> dict[str, list[dict[str, Any]]]:
    rows = fleet.admin("/admin/v1/usage/requests?limit=10000")["requests"]
    out: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault(r["client_request_id"], []).append(r)
    return out


def test_every_answered_request_has_one_row_after_a_sigkill(tmp_path: Path) -> None:
    models = tmp_path / "models.yaml"
    models.write_text(SMOLLM2_YAML)
    data = tmp_path / "data"
    fleet = start_fleet(data, models)
    cli = {"GPUFLEET_SERVER": fleet.server}
    try:
        made = gpufleet("tenants", "create", "acme", "--rpm", "1", env=cli)
        assert made.returncode == 0, made.stderr
        key = gpufleet("keys", "create", "--tenant", "acme", "--name", "app", env=cli)
        assert key.returncode == 0, key.stderr
        acme = key.stdout.strip()
        # Over acme's one request a minute: one answer, then 429s (counted, not rows).
        limited = [ask(fleet, acme, f"rl-{i}", stream=False, max_tokens=2) for i in range(3)]
        assert [s for s, _ in limited] == [200, 429, 429]

        with ThreadPoolExecutor(8) as pool:
            answers = list(
                pool.map(lambda i: ask(fleet, ADMIN_KEY, f"crash-{i}", stream=i % 2 == 0), range(N))
            )
        assert [s for s, _ in answers] == [200] * N

        # A stream the engine breaks: its engine SIGKILLed after the first bytes.
        (engine,) = fleet.engine_pids()
        body = {
            "model": "smollm2",
            "messages": [{"role": "user", "content": "Write a long story about the sea."}],
            "max_tokens": 1500,
            "stream": True,
        }
        resp = post(fleet, ADMIN_KEY, "broken-1", body)
        assert resp.status == 200
        assert resp.read1(65536).startswith(b"data: ")
        os.kill(engine, signal.SIGKILL)
        rest = resp.read().decode()
        assert '"error"' in rest and "[DONE]" not in rest
        # Every answer is in; gpufleet dies at once, no graceful flush.
        fleet.stop(signal.SIGKILL)
        wait_until(lambda: not alive(engine), timeout=10)
    finally:
        if fleet.proc.poll() is None:
            fleet.stop(signal.SIGKILL)

    again = start_fleet(data, models)
    try:
        rows = rows_by_client_id(again)
        answered = [rid for _, rid in answers] + ["rl-0"]
        counts = Counter({rid: len(rows.get(rid, [])) for rid in answered})
        assert all(n == 1 for n in counts.values()), counts
        assert {r["status"] for rid in answered for r in rows[rid]} == {200}
        (broken,) = rows["broken-1"]
        assert broken["status"] == 502 and broken["completion_tokens"] > 0
        assert broken["replica"]  # the replica that broke it
        assert not rows.get("rl-1") and not rows.get("rl-2")  # refusals: counted, not rows
        report = again.admin("/admin/v1/usage?by=tenant")
        refused = [r for r in report["refusals"] if r["tenant"] == "acme" and r["status"] == 429]
        assert sum(r["refused"] for r in refused) == 2, report["refusals"]
        shown = gpufleet("usage", "--server", again.server)
        assert shown.returncode == 0, shown.stderr
        assert "refused before an engine" in shown.stdout
        assert [line for line in shown.stdout.splitlines() if "acme" in line and "429" in line]
    finally:
        pids = again.engine_pids()
        assert again.stop(signal.SIGTERM) == 0, again.stderr()
        assert not [p for p in pids if alive(p)]
