"""Liveness in front of the real llama.cpp: the local runtime probes ``/health`` every second,
which llama-cpp-python's server does not serve by itself (each probe was a ``404`` line in
``gpufleet logs``). The replica's entry point serves it, answers it while a generation holds the
model lock, and keeps the successful probes out of the engine's log."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from openai import OpenAI

from gpufleet.engines.base import LIVENESS_PATH
from tests.integration.fleet import ADMIN_KEY, Fleet, smollm2_fleet, wait_until

pytestmark = pytest.mark.engine


#: Probes to let run: the local runtime asks once a second once the replica is ready.
PROBES = 5


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    yield from smollm2_fleet(tmp_path_factory.mktemp("liveness"))


def engine_log(fleet: Fleet) -> str:
    request = urllib.request.Request(
        f"{fleet.server}/admin/v1/models/smollm2/logs?tail=100000",
        headers={"authorization": f"Bearer {ADMIN_KEY}"},
    )
    with urllib.request.urlopen(request, timeout=10) as resp:
        text: str = resp.read().decode()
    return text


def ready_replica(fleet: Fleet) -> dict[str, Any]:
    (replica,) = fleet.replicas("smollm2")
    assert replica["phase"] == "Ready", replica
    return replica


def test_probes_are_answered_and_silent_while_the_engine_generates(fleet: Fleet) -> None:
    replica = wait_until(lambda: [r for r in fleet.replicas("smollm2") if r["ready_at"]], 60)[0]
    with OpenAI(base_url=fleet.base_url, api_key=ADMIN_KEY, max_retries=0, timeout=120) as client:
        # A generation holds llama-cpp-python's model lock while the probes go on.
        stream = client.chat.completions.create(
            model="smollm2",
            messages=[{"role": "user", "content": "Tell a long story about a lighthouse."}],
            max_tokens=300,
            stream=True,
        )
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        # Probes keep running after it; each poll also checks the replica stays Ready.
        wait_until(lambda: time.time() - ready_replica(fleet)["ready_at"] > PROBES + 1, 60, 0.2)
    assert ready_replica(fleet)["restarts"] == replica["restarts"]

    log = engine_log(fleet)
    # The log is the engine's access log, read live: the request above is in it ...
    assert '"POST /v1/chat/completions HTTP/1.1" 200' in log, log[-2000:]
    # ... and no probe is, successful or not.
    assert f"GET {LIVENESS_PATH}" not in log, log[-2000:]
    assert " 404" not in log, log[-2000:]
