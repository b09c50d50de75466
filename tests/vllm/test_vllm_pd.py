"""Real prefill/decode disaggregation on vLLM's CPU build, under `gpufleet up`.

Two vLLM replicas of one model, a prefill pool of one beside the model's (decode) replica,
sharing KV caches through vLLM's ExampleConnector (``connector: shared-storage``): the prefill
replica writes a prompt's KV cache to files keyed by the prompt, the decode replica loads them
instead of computing them. That connector has no ``kv_transfer_params`` handshake, so this
proves something weaker than the NIXL flow (tested against the emulator, which implements the
handshake): that the gateway's two calls make a separate decode instance reuse the KV cache a
prefill instance wrote — external prefix-cache hits in its metrics, the greedy answer equal to
the one the prefill instance gives computing the whole request itself.
"""

from __future__ import annotations

import re
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from openai import OpenAI

from tests.integration.fleet import ADMIN_KEY, Fleet, alive, start_fleet, wait_until
from tests.vllm.setup import MODEL, NEEDS_VLLM, VENV, fleet_env

pytestmark = NEEDS_VLLM

#: About 600 tokens: past minRemotePrefillTokens and several of vLLM's 128-token CPU blocks.
SYSTEM = "You are the harbour master's assistant; answer briefly and exactly. " * 40
BLOCK = 128  # vLLM's KV block on CPU


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("vllm-pd")
    work, shared = root / "work", root / "kv"
    work.mkdir()
    shared.mkdir()
    spec = root / "models.yaml"
    spec.write_text(
        "apiVersion: gpufleet.io/v1alpha1\nkind: Model\nmetadata: {name: smol-pd}\n"
        f"spec:\n  source: file:{MODEL}\n  engine: vllm\n  contextLength: 2048\n"
        "  engineArgs: ['--enforce-eager', '--dtype', 'bfloat16', '--max-num-seqs', '2']\n"
        "  disaggregation:\n    prefill: {replicas: 1}\n    connector: shared-storage\n"
        f"    sharedStoragePath: {shared}\n    minRemotePrefillTokens: 256\n"
    )
    env = fleet_env(work)
    fleet = start_fleet(root / "data", spec, env=env, timeout=900)
    try:
        wait_until(
            lambda: sorted(r["role"] or "decode" for r in ready(fleet)) == ["decode", "prefill"],
            timeout=900,
            interval=1.0,
        )
        yield fleet
    finally:
        pids = fleet.engine_pids()
        assert fleet.stop(timeout=60) == 0
        assert not any(alive(pid) for pid in pids)
        leftovers = subprocess.run(
            ["pgrep", "-f", str(VENV)], capture_output=True, text=True, check=False
        )
        assert leftovers.stdout.strip() == "", "vLLM processes outlived gpufleet"


def ready(fleet: Fleet) -> list[dict[str, Any]]:
    return [r for r in fleet.replicas("smol-pd") if r["phase"] == "Ready"]


def replica(fleet: Fleet, role: str) -> dict[str, Any]:
    (found,) = [r for r in ready(fleet) if (r["role"] or "decode") == role]
    return found


def vllm_key(pid: int) -> str:
    """The replica's secret, from the vLLM process's environment (only its owner reads it)."""
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    (key,) = [v.split(b"=", 1)[1].decode() for v in environ if v.startswith(b"VLLM_API_KEY=")]
    return key


def scrape(url: str, name: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"{re.escape(name)}(?:{{[^}}]*}})? ([0-9.e+-]+)$", line)
        if match:
            total += float(match.group(1))
    return total


def test_a_decode_replica_reuses_the_kv_cache_a_prefill_replica_wrote(fleet: Fleet) -> None:
    decode, prefill = replica(fleet, "decode"), replica(fleet, "prefill")
    hits_before = scrape(decode["url"], "vllm:external_prefix_cache_hits_total")
    client = OpenAI(base_url=fleet.base_url, api_key=ADMIN_KEY, max_retries=0, timeout=300)
    messages = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "Name the three busiest ports you know."},
    ]
    answer = client.chat.completions.create(
        model="smol-pd",
        messages=messages,  # type: ignore[arg-type]
        max_tokens=24,
        temperature=0,
    )
    assert answer.usage is not None and answer.usage.completion_tokens == 24
    prompt = answer.usage.prompt_tokens
    assert prompt > 4 * BLOCK
    remote = scrape(
        fleet.server, 'gpufleet_disaggregation_requests_total{model="smol-pd",path="remote"}'
    )
    assert remote == 1.0
    # The decode replica loaded every whole block of the prompt but the last token's
    # (ExampleConnector keys by the prompt less its last token, cut to whole blocks).
    hits = scrape(decode["url"], "vllm:external_prefix_cache_hits_total") - hits_before
    assert hits == BLOCK * ((prompt - 1) // BLOCK)
    # And used them: the greedy answer is the one the prefill instance computes by itself.
    key = vllm_key(prefill["pid"])
    alone = OpenAI(base_url=prefill["url"] + "/v1", api_key=key, max_retries=0, timeout=300)
    reference = alone.chat.completions.create(
        model="smol-pd",
        messages=messages,  # type: ignore[arg-type]
        max_tokens=24,
        temperature=0,
    )
    assert answer.choices[0].message.content == reference.choices[0].message.content
    assert answer.choices[0].message.content


def test_a_short_prompt_is_decoded_where_it_is_prefilled(fleet: Fleet) -> None:
    client = OpenAI(base_url=fleet.base_url, api_key=ADMIN_KEY, max_retries=0, timeout=300)
    answer = client.chat.completions.create(
        model="smol-pd", messages=[{"role": "user", "content": "Say hi."}], max_tokens=4
    )
    assert answer.choices[0].message.content is not None
    short = scrape(
        fleet.server, 'gpufleet_disaggregation_requests_total{model="smol-pd",path="local_short"}'
    )
    assert short >= 1.0
