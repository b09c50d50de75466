"""No engine outlives gpufleet: not after Ctrl-C, not after SIGTERM, not after SIGKILL."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.integration.fleet import alive, start_fleet, wait_until

pytestmark = pytest.mark.engine


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_graceful_stop_leaves_no_process(tmp_path: Path, sig: signal.Signals) -> None:
    fleet = start_fleet(tmp_path / "data")  # no file: the default SmolLM2 model
    (replica,) = fleet.replicas()
    assert replica["model"] == "smollm2" and alive(replica["pid"])
    assert fleet.stop(sig) == 0
    assert not alive(replica["pid"])
    assert "Traceback" not in fleet.stderr()


def test_engines_die_with_a_killed_gpufleet(tmp_path: Path) -> None:
    fleet = start_fleet(tmp_path / "data")
    pids = fleet.engine_pids()
    assert pids
    fleet.stop(signal.SIGKILL)
    wait_until(lambda: not [p for p in pids if alive(p)], timeout=10)


def test_state_survives_a_restart(tmp_path: Path) -> None:
    fleet = start_fleet(tmp_path / "data")
    first = fleet.admin("/admin/v1/models")["models"]
    fleet.stop()
    again = start_fleet(tmp_path / "data")
    try:
        models = again.admin("/admin/v1/models")["models"]
        assert [(m["name"], m["generation"]) for m in models] == [
            (m["name"], m["generation"]) for m in first
        ]
    finally:
        again.stop()
