"""An ``engine: external`` model on the real API server: the operator and a gateway (as
``gpufleet gateway`` builds it) each probe the endpoint with the key the Secret holds — the
operator for the Model's status, the gateway to route — no pod, Service or loader Job is made,
a chat through the official SDK is answered by the endpoint (an engine emulator in this process,
standing in for a server gpufleet does not run, requiring its own key), the key is nowhere in
what the API or the gateway show, and a rotated Secret is used without a restart."""

from __future__ import annotations

import base64
import contextlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from openai import APIStatusError, AsyncOpenAI

from gpufleet.runtime.kubernetes.client import ClientKube
from tests.conftest import free_port
from tests.kube.test_gateway import engine, fleet
from tests.kube.test_operator import eventually


def document(port: int) -> dict[str, Any]:
    return {
        "apiVersion": "gpufleet.io/v1alpha1",
        "kind": "Model",
        "metadata": {"name": "hosted"},
        "spec": {
            "engine": "external",
            "endpoints": [
                {
                    "url": f"http://127.0.0.1:{port}/v1",
                    "model": "llama",
                    "location": "internal",
                    "apiKey": {"secretKeyRef": {"name": "hosted-key", "key": "key"}},
                }
            ],
            "pricing": {"perMillionInputTokens": 0.5, "perMillionOutputTokens": 1.5},
        },
    }


def key_secret(namespace: str, value: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "hosted-key", "namespace": namespace},
        "data": {"key": base64.b64encode(value.encode()).decode()},
    }


async def test_an_external_model_is_probed_and_served_with_its_secrets_key_and_no_pod(
    kube: ClientKube, namespace: str, kubectl: Callable[..., Any], tmp_path: Path
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        f = await stack.enter_async_context(fleet(kube, namespace, tmp_path, free_port()))
        f.plane.pods.external.probe_s = 0.2
        port = free_port()
        first = contextlib.AsyncExitStack()
        stack.push_async_callback(first.aclose)
        await first.enter_async_context(engine(port, "sk-first"))
        await kube.create(key_secret(namespace, "sk-first"))
        status, body = await f.post("/admin/v1/models", {"documents": [document(port)]})
        assert status == 200, body

        async def ready() -> Any:
            await f.operator.sync()
            model = await kube.get("Model", namespace, "hosted")
            entry = f.plane.directory.get("hosted")
            done = (model or {}).get("status", {}).get("readyReplicas") == 1
            return done and entry is not None and entry.endpoints and model

        model = await eventually(ready, timeout=90)
        assert model["status"]["desiredReplicas"] == 1
        client = AsyncOpenAI(base_url=f.url + "/v1", api_key="none", max_retries=0)
        stack.push_async_callback(client.close)
        reply = await client.chat.completions.create(
            model="hosted", messages=[{"role": "user", "content": "hi"}], max_tokens=3
        )
        assert reply.system_fingerprint == "gpufleet-emulator"
        # Nothing runs in the cluster for it.
        for kind in ("pods", "services", "jobs"):
            listed = kubectl("get", kind, "-n", namespace, "-o", "name").stdout
            assert "hosted" not in listed, (kind, listed)
        # The key is in its Secret only: not in the Model, its status, or the gateway's lists.
        shown = json.dumps(await kube.get("Model", namespace, "hosted"))
        shown += json.dumps(await f.get("/admin/v1/replicas"))
        shown += json.dumps(await f.get("/admin/v1/models"))
        assert "sk-first" not in shown and "hosted-key" in shown

        # The key rotates: the endpoint takes only the new one, the Secret is updated, and the
        # gateway sends it from its next probe on — no restart.
        await first.aclose()
        await stack.enter_async_context(engine(port, "sk-second"))
        secret = await kube.get("Secret", namespace, "hosted-key")
        assert secret is not None
        secret["data"] = key_secret(namespace, "sk-second")["data"]
        await kube.replace(secret)

        async def served_again() -> bool:
            with contextlib.suppress(APIStatusError):
                await client.chat.completions.create(
                    model="hosted", messages=[{"role": "user", "content": "hi"}], max_tokens=3
                )
                return True
            return False

        await eventually(served_again, timeout=60)

        # Deleted: the gateway stops probing it.
        await kube.delete("Model", namespace, "hosted")

        async def gone() -> bool:
            await f.operator.sync()
            return not f.plane.pods.external.replicas("hosted")

        await eventually(gone, timeout=60)
