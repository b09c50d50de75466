"""Real SGLang (0.5.23, its CPU path) under `gpufleet up`: adapter, readiness, metrics, prefix
cache, the engine's key.

One SGLang start for the module (~25–40 s here). The environment and the converted SmolLM2 come
from scripts/setup-sglang-cpu. The CPU path is the test's: ``SGLANG_USE_CPU_ENGINE=1`` in
gpufleet's environment and ``--device cpu`` with a KV-cache cap in the spec's ``engineArgs``
(tests/sglang/setup.py); the adapter adds only what every SGLang needs (``--enable-metrics``,
``--enable-cache-report``, the key).
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from openai import OpenAI

from gpufleet.engines import EngineLoad, parse_sglang
from gpufleet.gateway.known_fields import GATEWAY_ONLY, KNOWN_FIELDS
from tests.integration.fleet import ADMIN_KEY, Fleet, alive, start_fleet, wait_until
from tests.sglang.setup import CPU_ARGS, MODEL, NEEDS_SGLANG, VENV, fleet_env

pytestmark = NEEDS_SGLANG

NAME = "smol-sglang"
#: At most two requests run at once, so a third waits; the load gauges, refreshed at each
#: prefill batch and every ``--decode-log-interval`` decode steps (40 by default), every 4 here
#: so that a short generation shows them.
ENGINE_ARGS = [*CPU_ARGS, "--max-running-requests", "2", "--decode-log-interval", "4"]


def _children(pid: int) -> set[int]:
    """Every process below ``pid`` (SGLang's scheduler and detokenizer rename themselves:
    ``pgrep -f`` on the environment's path does not find them)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("sglang")
    work = root / "work"
    work.mkdir()
    spec = root / "models.yaml"
    spec.write_text(
        f"apiVersion: gpufleet.io/v1alpha1\nkind: Model\nmetadata: {{name: {NAME}}}\n"
        f"spec:\n  source: file:{MODEL}\n  engine: sglang\n  contextLength: 2048\n"
        f"  engineArgs: {json.dumps(ENGINE_ARGS)}\n"
    )
    fleet = start_fleet(root / "data", spec, env=fleet_env(work), timeout=600)
    yield fleet
    (replica,) = fleet.replicas(NAME)
    engine = {replica["pid"], *_children(replica["pid"])}
    assert len(engine) >= 3, engine  # the server, its scheduler and detokenizer at least
    assert fleet.stop() == 0
    assert [pid for pid in engine if alive(pid)] == [], "SGLang processes outlived gpufleet"


def client(fleet: Fleet, timeout: float = 120) -> OpenAI:
    return OpenAI(base_url=fleet.base_url, api_key=ADMIN_KEY, max_retries=0, timeout=timeout)


def metrics(fleet: Fleet) -> EngineLoad:
    """The engine's own ``/metrics`` (keyless, as the scraper reads it), parsed."""
    (replica,) = fleet.replicas(NAME)
    with urllib.request.urlopen(replica["url"] + "/metrics", timeout=10) as resp:
        return parse_sglang(resp.read().decode())


def engine_log(fleet: Fleet) -> str:
    request = urllib.request.Request(
        f"{fleet.server}/admin/v1/models/{NAME}/logs?tail=100000",
        headers={"authorization": f"Bearer {ADMIN_KEY}"},
    )
    with urllib.request.urlopen(request, timeout=10) as resp:
        text: str = resp.read().decode()
    return text


def test_chat_through_the_gateway(fleet: Fleet) -> None:
    reply = client(fleet).chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "Say hello."}], max_tokens=12
    )
    assert reply.model == NAME and reply.choices[0].message.content
    usage = reply.usage
    assert usage is not None and usage.prompt_tokens > 0 and 0 < usage.completion_tokens <= 12
    # --enable-cache-report, which the adapter adds: usage says how much of the prompt was cached.
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens is not None


def test_streaming_with_usage(fleet: Fleet) -> None:
    chunks = list(
        client(fleet).chat.completions.create(
            model=NAME,
            messages=[{"role": "user", "content": "Count to three."}],
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 2
    usage = chunks[-1].usage
    assert usage is not None and usage.prompt_tokens > 0 and 0 < usage.completion_tokens <= 8
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert [c for c in chunks[:-1] if c.usage is not None] == []


def test_metrics_parse_and_queueing_shows(fleet: Fleet) -> None:
    """--max-running-requests 2 and six concurrent requests: SGLang reports 2 running and some
    waiting, then none; its prompt-token counter counts them."""
    api = client(fleet, timeout=300)
    before = metrics(fleet)
    peak = {"running": 0.0, "waiting": 0.0}
    done = threading.Event()

    def ask(i: int) -> None:
        api.completions.create(
            model=NAME,
            prompt=f"Story {i}: once upon a time",
            max_tokens=16,
            extra_body={"ignore_eos": True},  # SGLang's own field: every request runs 16 steps
        )

    def watch() -> None:
        while not done.is_set():
            load = metrics(fleet)
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
    # Idle, SGLang publishes its gauges again once they disagree with what runs.
    after: EngineLoad = wait_until(
        lambda: (load := metrics(fleet)).running == 0 and load, timeout=60
    )
    assert after.waiting == 0 and after.kv_usage is not None and 0 <= after.kv_usage <= 1
    assert after.prefix_queries - before.prefix_queries >= 6 * 6  # six prompts of 6+ tokens


def test_a_shared_system_prompt_hits_the_prefix_cache(fleet: Fleet) -> None:
    """The second request reuses the first one's system prompt: SGLang's cached-token counter
    and the usage the client gets through the gateway both say so."""
    system = "You are a careful assistant for a bicycle repair shop. " * 50
    api = client(fleet)
    before = metrics(fleet)
    cached: list[int] = []
    prompts = 0
    for question in ("Is my bike ready?", "Can you true a wheel today?"):
        reply = api.chat.completions.create(
            model=NAME,
            messages=[
                {"role": "system", "content": system},
                {"role": "user", "content": question},
            ],
            max_tokens=1,
        )
        assert reply.usage is not None and reply.usage.prompt_tokens_details is not None
        cached.append(reply.usage.prompt_tokens_details.cached_tokens or 0)
        prompts += reply.usage.prompt_tokens
    first, second = cached
    assert prompts > 2 * 500, prompts  # the system prompt is ~550 tokens
    assert first < 64, cached  # new to the cache (only the chat template's opening may be)
    assert second >= 500, cached

    def counted() -> EngineLoad | None:  # the counters move as SGLang finishes a request
        load = metrics(fleet)
        return load if load.prefix_queries - before.prefix_queries >= prompts else None

    after: EngineLoad = wait_until(counted, timeout=30)
    assert after.prefix_hits - before.prefix_hits == first + second
    assert after.prefix_queries - before.prefix_queries == prompts


def test_the_replica_is_ready_only_once_sglang_answers(fleet: Fleet) -> None:
    """The readiness probe (``/health_generate``, a one-token generation) passed only after
    SGLang's own warm-up request: gpufleet's earlier probes reached it and were refused (503),
    so a listening port did not count as ready."""
    (replica,) = fleet.replicas(NAME)
    assert (replica["phase"], replica["restarts"]) == ("Ready", 0)
    assert replica["startup_s"] >= replica["load_s"] + replica["ready_s"] > 0
    events = fleet.admin(f"/admin/v1/events?model={NAME}")["events"]
    assert [e["reason"] for e in events].count("ReplicaReady") == 1
    lines = engine_log(fleet).splitlines()

    def first(fragment: str) -> int:
        return next(i for i, line in enumerate(lines) if fragment in line)

    ready = first('"GET /health_generate HTTP/1.1" 200')
    assert first('"POST /generate HTTP/1.1" 200') < ready  # SGLang's warm-up came first
    refused = [line for line in lines[:ready] if '"GET /health' in line and '" 503' in line]
    assert refused, "no probe reached SGLang before it was ready"


def test_sglang_answers_only_the_gateway_and_its_key_shows_in_no_log(fleet: Fleet) -> None:
    """SGLang takes the replica's secret as ``--api-key`` (it reads no variable): straight to its
    port without it is a 401; through the gateway it serves (above); its health paths and
    ``/metrics`` stay open for the probes and the scraper. SGLang prints its settings, key
    included, at start-up: the log gpufleet serves shows it masked, and no listing or gpufleet
    log line shows it."""
    (replica,) = fleet.replicas(NAME)
    url, pid = replica["url"], replica["pid"]
    assert url.startswith("http://127.0.0.1:")
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    key = argv[argv.index("--api-key") + 1]
    assert len(key) >= 32

    def status(path: str, body: bytes | None = None, token: str | None = None) -> int:
        headers = {"content-type": "application/json"}
        if token is not None:
            headers["authorization"] = f"Bearer {token}"
        request = urllib.request.Request(url + path, data=body, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=120) as resp:
                resp.read()
                return int(resp.status)
        except urllib.error.HTTPError as err:
            return int(err.code)

    chat = json.dumps(
        {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    ).encode()
    for wrong in (None, "guessed", ADMIN_KEY):
        assert status("/v1/chat/completions", chat, wrong) == 401
        assert status("/v1/models", token=wrong) == 401
    assert status("/v1/models", token=key) == 200  # the key it holds is the one that opens it
    for path in ("/health", "/health_generate", "/metrics"):
        assert status(path) == 200, path
    log = engine_log(fleet)
    assert "'api_key': '***'" in log  # SGLang printed it; gpufleet masked it
    places = {
        "replicas": json.dumps(fleet.admin("/admin/v1/replicas")),
        "models": json.dumps(fleet.admin("/admin/v1/models")),
        "events": json.dumps(fleet.admin("/admin/v1/events")),
        "the engine's log": log,
        "gpufleet's log": fleet.stderr(),
    }
    assert [where for where, text in places.items() if key in text] == []


def test_every_field_sglang_reads_is_one_the_gateway_passes() -> None:
    """SGLang's request models (of the installed version) against ``known_fields``: a field
    SGLang gains fails here until the gateway knows it, so no SGLang user is refused."""
    script = (
        "import json\n"
        "from sglang.srt.entrypoints.openai import protocol as p\n"
        "print(json.dumps({\n"
        "    '/v1/chat/completions': sorted(p.ChatCompletionRequest.model_fields),\n"
        "    '/v1/completions': sorted(p.CompletionRequest.model_fields),\n"
        "    '/v1/embeddings': sorted(p.EmbeddingRequest.model_fields),\n"
        "}))\n"
    )
    done = subprocess.run(
        [str(VENV / "bin" / "python"), "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
        env={**os.environ, "SGLANG_USE_CPU_ENGINE": "1"},
    )
    fields = json.loads(done.stdout.strip().splitlines()[-1])
    for route, names in fields.items():
        missing = set(names) - GATEWAY_ONLY - KNOWN_FIELDS[route]
        assert names and not missing, (route, missing)
