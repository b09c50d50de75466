"""`engine: external` under `gpufleet up`: a server gpufleet does not run, behind its gateway.

The endpoint is the engine emulator in a process of its own, started by the test with a key of
its own (it answers only requests bearing it) and its own name for the model — the stand-in for
a company's existing vLLM server or a hosted API. The model's key comes from gpufleet up's
environment (``apiKey.env``); the endpoint is ``location: external``, so only the tenant that
opted in reaches it; its outage makes the gateway fall back on the model the fleet runs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from openai import OpenAI

from tests.conftest import free_port
from tests.integration.fleet import ADMIN_KEY, Fleet, gpufleet, start_fleet, wait_until

CONFIGS = Path(__file__).parents[1] / "data" / "configs"
ENDPOINT_KEY = "sk-endpoint-3f9c2a7d41e8b5"


def _endpoint(port: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gpufleet.emulator",
            "--arch",
            str(CONFIGS / "llama-3-8b.json"),
            "--name",
            "upstream-llama-8b",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--time-scale",
            "0.01",
        ],
        env={**os.environ, "GPUFLEET_ENGINE_KEY": ENDPOINT_KEY},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )


def _spec(tmp: Path, port: int) -> Path:
    spec = tmp / "models.yaml"
    spec.write_text(
        f"""\
apiVersion: gpufleet.io/v1alpha1
kind: Model
metadata: {{name: hosted}}
spec:
  engine: external
  endpoints:
  - url: http://127.0.0.1:{port}/v1
    model: upstream-llama-8b
    apiKey: {{env: HOSTED_API_KEY}}
  pricing: {{perMillionInputTokens: 3, perMillionOutputTokens: 15}}
  routing: {{fallbacks: [own]}}
---
apiVersion: gpufleet.io/v1alpha1
kind: Model
metadata: {{name: own}}
spec:
  source: file:{CONFIGS / "llama-3-8b.json"}
  engine: emulator
  resources: {{gpus: 1, gpuTypes: [H100]}}
---
apiVersion: gpufleet.io/v1alpha1
kind: Tenant
metadata: {{name: acme}}
spec: {{allowExternalEndpoints: true}}
---
apiVersion: gpufleet.io/v1alpha1
kind: Tenant
metadata: {{name: globex}}
"""
    )
    return spec


@pytest.fixture
def running(tmp_path: Path) -> Iterator[tuple[Fleet, subprocess.Popen[str], int]]:
    port = free_port()
    endpoint = _endpoint(port)
    fleet = start_fleet(
        tmp_path / "data", _spec(tmp_path, port), env={"HOSTED_API_KEY": ENDPOINT_KEY}
    )
    try:
        yield fleet, endpoint, port
    finally:
        endpoint.kill()
        endpoint.wait()
        assert fleet.stop() == 0


def _key(fleet: Fleet, tenant: str) -> str:
    made = gpufleet("keys", "create", "--tenant", tenant, "--name", "app",
                    env={"GPUFLEET_SERVER": fleet.server})  # fmt: skip
    assert made.returncode == 0, made.stderr
    return made.stdout.strip()


def test_an_external_endpoint_serves_opted_in_tenants_priced_per_token(
    running: tuple[Fleet, subprocess.Popen[str], int], tmp_path: Path
) -> None:
    fleet, _, port = running
    wait_until(lambda: [r["phase"] for r in fleet.replicas("hosted")] == ["Ready"], timeout=60)
    (replica,) = fleet.replicas("hosted")
    assert replica["url"] == f"http://127.0.0.1:{port}"
    acme = OpenAI(base_url=fleet.base_url, api_key=_key(fleet, "acme"), max_retries=0)
    messages = [{"role": "user", "content": "Where is my parcel?"}]
    reply = acme.chat.completions.create(model="hosted", messages=messages, max_tokens=5)
    # The emulator answered (it refuses requests without its key): the key went with them.
    assert reply.system_fingerprint == "gpufleet-emulator"
    assert reply.usage is not None and reply.usage.completion_tokens == 5
    chunks = list(
        acme.chat.completions.create(
            model="hosted", messages=messages, max_tokens=4, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4

    # A tenant that did not opt in never reaches it: prompts stay in the company.
    globex = OpenAI(base_url=fleet.base_url, api_key=_key(fleet, "globex"), max_retries=0)
    # ... unless the chain has a model of the fleet's own: the fallback serves it.
    kept = globex.chat.completions.with_raw_response.create(
        model="hosted", messages=messages, max_tokens=2
    )
    assert kept.headers["x-gpufleet-model"] == "own"

    # Priced by its tokens, from its price list: $3 and $15 per million.
    cli = {"GPUFLEET_SERVER": fleet.server, "GPUFLEET_API_KEY": ADMIN_KEY}
    wait_until(lambda: _usage(cli).get(("acme", "hosted"), {}).get("requests") == 2, timeout=30)
    row = _usage(cli)[("acme", "hosted")]
    expected = (row["prompt_tokens"] * 3 + row["completion_tokens"] * 15) / 1e6
    assert row["completion_tokens"] == 9
    assert row["cost_usd"] == pytest.approx(expected, rel=1e-6) and row["cost_usd"] > 0
    assert row["gpu_seconds"] == 0

    # The key is the endpoint's secret: in no log, no listing.
    logs = [fleet.stderr(), *(p.read_text(errors="replace") for p in tmp_path.rglob("*.log"))]
    assert not any(ENDPOINT_KEY in text for text in logs)
    assert ENDPOINT_KEY not in json.dumps(fleet.replicas())


def test_an_endpoint_that_goes_away_is_left_and_the_fallback_serves(
    running: tuple[Fleet, subprocess.Popen[str], int],
) -> None:
    fleet, endpoint, _ = running
    wait_until(lambda: [r["phase"] for r in fleet.replicas("hosted")] == ["Ready"], timeout=60)
    acme = OpenAI(base_url=fleet.base_url, api_key=_key(fleet, "acme"), max_retries=0)
    messages = [{"role": "user", "content": "hello"}]
    first = acme.chat.completions.with_raw_response.create(
        model="hosted", messages=messages, max_tokens=2
    )
    assert first.headers["x-gpufleet-model"] == "hosted"
    endpoint.send_signal(signal.SIGKILL)
    endpoint.wait()
    # At once (before any probe saw it gone) and after: the fleet's own model answers.
    for _ in range(3):
        served = acme.chat.completions.with_raw_response.create(
            model="hosted", messages=messages, max_tokens=2
        )
        assert served.headers["x-gpufleet-model"] == "own"
    wait_until(lambda: [r["phase"] for r in fleet.replicas("hosted")] == ["Unready"], timeout=60)
    (replica,) = fleet.replicas("hosted")
    assert "not answering" in replica["message"]


def test_a_tenant_that_did_not_opt_in_is_told_why(tmp_path: Path) -> None:
    port = free_port()
    endpoint = _endpoint(port)
    spec = _spec(tmp_path, port)
    spec.write_text(spec.read_text().replace("  routing: {fallbacks: [own]}\n", ""))
    fleet = start_fleet(tmp_path / "data", spec, env={"HOSTED_API_KEY": ENDPOINT_KEY})
    try:
        globex = OpenAI(base_url=fleet.base_url, api_key=_key(fleet, "globex"), max_retries=0)
        with pytest.raises(openai.PermissionDeniedError) as refused:
            globex.chat.completions.create(
                model="hosted", messages=[{"role": "user", "content": "hi"}], max_tokens=2
            )
        error = refused.value.body
        assert isinstance(error, dict) and error["code"] == "external_endpoint_not_allowed"
        assert "allowExternalEndpoints" in error["message"]
    finally:
        endpoint.kill()
        endpoint.wait()
        assert fleet.stop() == 0


def _usage(cli: dict[str, str]) -> dict[tuple[str, str], dict[str, float]]:
    """The ledger by model for tenant acme."""
    out = gpufleet("usage", "--by", "model", "--tenant", "acme", "-o", "json", env=cli)
    assert out.returncode == 0, out.stderr
    return {("acme", r["model"]): r for r in json.loads(out.stdout)["usage"]}


def test_burst_to_the_hosted_endpoint_while_the_fleet_is_full_and_back_after(
    tmp_path: Path,
) -> None:
    """The fleet's own deployment is the cheaper one (routing.cost); with its one slot taken,
    the next request goes to the priced hosted endpoint, and once the slot is free, home."""
    port = free_port()
    endpoint = _endpoint(port)
    spec = tmp_path / "models.yaml"
    spec.write_text(
        _spec(tmp_path, port)
        .read_text()
        .replace("  routing: {fallbacks: [own]}\n", "")
        .replace("perMillionInputTokens: 3, perMillionOutputTokens: 15",
                 "perMillionInputTokens: 200, perMillionOutputTokens: 600")
        .replace(
            "  resources: {gpus: 1, gpuTypes: [H100]}\n",
            "  resources: {gpus: 1, gpuTypes: [H100]}\n  engineArgs: [--time-scale, '4']\n"
            "  routing: {maxInFlightPerReplica: 1, cost: {alternatives: [hosted], "
            "ttftObjective: 30s}}\n",
        )
    )  # fmt: skip
    fleet = start_fleet(tmp_path / "data", spec, env={"HOSTED_API_KEY": ENDPOINT_KEY})
    try:
        wait_until(lambda: [r["phase"] for r in fleet.replicas("hosted")] == ["Ready"], timeout=60)
        acme = OpenAI(base_url=fleet.base_url, api_key=_key(fleet, "acme"), max_retries=0)
        messages = [{"role": "user", "content": "Tell me about parcels."}]

        def served_by() -> str:
            raw = acme.chat.completions.with_raw_response.create(
                model="own", messages=messages, max_tokens=2
            )
            return str(raw.headers["x-gpufleet-model"])

        assert served_by() == "own"  # room at home, and home is cheaper
        with acme.chat.completions.with_streaming_response.create(
            model="own", messages=messages, max_tokens=400, stream=True
        ) as long:
            assert long.headers["x-gpufleet-model"] == "own"
            lines = long.iter_lines()  # kept: a dropped iterator closes the stream
            next(lines)  # the long answer holds own's only slot now
            assert served_by() == "hosted"  # full at home: the priced endpoint serves
            assert sum(1 for _ in lines) > 100  # and the long answer went on meanwhile
        wait_until(lambda: served_by() == "own", timeout=60)  # the slot is free: home again
    finally:
        endpoint.kill()
        endpoint.wait()
        assert fleet.stop() == 0


def test_a_tenants_budget_stops_the_burst(tmp_path: Path) -> None:
    port = free_port()
    endpoint = _endpoint(port)
    spec = _spec(tmp_path, port)
    spec.write_text(
        spec.read_text()
        .replace("  routing: {fallbacks: [own]}\n", "")
        .replace("perMillionInputTokens: 3, perMillionOutputTokens: 15",
                 "perMillionInputTokens: 1000, perMillionOutputTokens: 1000")
        .replace("spec: {allowExternalEndpoints: true}",
                 "spec: {allowExternalEndpoints: true, limits: {budget: {usd: 0.1, period: day}}}")
    )  # fmt: skip
    fleet = start_fleet(tmp_path / "data", spec, env={"HOSTED_API_KEY": ENDPOINT_KEY})
    try:
        wait_until(lambda: [r["phase"] for r in fleet.replicas("hosted")] == ["Ready"], timeout=60)
        acme = OpenAI(base_url=fleet.base_url, api_key=_key(fleet, "acme"), max_retries=0)
        messages = [{"role": "user", "content": "hello " * 10}]
        answered = 0
        with pytest.raises(openai.RateLimitError) as stopped:
            for _ in range(50):  # each costs a few cents at $1,000 per million tokens
                acme.chat.completions.create(model="hosted", messages=messages, max_tokens=10)
                answered += 1
        assert "budget" in str(stopped.value)
        assert 1 <= answered < 10
        cli = {"GPUFLEET_SERVER": fleet.server, "GPUFLEET_API_KEY": ADMIN_KEY}
        wait_until(lambda: _usage(cli).get(("acme", "hosted"), {}).get("requests") == answered,
                   timeout=30)  # fmt: skip
        spent = _usage(cli)[("acme", "hosted")]["cost_usd"]
        # Each request is admitted on an estimate (every token at the dearer price, the prompt
        # estimated from its characters): past the budget by less than one request, if at all.
        assert spent - 0.1 < spent / answered
    finally:
        endpoint.kill()
        endpoint.wait()
        assert fleet.stop() == 0
