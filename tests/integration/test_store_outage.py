"""A PostgreSQL outage under ``gpufleet up``: reported, not shouted (issue 16).

The store is a PostgreSQL server of the test's own, stopped and started again. While it is
away the admin API's store routes answer OpenAI's ``503 store_unavailable`` with Retry-After
(not a 500 that points at the log), the log says once that the store is down — no traceback
each batch-runner pass — and once that it is back; the admin API answers 200 again.
"""

from __future__ import annotations

import json
import signal
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.postgres_server import PostgresServer
from tests.integration.fleet import ADMIN_KEY, SMOLLM2_YAML, Fleet, start_fleet, wait_until

pytestmark = pytest.mark.engine


@pytest.fixture
def postgres() -> Iterator[PostgresServer]:
    with PostgresServer() as server:
        yield server


def usage(fleet: Fleet) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(
        fleet.server + "/admin/v1/usage?by=model", headers={"authorization": f"Bearer {ADMIN_KEY}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def metric(fleet: Fleet, line: str) -> bool:
    with urllib.request.urlopen(fleet.server + "/metrics", timeout=10) as resp:
        return line in resp.read().decode()


def test_a_store_outage_is_one_line_down_503s_and_one_line_back(
    tmp_path: Path, postgres: PostgresServer
) -> None:
    models = tmp_path / "models.yaml"
    models.write_text(SMOLLM2_YAML)
    fleet = start_fleet(tmp_path / "data", models, options=("--store", postgres.url))
    try:
        status, _, _ = usage(fleet)
        assert status == 200
        assert metric(fleet, 'gpufleet_dependency_up{dependency="store"} 1.0')

        postgres.stop()
        answers = [usage(fleet) for _ in range(5)]
        for status, headers, body in answers:
            assert status == 503, body
            assert headers["retry-after"] == "5"
            error = json.loads(body)["error"]
            assert error["code"] == "store_unavailable"
            assert error["type"] == "service_unavailable"
            assert b"Traceback" not in body and b"psycopg" not in body
        assert metric(fleet, 'gpufleet_dependency_up{dependency="store"} 0.0')
        # The batch runner passes every 0.5 s: a few seconds of them make a flood if each logs.
        wait_until(lambda: _failures(fleet) >= 15, timeout=60)
        during = fleet.stderr()
        assert during.count("store is down") == 1, during[-3000:]
        assert "Traceback" not in during, during[-3000:]

        postgres.start()
        wait_until(lambda: usage(fleet)[0] == 200, timeout=60)
        wait_until(lambda: "store is back after" in fleet.stderr(), timeout=30)
        assert metric(fleet, 'gpufleet_dependency_up{dependency="store"} 1.0')
        after = fleet.stderr()
        assert after.count("store is down") == 1 and after.count("store is back") == 1
        assert "Traceback" not in after
        assert len(after.splitlines()) < 200, after[-3000:]  # not a flood
    finally:
        fleet.stop(signal.SIGTERM)


def _failures(fleet: Fleet) -> float:
    """gpufleet_dependency_failures_total{dependency="store"} as served."""
    with urllib.request.urlopen(fleet.server + "/metrics", timeout=10) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith('gpufleet_dependency_failures_total{dependency="store"}'):
                return float(line.split()[-1])
    return 0.0
