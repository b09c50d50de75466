"""A gateway (``ClusterPlane``, as ``gpufleet gateway`` builds it) and the operator on the real
API server: a model applied through the gateway's admin API becomes a Model resource the API
server accepts, the operator starts its pod, the test's kubelet points the pod at an engine
emulator on 127.0.0.1, and a chat through the official SDK is answered; a model the fleet
cannot place is refused at once with the planner's reason. The engine answers only the
gateway: the operator made the engine key's Secret, the pod reads it from there, the emulator
requires it (401 straight to the engine), and the gateway sends it."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from openai import AsyncOpenAI

from gpufleet.cluster import ClusterPlane
from gpufleet.emulator import EmulatedEngine, ReplicaServer
from gpufleet.gateway import GatewaySettings
from gpufleet.hardware import CATALOG
from gpufleet.operator import Operator, OperatorConfig
from gpufleet.operator.process import acting
from gpufleet.runtime.kubernetes import RenderSettings
from gpufleet.runtime.kubernetes.client import ClientKube
from gpufleet.runtime.kubernetes.pods import ENGINE_KEY_SECRET, ENGINE_KEY_SECRET_KEY
from gpufleet.sizing import load_architecture
from gpufleet.sizing.performance import PerfModel
from gpufleet.store import Store, sqlite_url
from tests import sites
from tests.conftest import free_port
from tests.kube.conftest import Nodes
from tests.kube.kubelet import Kubelet
from tests.kube.test_operator import eventually

CONFIG = Path(__file__).parents[1] / "data" / "configs" / "llama-3-8b.json"


def document(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "gpufleet.io/v1alpha1",
        "kind": "Model",
        "metadata": {"name": name},
        "spec": {
            "source": "hf://meta-llama/Meta-Llama-3-8B-Instruct",
            "engine": "vllm",
            "resources": {"gpus": 1, "gpuTypes": ["H100"], "memory": "20Gi"},
            # Durations as the spec writes them back: must be what the CRD accepts.
            "drain": "1.5s",
            "autoscaling": {"scaleDownDelay": "2m"},
            **spec,
        },
    }


@contextlib.asynccontextmanager
async def engine(port: int, key: str) -> AsyncIterator[int]:
    """The engine the test's kubelet points pods at, requiring the Secret's key as the real
    engines do."""
    perf = PerfModel(load_architecture(CONFIG), CATALOG["H100"])
    server = ReplicaServer(EmulatedEngine(perf, 400_000, time_scale=0.01), "llama", api_key=key)
    await server.start("127.0.0.1", port)
    try:
        yield port
    finally:
        await server.stop()


@dataclasses.dataclass
class Fleet:
    """The operator's parts and a gateway as ``gpufleet gateway`` builds it, served on HTTP."""

    operator: Operator
    plane: ClusterPlane
    url: str
    http: aiohttp.ClientSession
    #: The engine key, from the Secret the operator made.
    engine_key: str

    async def post(self, path: str, body: Any) -> tuple[int, Any]:
        async with self.http.post(self.url + path, json=body) as resp:
            return resp.status, await resp.json()

    async def get(self, path: str) -> Any:
        async with self.http.get(self.url + path) as resp:
            assert resp.status == 200, await resp.text()
            return await resp.json()


@contextlib.asynccontextmanager
async def fleet(
    kube: ClientKube, namespace: str, tmp_path: Path, port: int
) -> AsyncIterator[Fleet]:
    async with contextlib.AsyncExitStack() as stack:
        settings = RenderSettings(namespace=namespace, engine_port=port)
        store = Store.open(sqlite_url(tmp_path))
        stack.callback(store.close)
        cfg = OperatorConfig(namespace=namespace, store_url="", settings=settings)
        operator = await stack.enter_async_context(acting(cfg, kube, store))
        secret = await kube.get("Secret", namespace, ENGINE_KEY_SECRET)
        assert secret is not None, "the operator makes the engine key's Secret"
        key = base64.b64decode(secret["data"][ENGINE_KEY_SECRET_KEY]).decode()
        # What the chart's secretKeyRef gives the gateway (GPUFLEET_ENGINE_KEY).
        plane = ClusterPlane(
            kube, store, namespace, gateway_id="gw-test", engine_port=port, engine_key=key
        )
        await plane.start()
        stack.push_async_callback(plane.close)
        gateway = await stack.enter_async_context(
            sites.gateway(plane, GatewaySettings(hold_s=60), auth=False)
        )
        http = await stack.enter_async_context(aiohttp.ClientSession())
        yield Fleet(operator, plane, gateway.url, http, key)


@pytest.mark.usefixtures("model_cache", "priority_classes")
async def test_apply_through_the_gateway_serve_and_refuse_what_cannot_be_placed(
    kube: ClientKube,
    namespace: str,
    nodes: Nodes,
    kubelet: Kubelet,
    kubectl: Callable[..., Any],
    tmp_path: Path,
) -> None:
    await nodes.add(f"{namespace}-gpu-a", gpus=1)
    async with contextlib.AsyncExitStack() as stack:
        port = free_port()
        f = await stack.enter_async_context(fleet(kube, namespace, tmp_path, port))
        await stack.enter_async_context(engine(port, f.engine_key))
        operator, plane, url, http, post = f.operator, f.plane, f.url, f.http, f.post
        assert len(f.engine_key) >= 32

        status, body = await post("/admin/v1/models", {"documents": [document("llama")]})
        assert status == 200, body
        # The API server holds it as written (durations as int-or-string).
        got = kubectl("get", "-n", namespace, "model", "llama", "-o", "jsonpath={.spec.drain}")
        assert got.stdout == "1500ms"

        async def served() -> bool:
            await operator.sync()
            entry = plane.directory.get("llama")
            return entry is not None and bool(entry.endpoints)

        await eventually(served, timeout=90)
        client = AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        stack.push_async_callback(client.close)
        reply = await client.chat.completions.create(
            model="llama", messages=[{"role": "user", "content": "hi"}], max_tokens=3
        )
        assert reply.system_fingerprint == "gpufleet-emulator"
        # Straight to the engine, past the gateway: refused without the key.
        chat = {"model": "llama", "messages": [{"role": "user", "content": "hi"}]}
        async with http.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=chat) as resp:
            assert resp.status == 401
        # The pod reads the key from the Secret; the key itself is nowhere in its spec.
        pods = kubectl(
            "get", "pods", "-n", namespace, "-l", "gpufleet.io/model=llama", "-o", "json"
        )
        assert pods.stdout.count(ENGINE_KEY_SECRET) >= 1 and f.engine_key not in pods.stdout
        listing = await f.get("/admin/v1/replicas")
        assert listing["replicas"] and f.engine_key not in str(listing)
        # One GPU, taken: a second model of the same priority cannot be placed. The gateway
        # learns it from the Model's status and refuses at once, with the planner's reason.
        status, body = await post("/admin/v1/models", {"documents": [document("second")]})
        assert status == 200, body

        async def refused() -> bool:
            await operator.sync()
            entry = plane.directory.get("second")
            return entry is not None and entry.status == "Unschedulable"

        await eventually(refused, timeout=90)
        async with http.post(
            url + "/v1/chat/completions",
            json={"model": "second", "messages": [{"role": "user", "content": "hi"}]},
        ) as resp:
            assert resp.status == 503
            error = (await resp.json())["error"]
        assert "H100" in error["message"] and "none became ready" not in error["message"]
        # The first model still serves.
        reply = await client.chat.completions.create(
            model="llama", messages=[{"role": "user", "content": "again"}], max_tokens=3
        )
        assert reply.choices


@pytest.mark.usefixtures("model_cache", "priority_classes")
async def test_a_model_that_cannot_start_shows_why_in_the_gateways_list(
    kube: ClientKube,
    namespace: str,
    nodes: Nodes,
    kubelet: Kubelet,
    tmp_path: Path,
) -> None:
    """What ``gpufleet get models`` prints on a cluster: a model whose replicas cannot start is
    Failed with the reason (not "Starting"), one whose engine crash-loops is BackOff."""
    await nodes.add(f"{namespace}-gpu-a", gpus=2)
    kubelet.policy = lambda pod: (
        "crash" if pod["metadata"]["labels"].get("gpufleet.io/model") == "crashing" else "ready"
    )
    async with fleet(kube, namespace, tmp_path, free_port()) as f:
        # A file on one machine's disk: the operator cannot give it to a pod.
        local = document("local", source=f"file:{CONFIG}", engine="llamacpp")
        local["spec"]["resources"] = {"gpus": 0, "memory": "1Gi"}
        status, body = await f.post(
            "/admin/v1/models", {"documents": [local, document("crashing")]}
        )
        assert status == 200, body

        async def listed() -> Any:
            await f.operator.sync()
            rows = {m["name"]: m for m in (await f.get("/admin/v1/models"))["models"]}
            done = (
                rows.get("local", {}).get("status") == "Failed"
                and rows.get("crashing", {}).get("status") == "BackOff"
            )
            return rows if done else None

        rows = await eventually(listed, timeout=90)
        assert "local to one machine" in rows["local"]["problem"], rows["local"]
        obj = await kube.get("Model", namespace, "local")
        assert obj is not None
        ready = next(c for c in obj["status"]["conditions"] if c["type"] == "Ready")
        assert ready["status"] == "False" and ready["reason"] == "Failed"
        replicas = (await f.get("/admin/v1/replicas"))["replicas"]
        crashing = [r for r in replicas if r["model"] == "crashing"]
        assert crashing and all("CrashLoopBackOff" in r["message"] for r in crashing), crashing
