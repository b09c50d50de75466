"""Precise prefix routing against real vLLM (CPU build): its KV-event stream, read live by the
gateway's subscriber, keyed from its own ``/tokenize``, predicts what vLLM reuses.

One vLLM start for the module (~35–60 s here), with ``--kv-events-config`` (and a replay
endpoint: a batch published before the subscription reached vLLM is replayed, not lost),
``--enable-prompt-tokens-details`` (usage carries ``cached_tokens``, the truth the index is held
to) and dev mode (``POST /reset_prefix_cache`` → ``AllBlocksCleared``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from gpufleet.gateway.kv_subscriber import KvEventSubscriber, connect_endpoint
from gpufleet.routing.kv_events import KvBlockIndex
from tests.conftest import eventually, free_port
from tests.vllm.setup import MODEL, NEEDS_VLLM, VENV

NAME = "smol"

pytestmark = NEEDS_VLLM

SYSTEM = (
    "You are the dispatcher of a regional courier. Keep answers short, name the depot, and "
    "say when a parcel needs a signature. "
) * 16


@dataclass(frozen=True)
class Vllm:
    url: str
    sources: dict[str, Any]


def _post(url: str, body: dict[str, Any]) -> Any:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())


@pytest.fixture(scope="module")
def vllm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Vllm]:
    work = tmp_path_factory.mktemp("vllm-kv")
    port = free_port()
    config = {"enable_kv_cache_events": True, "publisher": "zmq", "topic": "kv-events",
              "endpoint": f"tcp://*:{free_port()}", "replay_endpoint": f"tcp://*:{free_port()}"}  # fmt: skip
    argv = [
        str(VENV / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(MODEL), "--served-model-name", NAME, "--host", "127.0.0.1",
        "--port", str(port), "--max-model-len", "2048", "--enforce-eager", "--dtype", "bfloat16",
        "--enable-prefix-caching", "--enable-prompt-tokens-details",
        "--kv-events-config", json.dumps(config),
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
           "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_SERVER_DEV_MODE": "1",
           "TMPDIR": str(work), "HF_HOME": str(work / "hf"),
           "VLLM_CACHE_ROOT": str(work / "vllm")}  # fmt: skip
    log = (work / "vllm.log").open("wb")
    proc = subprocess.Popen(
        argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:  # ready = one real completion (/health answers before the engine can)
            assert proc.poll() is None, f"vLLM exited: {(work / 'vllm.log').read_text()[-3000:]}"
            try:
                _post(url + "/v1/completions", {"model": NAME, "prompt": "ok", "max_tokens": 1})
                break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline, "vLLM not ready within 600 s"
                time.sleep(1)
        with urllib.request.urlopen(url + "/kv_event_sources", timeout=30) as resp:
            sources = json.loads(resp.read())
        yield Vllm(url, sources)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def chat(question: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]


async def test_the_live_stream_predicts_what_vllm_reuses(vllm: Vllm) -> None:
    (source,) = vllm.sources.values()
    assert source["topic"] == "kv-events" and source["endpoint"].startswith("tcp://*:")
    index = KvBlockIndex()
    sub = KvEventSubscriber(
        index,
        "vllm-0",
        connect_endpoint(source["endpoint"], "127.0.0.1"),
        source["topic"],
        replay_endpoint=connect_endpoint(source["replay_endpoint"], "127.0.0.1"),
    )
    await sub.start()
    try:
        await eventually(sub.subscribed, "subscribed to vLLM")
        async with aiohttp.ClientSession() as http:

            async def post(path: str, body: dict[str, Any]) -> Any:
                async with http.post(vllm.url + path, json=body) as resp:
                    assert resp.status == 200, await resp.text()
                    return await resp.json()

            for question in ("Where is parcel 4471?", "Does parcel 9120 need a signature?"):
                tokens = (await post("/tokenize", {"model": NAME, "messages": chat(question)}))[
                    "tokens"
                ]
                keys = index.keys(tokens, 128)
                predicted = index.matched("vllm-0", keys) * 128
                answer = await post(
                    "/v1/chat/completions",
                    {"model": NAME, "messages": chat(question), "max_tokens": 2},
                )
                assert answer["usage"]["prompt_tokens"] == len(tokens)
                assert answer["usage"]["prompt_tokens_details"]["cached_tokens"] == predicted
                await eventually(
                    lambda k=keys: index.matched("vllm-0", k) == len(k),
                    "the prompt's blocks indexed",
                    timeout=60,
                )
            assert predicted > 0  # the second reused the shared system prompt
            assert index.block_size("vllm-0") == 128
            assert (await post("/reset_prefix_cache", {}))["success"] is True
            await post("/v1/completions", {"model": NAME, "prompt": "ok", "max_tokens": 1})
            await eventually(
                lambda: index.stats("vllm-0").blocks == 0, "AllBlocksCleared", timeout=60
            )
        stats = sub.stats()
        assert stats.errors == {} and stats.skipped_events == 0 and stats.resets == 0
    finally:
        await sub.close()
