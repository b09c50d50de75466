"""Start-up measured under ``gpufleet up``, on the engine emulator made to load slowly: the
local runtime's figures in the admin API and ``gpufleet get replicas``, the ``ReplicaReady``
event's sentence, the histogram on /metrics, and a restart's own figures."""

from __future__ import annotations

import json
import os
import re
import signal
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.integration.fleet import gpufleet, start_fleet, wait_until

CONFIGS = Path(__file__).parents[1] / "data" / "configs"
#: The emulator answers 503 on its health path (and every other) for this long after it starts.
SLOW_START_S = 1.5


def startup_samples(server: str) -> dict[tuple[str, str], float]:
    """``gpufleet_replica_startup_seconds`` _count and _sum of model ``slow``, by phase."""
    with urllib.request.urlopen(server + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    found: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "gpufleet_replica_startup_seconds":
            continue
        for s in family.samples:
            if s.labels.get("model") == "slow" and s.name.endswith(("_count", "_sum")):
                found[(s.labels["phase"], s.name.rsplit("_", 1)[1])] = s.value
    return found


def test_start_up_is_measured_per_phase_and_shown_everywhere(tmp_path: Path) -> None:
    spec = tmp_path / "models.yaml"
    spec.write_text(
        "apiVersion: gpufleet.io/v1alpha1\nkind: Model\nmetadata: {name: slow}\n"
        f"spec:\n  source: file:{CONFIGS / 'llama-3-8b.json'}\n  engine: emulator\n"
        "  resources: {gpus: 1, gpuTypes: [H100]}\n"
        f"  engineArgs: ['--slow-start-s', '{SLOW_START_S}']\n"
    )
    fleet = start_fleet(tmp_path / "data", spec)
    try:
        (replica,) = wait_until(
            lambda: [r for r in fleet.replicas("slow") if r["phase"] == "Ready"], 30
        )
        # Fetch: the weights' look-up (nothing is downloaded here). Load: from the launch to
        # the health path's first 2xx, the emulated slow start and the interpreter's start-up.
        # First probe: one listing after that. The whole: those, and the launch itself.
        assert 0 <= replica["fetch_s"] < 0.5
        assert replica["load_s"] >= SLOW_START_S
        assert 0 <= replica["ready_s"] < 0.5
        parts = replica["fetch_s"] + replica["load_s"] + replica["ready_s"]
        assert parts <= replica["startup_s"] < parts + 0.5
        assert replica["fetched_bytes"] is None and replica["weights_bytes"] is None

        events = fleet.admin("/admin/v1/events?model=slow")["events"]
        (ready,) = [e["message"] for e in events if e["reason"] == "ReplicaReady"]
        assert ready == (
            f"replica {replica['id']}: ready in {replica['startup_s']:.1f} s "
            f"(fetch {replica['fetch_s']:.1f} s, load {replica['load_s']:.1f} s, "
            f"first probe {replica['ready_s']:.1f} s)"
        )

        samples = wait_until(lambda: startup_samples(fleet.server), 10)
        assert {k: v for k, v in samples.items() if k[1] == "count"} == {
            ("fetch", "count"): 1.0,
            ("load", "count"): 1.0,
            ("ready", "count"): 1.0,
        }
        assert samples[("load", "sum")] == replica["load_s"]

        wide = gpufleet("get", "replicas", "-o", "wide", "--server", fleet.server)
        assert wide.returncode == 0, wide.stderr
        header, *rows = wide.stdout.splitlines()
        assert all(column in header.split() for column in ("STARTUP", "FETCH", "LOAD", "PROBE"))
        (row,) = [r for r in rows if replica["id"] in r]
        assert f"{replica['startup_s']:.1f} s" in row and f"{replica['load_s']:.1f} s" in row
        listed = gpufleet("get", "replicas", "-o", "json", "--server", fleet.server)
        (shown,) = [r for r in json.loads(listed.stdout) if r["id"] == replica["id"]]
        assert {k: shown[k] for k in ("fetch_s", "load_s", "ready_s", "startup_s")} == {
            k: replica[k] for k in ("fetch_s", "load_s", "ready_s", "startup_s")
        }

        # A restart: a start of its own, which fetched nothing.
        os.kill(replica["pid"], signal.SIGKILL)

        def restarted() -> dict[str, Any] | None:
            return next(
                (
                    r
                    for r in fleet.replicas("slow")
                    if r["phase"] == "Ready" and r["restarts"] == 1 and r["pid"] != replica["pid"]
                ),
                None,
            )

        again = wait_until(restarted, 60)
        assert again["fetch_s"] is None and again["load_s"] >= SLOW_START_S
        assert again["ready_s"] + again["load_s"] <= again["startup_s"]
        counts = wait_until(
            lambda: (s := startup_samples(fleet.server))[("load", "count")] == 2 and s, 10
        )
        assert counts[("fetch", "count")] == 1.0 and counts[("ready", "count")] == 2.0
        events = fleet.admin("/admin/v1/events?model=slow")["events"]
        last = [e["message"] for e in events if e["reason"] == "ReplicaReady"][-1]
        assert re.fullmatch(
            rf"replica {replica['id']}: ready in [\d.]+ s \(load [\d.]+ s, first probe [\d.]+ s\)",
            last,
        )
    finally:
        assert fleet.stop() == 0
