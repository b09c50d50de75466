"""External endpoints on Kubernetes: keys read from the Secrets their specs name (never copied
anywhere), no pod, no weights; the gateway probes them itself and routes to them (the stateful
fake API here; tests/kube/test_external.py runs the same on the real API server, with the
chart's RBAC)."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from openai import AsyncOpenAI

from gpufleet.cluster import ClusterPlane
from gpufleet.emulator import ReplicaServer
from gpufleet.gateway import GatewaySettings
from gpufleet.runtime import Phase, ReplicaRequest
from gpufleet.runtime.external import KeyError_
from gpufleet.runtime.kubernetes import FakeKube, KubernetesRuntime, RenderSettings, render
from gpufleet.runtime.kubernetes.api import Forbidden
from gpufleet.runtime.kubernetes.checks import check
from gpufleet.runtime.kubernetes.secret_keys import SecretKeys
from gpufleet.spec import ApiKeySource, Model, load_text
from gpufleet.store import Store, sqlite_url
from tests import sites
from tests.conftest import eventually, free_port

NS = "gpufleet"


def document(url: str, api_key: dict[str, Any] | None = None, name: str = "hosted") -> str:
    key = api_key or {"secretKeyRef": {"name": "hosted-key", "key": "key"}}
    return (
        f"apiVersion: gpufleet.io/v1alpha1\nkind: Model\nmetadata: {{name: {name}}}\n"
        "spec: {engine: external, pricing: {perMillionInputTokens: 1, perMillionOutputTokens: 2},"
        f" endpoints: [{{url: '{url}', model: llama, location: internal, apiKey: {key}}}]}}\n"
    )


def model(url: str = "http://127.0.0.1:1/v1", **kw: Any) -> Model:
    return load_text(document(url, **kw))[0]


def secret(value: str, name: str = "hosted-key") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": NS},
        "data": {"key": base64.b64encode(value.encode()).decode()},
    }


def ref(name: str = "hosted-key", key: str = "key") -> ApiKeySource:
    return ApiKeySource.model_validate({"secretKeyRef": {"name": name, "key": key}})


async def test_a_key_is_read_from_the_secret_its_ref_names_or_the_fix_is_said() -> None:
    kube = FakeKube()
    keys = SecretKeys(kube, NS)
    with pytest.raises(KeyError_, match=r"Secret gpufleet/hosted-key does not exist; kubectl"):
        await keys(ref())
    await kube.create(secret(" sk-1\n"))
    assert await keys(ref()) == "sk-1"
    with pytest.raises(KeyError_, match=r"has no key 'other'"):
        await keys(ref(key="other"))
    with pytest.raises(KeyError_, match=r"apiKey\.env and apiKey\.file are read by gpufleet up"):
        await keys(ApiKeySource(env="K"))

    class Refusing(FakeKube):
        async def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
            raise Forbidden(f"secrets {name!r} is forbidden")

    with pytest.raises(KeyError_, match=r"externalEndpoints\.keySecrets"):
        await SecretKeys(Refusing(), NS)(ref())


def test_kubernetes_takes_external_models_with_secret_keys_and_renders_nothing_for_them() -> None:
    settings = RenderSettings(namespace=NS)
    assert check(model(), settings) == []
    (by_env,) = load_text(document("http://10.0.0.5:8000/v1", api_key={"env": "HOSTED_KEY"}))
    (problem,) = check(by_env, settings)
    assert "spec.endpoints[0].apiKey.env is read by gpufleet up" in problem
    assert "externalEndpoints.keySecrets" in problem
    vllm = load_text(
        "apiVersion: gpufleet.io/v1alpha1\nkind: Model\nmetadata: {name: llama}\n"
        "spec: {source: 'hf://meta-llama/Meta-Llama-3-8B-Instruct', engine: vllm,"
        " resources: {gpus: 1}}\n"
    )[0]
    objects = render([model(), vllm], settings=settings)
    names = [o["metadata"]["name"] for o in objects]
    assert "engine-llama" in names and not any("hosted" in n for n in names)


async def test_the_runtime_probes_an_external_model_with_its_secret_and_starts_no_pod() -> None:
    kube = FakeKube()
    port = free_port()
    server = ReplicaServer(sites.emulated(time_scale=0.01), "llama", api_key="sk-1")
    await server.start("127.0.0.1", port)
    runtime = KubernetesRuntime(kube, RenderSettings(namespace=NS))
    runtime.external.probe_s = 0.05
    try:
        request = ReplicaRequest("hosted", 1, model(f"http://127.0.0.1:{port}/v1").spec)
        started = await runtime.start(request)
        # No Secret yet: the replica waits, saying why, and is ready once the Secret exists.
        waiting = await eventually(
            lambda: next((r for r in runtime.replicas() if "does not exist" in r.message), None),
            "waiting for its Secret",
        )
        assert waiting.phase is Phase.STARTING and not waiting.routable
        await kube.create(secret("sk-1"))
        ready = await eventually(
            lambda: next((r for r in runtime.replicas("hosted") if r.routable), None), "ready"
        )
        assert ready.id == started.id and ready.api_key == "sk-1"
        assert ready.url == f"http://127.0.0.1:{port}"
        assert await kube.list("Pod", NS) == [] and await kube.list("Job", NS) == []
        with pytest.raises(Exception, match="external endpoint"):
            await runtime.logs(ready.id)
        await runtime.stop(ready.id)
        assert runtime.replicas() == []
    finally:
        await runtime.close()
        await server.stop()


@pytest.fixture
async def endpoint() -> AsyncIterator[tuple[ReplicaServer, int]]:
    port = free_port()
    server = ReplicaServer(sites.emulated(time_scale=0.01), "llama", api_key="sk-1")
    await server.start("127.0.0.1", port)
    try:
        yield server, port
    finally:
        await server.stop()


async def test_the_gateway_follows_an_external_model_and_serves_it_with_the_secrets_key(
    tmp_path: Path, endpoint: tuple[ReplicaServer, int]
) -> None:
    _, port = endpoint
    kube = FakeKube()
    store = Store.open(sqlite_url(tmp_path))
    plane = ClusterPlane(kube, store, NS, gateway_id="gw-test")
    plane.pods.external.probe_s = 0.05
    await kube.create(secret("sk-1"))
    resource = load_text(document(f"http://127.0.0.1:{port}/v1"))[0].document()
    resource["metadata"] = {"name": "hosted", "namespace": NS, "generation": 1}
    try:
        await plane.start()
        async with sites.gateway(plane, GatewaySettings(hold_s=10), auth=False) as gateway:
            await kube.create(resource)
            entry = await eventually(
                lambda: (e := plane.directory.get("hosted")) is not None and e.endpoints and e,
                "the endpoint routed to",
            )
            assert entry.desired == 1
            client = AsyncOpenAI(base_url=gateway.url + "/v1", api_key="none", max_retries=0)
            reply = await client.chat.completions.create(
                model="hosted", messages=[{"role": "user", "content": "hi"}], max_tokens=3
            )
            await client.close()
            assert reply.system_fingerprint == "gpufleet-emulator"
            # A new generation replaces the replica; deleting the Model stops it.
            first = plane.pods.external.replicas("hosted")[0].id
            have = await kube.get("Model", NS, "hosted")
            assert have is not None
            have["metadata"]["generation"] = 2
            have["spec"]["endpoints"][0]["location"] = "external"
            await kube.replace(have)
            await eventually(
                lambda: [r.generation for r in plane.pods.external.replicas("hosted")] == [2],
                "generation 2 alone",
            )
            assert first not in {r.id for r in plane.pods.external.replicas()}
            await kube.delete("Model", NS, "hosted")
            await eventually(lambda: plane.pods.external.replicas() == [], "stopped")
    finally:
        await plane.close()
        store.close()
