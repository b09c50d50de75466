"""`engine: emulator` under `gpufleet up`: emulated GPU replicas behind the real gateway."""

from __future__ import annotations

import os
import signal
import urllib.request
from pathlib import Path

from openai import OpenAI

from gpufleet.engines import parse_vllm
from tests.integration.fleet import ADMIN_KEY, start_fleet, wait_until

CONFIGS = Path(__file__).parents[1] / "data" / "configs"


def test_emulated_model_serves_through_the_gateway_and_restarts(tmp_path: Path) -> None:
    spec = tmp_path / "models.yaml"
    spec.write_text(
        "apiVersion: gpufleet.io/v1alpha1\nkind: Model\nmetadata: {name: llama-3-8b}\n"
        f"spec:\n  source: file:{CONFIGS / 'llama-3-8b.json'}\n  engine: emulator\n"
        "  resources: {gpus: 1, gpuTypes: [H100]}\n  replicas: {min: 2, max: 2}\n"
    )
    fleet = start_fleet(tmp_path / "data", spec)
    try:
        client = OpenAI(base_url=fleet.base_url, api_key=ADMIN_KEY, max_retries=0)
        for _ in range(4):
            reply = client.chat.completions.create(
                model="llama-3-8b", messages=[{"role": "user", "content": "hi"}], max_tokens=3
            )
            assert reply.system_fingerprint == "gpufleet-emulator"
        # "ready" is announced once a model can serve, not once every replica is up.
        wait_until(
            lambda: [r["phase"] for r in fleet.replicas("llama-3-8b")] == ["Ready", "Ready"],
            timeout=30,
        )
        replicas = fleet.replicas("llama-3-8b")
        assert len(replicas) == 2
        served = 0.0
        for r in replicas:
            with urllib.request.urlopen(r["url"] + "/metrics", timeout=5) as resp:
                text = resp.read().decode()
            served += parse_vllm(text).prefix_queries
            assert 'vllm:cache_config_info{block_size="16"' in text
        assert served > 0  # both replicas are behind the gateway; the requests reached them
        victim = replicas[0]
        os.kill(victim["pid"], signal.SIGKILL)
        wait_until(
            lambda: any(
                r["id"] == victim["id"] and r["phase"] == "Ready" and r["pid"] != victim["pid"]
                for r in fleet.replicas("llama-3-8b")
            ),
            timeout=30,
        )
    finally:
        assert fleet.stop() == 0


def test_a_disaggregated_model_prefills_on_its_prefill_pool(tmp_path: Path) -> None:
    """Two emulator processes under `gpufleet up`, one per pool; a long prompt is prefilled by
    the prefill process and decoded by the other (the emulator implements vLLM's handshake)."""
    spec = tmp_path / "models.yaml"
    spec.write_text(
        "apiVersion: gpufleet.io/v1alpha1\nkind: Model\nmetadata: {name: pd}\n"
        f"spec:\n  source: file:{CONFIGS / 'llama-3-8b.json'}\n  engine: emulator\n"
        "  resources: {gpus: 1, gpuTypes: [H100]}\n  replicas: {min: 1, max: 1}\n"
        "  disaggregation: {prefill: {replicas: 1}, minRemotePrefillTokens: 256}\n"
    )
    fleet = start_fleet(tmp_path / "data", spec)
    try:
        wait_until(
            lambda: (
                sorted((r["role"], r["phase"]) for r in fleet.replicas("pd"))
                == [("decode", "Ready"), ("prefill", "Ready")]
            ),
            timeout=30,
        )
        client = OpenAI(base_url=fleet.base_url, api_key=ADMIN_KEY, max_retries=0)
        system = "Answer from the travel policy, citing its section numbers. " * 60
        reply = client.chat.completions.create(
            model="pd",
            messages=[{"role": "system", "content": system}, {"role": "user", "content": "hi"}],
            max_tokens=5,
        )
        assert reply.usage is not None and reply.usage.completion_tokens == 5
        pulls = {}
        for r in fleet.replicas("pd"):
            with urllib.request.urlopen(r["url"] + "/metrics", timeout=5) as resp:
                text = resp.read().decode()
            pulls[r["role"]] = [
                float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith("gpufleet_emulator_kv_transfers_total{")
                and 'direction="in"' in line
            ]
        # The prefill process computed the prompt; the decode process pulled its KV cache.
        assert pulls == {"prefill": [0.0], "decode": [1.0]}
        with urllib.request.urlopen(fleet.base_url.removesuffix("/v1") + "/metrics") as resp:
            text = resp.read().decode()
        assert 'gpufleet_disaggregation_requests_total{model="pd",path="remote"} 1.0' in text
    finally:
        assert fleet.stop() == 0
