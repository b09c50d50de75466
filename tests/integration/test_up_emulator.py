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
