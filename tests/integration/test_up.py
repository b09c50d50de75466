"""`gpufleet up` serving the real SmolLM2 on llama.cpp, driven by the official OpenAI SDK and the CLI."""

from __future__ import annotations

import csv
import datetime
import io
import json
import os
import signal
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import free_port
from tests.integration.fleet import (
    ADMIN_KEY,
    MODELS_YAML,
    Fleet,
    alive,
    gpufleet,
    start_fleet,
    wait_until,
)

pytestmark = pytest.mark.engine

PRICED = "contextLength: 2048\n  pricing: {perReplicaHour: 3.6}"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("up")
    models = root / "models.yaml"
    # SmolLM2 priced as a CPU replica is ($3.60 an hour): the cost report has a figure to show.
    models.write_text(MODELS_YAML.replace("contextLength: 2048", PRICED, 1))
    fleet = start_fleet(root / "data", models)
    yield fleet
    pids = fleet.engine_pids()
    assert fleet.stop(signal.SIGTERM) == 0, fleet.stderr()
    assert pids and not [p for p in pids if alive(p)]


@pytest.fixture(scope="module")
def client(fleet: Fleet) -> OpenAI:
    return OpenAI(base_url=fleet.base_url, api_key=ADMIN_KEY, max_retries=0, timeout=60)


def test_chat_completion(client: OpenAI) -> None:
    reply = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "Name a colour."}],
        max_tokens=16,
        temperature=0,
    )
    assert reply.model == "smollm2"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content
    assert reply.usage is not None and 0 < reply.usage.completion_tokens <= 16


def test_chat_completion_stream(client: OpenAI) -> None:
    stream = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "Count from one to five."}],
        max_tokens=24,
        stream=True,
    )
    pieces = [
        c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content
    ]
    assert len(pieces) >= 3
    assert "".join(pieces).strip()


def test_completion(client: OpenAI) -> None:
    reply = client.completions.create(
        model="smollm2", prompt="The capital of France is", max_tokens=8
    )
    assert reply.choices[0].text
    assert reply.usage is not None and reply.usage.prompt_tokens > 0


def test_model_list(client: OpenAI) -> None:
    ids = {m.id for m in client.models.list()}
    assert ids == {"smollm2", "smollm2-embed"}


def test_embeddings_one_vector_per_input(client: OpenAI) -> None:
    result = client.embeddings.create(model="smollm2-embed", input=["hello world", "good night"])
    vectors = [d.embedding for d in result.data]
    assert len(vectors) == 2
    assert len(vectors[0]) == len(vectors[1]) == 576  # SmolLM2-135M's hidden size
    assert all(isinstance(x, float) for x in vectors[0])
    assert vectors[0] != vectors[1]


def test_embeddings_refused_by_a_generation_model(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model="smollm2", input="hello")
    assert info.value.code == "model_not_supported"


def test_unknown_model_is_404(client: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert info.value.code == "model_not_found"
    assert info.value.response.headers["x-request-id"]


def test_invalid_field_is_400_naming_it(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": "x"}], temperature=7
        )
    assert info.value.param == "temperature"


def test_oversized_body_is_413(client: OpenAI) -> None:
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": "x" * (9 * 1024 * 1024)}]
        )
    assert info.value.status_code == 413


def test_cli_lists_models_and_replicas(fleet: Fleet) -> None:
    result = gpufleet("get", "models", "-o", "json", "--server", fleet.server)
    assert result.returncode == 0, result.stderr
    models = {m["name"]: m for m in json.loads(result.stdout)}
    assert models["smollm2"]["status"] == "Ready"
    assert models["smollm2"]["ready"] == 1
    table = gpufleet("get", "replicas", env={"GPUFLEET_SERVER": fleet.server})
    assert table.returncode == 0 and "smollm2-embed" in table.stdout and "Ready" in table.stdout


def test_cli_logs(fleet: Fleet) -> None:
    result = gpufleet("logs", "smollm2", "--tail", "50", "--server", fleet.server)
    assert result.returncode == 0
    assert "==> replica smollm2-g1-" in result.stdout
    assert "gpufleet: attempt 1" in result.stdout or "Uvicorn running" in result.stdout


def test_bad_spec_is_refused_and_changes_nothing(fleet: Fleet, tmp_path: Path) -> None:
    before = fleet.admin("/admin/v1/models")
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        MODELS_YAML.replace(
            "contextLength: 2048", "contextLength: 4096\n  replicas: {min: 2, max: 1}"
        )
    )
    result = gpufleet("apply", "-f", str(bad), "--server", fleet.server)
    assert result.returncode == 1
    assert (
        f"{bad}, document 1: spec.replicas.max must be ≥ spec.replicas.min (got 1 < 2)"
        in result.stderr
    )
    assert "nothing was changed" in result.stderr
    assert "Traceback" not in result.stderr
    assert fleet.admin("/admin/v1/models") == before


def test_apply_then_delete_a_model(fleet: Fleet, tmp_path: Path) -> None:
    extra = tmp_path / "extra.yaml"
    extra.write_text(MODELS_YAML.split("---")[0].replace("name: smollm2", "name: smol-extra"))
    result = gpufleet("apply", "-f", str(extra), "--server", fleet.server)
    assert result.returncode == 0, result.stderr
    assert "model/smol-extra created (generation 1)" in result.stdout
    again = gpufleet("apply", "-f", str(extra), "--server", fleet.server)
    assert "model/smol-extra unchanged" in again.stdout
    (replica,) = wait_until(
        lambda: [r for r in fleet.replicas("smol-extra") if r["phase"] == "Ready"], timeout=60
    )
    client = OpenAI(base_url=fleet.base_url, api_key=ADMIN_KEY, max_retries=0)
    assert client.completions.create(model="smol-extra", prompt="Hi", max_tokens=2).choices
    result = gpufleet("delete", "model", "smol-extra", "--server", fleet.server)
    assert result.returncode == 0 and "model/smol-extra deleted" in result.stdout
    wait_until(lambda: not fleet.replicas("smol-extra") and not alive(replica["pid"]), timeout=30)
    missing = gpufleet("delete", "model", "smol-extra", "--server", fleet.server)
    assert missing.returncode == 1 and "not found" in missing.stderr


def test_killed_engine_is_restarted_and_serves_again(fleet: Fleet, client: OpenAI) -> None:
    (before,) = fleet.replicas("smollm2")
    os.kill(before["pid"], signal.SIGKILL)
    after = wait_until(
        lambda: [
            r
            for r in fleet.replicas("smollm2")
            if r["phase"] == "Ready" and r["pid"] != before["pid"]
        ],
        timeout=60,
    )[0]
    assert after["restarts"] == before["restarts"] + 1
    assert after["id"] == before["id"]
    assert not alive(before["pid"])
    reply = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Hi"}], max_tokens=4
    )
    assert reply.choices[0].message.content is not None
    events = gpufleet("get", "events", "-o", "json", "--server", fleet.server)
    reasons = [e["reason"] for e in json.loads(events.stdout) if e["model"] == "smollm2"]
    assert "ReplicaCrashed" in reasons


def test_taken_port_fails_fast_with_a_clear_message(fleet: Fleet, tmp_path: Path) -> None:
    started = time.monotonic()
    result = gpufleet(
        "up", "--port", str(fleet.port), "--data-dir", str(tmp_path / "d"), timeout=30
    )
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{fleet.port}" in result.stderr
    assert "--port" in result.stderr
    assert "Traceback" not in result.stderr
    assert time.monotonic() - started < 15


def test_cli_without_a_server_says_so() -> None:
    result = gpufleet("get", "models", "--server", f"http://127.0.0.1:{free_port()}")
    assert result.returncode == 2
    assert "no gpufleet server answers" in result.stderr
    assert "gpufleet up" in result.stderr


def held_requests(fleet: Fleet, model: str) -> float:
    """How many requests for ``model`` the gateway has held for a replica (its /metrics)."""
    with urllib.request.urlopen(fleet.server + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "gpufleet_requests_held_total" and sample.labels == {"model": model}:
                return float(sample.value)
    return 0.0


def test_unanswering_replica_leaves_the_pool_and_requests_wait_for_it(
    fleet: Fleet, client: OpenAI
) -> None:
    """SIGSTOP freezes the engine: within seconds it is out of the pool, and a request waits
    (bounded) instead of failing; SIGCONT brings the replica back and the request is served."""
    (replica,) = fleet.replicas("smollm2-embed")
    os.kill(replica["pid"], signal.SIGSTOP)
    try:
        # Two failed probes, 1 s apart with 1.5 s timeouts, take about 5 s: the deadline only
        # catches a replica that never leaves the pool.
        wait_until(lambda: fleet.replicas("smollm2-embed")[0]["phase"] == "Unready", timeout=20)
        held = held_requests(fleet, "smollm2-embed")
        result: list[object] = []
        waiter = threading.Thread(
            target=lambda: result.append(client.embeddings.create(model="smollm2-embed", input="x"))
        )
        waiter.start()
        wait_until(lambda: held_requests(fleet, "smollm2-embed") > held, timeout=30)
        assert waiter.is_alive() and not result  # held by the gateway, not refused
    finally:
        os.kill(replica["pid"], signal.SIGCONT)
    waiter.join(timeout=30)
    assert result and result[0].data  # type: ignore[attr-defined]
    assert fleet.replicas("smollm2-embed")[0]["phase"] == "Ready"


def test_cost_report_charges_a_priced_cpu_replica_busy_and_idle(
    fleet: Fleet, client: OpenAI
) -> None:
    for _ in range(2):
        client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": "Hi"}], max_tokens=4
        )
    # The span opens when the controller starts the replica, just before its ReplicaStarting
    # event; a restart of its engine (an earlier test kills it) keeps the span, so the
    # replica's ``started_at`` (its latest attempt) is not where placed time begins.
    (replica,) = fleet.replicas("smollm2")
    events = fleet.admin("/admin/v1/events?model=smollm2")["events"]
    (starting,) = [
        e for e in events if e["reason"] == "ReplicaStarting" and replica["id"] in e["message"]
    ]
    started = datetime.datetime.fromisoformat(starting["at"]).timestamp()
    result = gpufleet(
        "report", "--by", "model", "--since", "1h", "-o", "json", "--server", fleet.server
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    until = datetime.datetime.fromisoformat(report["until"]).timestamp()
    smol = next(line for line in report["lines"] if line["model"] == "smollm2")
    # Placed from when the controller started the replica until the report's end, at $3.60
    # an hour: a tenth of a cent a second, the tolerance.
    assert smol["placed_cost"] == pytest.approx(3.6 * (until - started) / 3600, abs=0.001)
    assert smol["busy_cost"] > 0 and smol["idle_cost"] > 0
    assert smol["busy_cost"] + smol["idle_cost"] == pytest.approx(smol["placed_cost"], abs=2e-6)
    assert smol["successful"] >= 2 and smol["gpu_hours_placed"] == 0
    assert smol["cost_per_successful_request"] == pytest.approx(
        smol["total_cost"] / smol["successful"], rel=1e-3
    )
    # No GPUs here: nothing is fleet idle, and the report says why its GPU figures are zero.
    assert report["fleet"]["gpus"] == 0 and report["fleet"]["idle_cost"] == 0
    assert any("no GPUs" in note for note in report["notes"])
    # By tenant: everything used went to the default tenant, with its share of idle time.
    by_tenant = gpufleet("report", "--by", "tenant", "-o", "csv", "--server", fleet.server)
    assert by_tenant.returncode == 0, by_tenant.stderr
    rows = {r["tenant"]: r for r in csv.DictReader(io.StringIO(by_tenant.stdout))}
    assert float(rows["default"]["total_cost"]) >= smol["total_cost"] - 1e-3
    table = gpufleet("report", "--server", fleet.server)
    assert table.returncode == 0 and "smollm2" in table.stdout and "no GPUs" in table.stdout
