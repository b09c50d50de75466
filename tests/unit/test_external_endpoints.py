"""External endpoints' replicas (``runtime/external.py``): keys read from where the spec says,
readiness from the endpoint's own answer, nothing started."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from aiohttp import web

from gpufleet.runtime import Phase, Replica, ReplicaRequest
from gpufleet.runtime.external import ExternalEndpoints, KeyError_, base_url, read_key
from gpufleet.spec import ApiKeySource, load_text
from tests.conftest import eventually, free_port


def test_the_base_url_drops_the_v1_the_gateway_adds() -> None:
    assert base_url("https://api.example.com/v1") == "https://api.example.com"
    assert base_url("http://10.0.0.5:8000/v1/") == "http://10.0.0.5:8000"
    assert base_url("https://gw.example.com/openai/v1") == "https://gw.example.com/openai"


def test_a_key_is_read_from_the_environment_or_a_file(tmp_path: Path) -> None:
    assert read_key(ApiKeySource(env="K"), {"K": " sk-1 \n"}) == "sk-1"
    with pytest.raises(KeyError_, match=r"apiKey\.env: K is not set"):
        read_key(ApiKeySource(env="K"), {})
    keyfile = tmp_path / "key"
    keyfile.write_text("sk-2\nanything after the first line\n")
    assert read_key(ApiKeySource(file=str(keyfile))) == "sk-2"
    with pytest.raises(KeyError_, match=r"apiKey\.file: cannot read"):
        read_key(ApiKeySource(file=str(tmp_path / "missing")))
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(KeyError_, match="is empty"):
        read_key(ApiKeySource(file=str(tmp_path / "empty")))
    with pytest.raises(KeyError_, match="secretKeyRef is read on Kubernetes"):
        read_key(ApiKeySource.model_validate({"secretKeyRef": {"name": "s", "key": "k"}}))


@asynccontextmanager
async def endpoint(keys: set[str]) -> AsyncIterator[tuple[str, list[str]]]:
    """A server answering ``GET /v1/models`` to the ``keys`` (which may change) alone; yields
    its URL and the authorization headers it saw."""
    seen: list[str] = []

    async def models(request: web.Request) -> web.Response:
        seen.append(request.headers.get("authorization", ""))
        if request.headers.get("authorization", "").removeprefix("Bearer ") not in keys:
            return web.json_response({"error": "no"}, status=401)
        return web.json_response({"data": [{"id": "m"}]})

    app = web.Application()
    app.router.add_get("/v1/models", models)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}/v1", seen
    finally:
        await runner.cleanup()


def request(url: str, key_file: Path, location: str = "external") -> ReplicaRequest:
    spec = load_text(
        "apiVersion: gpufleet.io/v1alpha1\nkind: Model\nmetadata: {name: hosted}\n"
        "spec: {engine: external, pricing: {perMillionInputTokens: 1, perMillionOutputTokens: 2},"
        f" endpoints: [{{url: '{url}', model: up-name, location: {location},"
        f" apiKey: {{file: '{key_file}'}}}}]}}\n"
    )[0].spec
    return ReplicaRequest("hosted", 1, spec)


async def test_ready_while_the_endpoint_takes_the_key_and_a_rotated_key_is_picked_up(
    tmp_path: Path,
) -> None:
    published: list[Replica] = []
    endpoints = ExternalEndpoints(published.append, probe_s=0.05)
    key_file = tmp_path / "key"
    key_file.write_text("sk-old\n")
    try:
        keys = {"sk-old"}
        async with endpoint(keys) as (url, seen):
            started = await endpoints.start(request(url, key_file))
            assert started.phase is Phase.STARTING and started.url is None
            ready = await eventually(
                lambda: next((r for r in endpoints.replicas() if r.routable), None), "ready"
            )
            assert ready.url == url.removesuffix("/v1") and ready.api_key == "sk-old"
            assert (ready.served_model, ready.external) == ("up-name", True)
            assert "sk-old" not in repr(ready)
            key_file.write_text("sk-new\n")  # rotated: refused until the server takes it too
            await eventually(
                lambda: endpoints.replicas()[0].phase is Phase.UNREADY, "refused the new key"
            )
            assert "refused the key (401)" in endpoints.replicas()[0].message
            assert seen[-1] == "Bearer sk-new"
            keys.add("sk-new")  # the server takes it now: ready again, with the new key
            again = await eventually(
                lambda: next((r for r in endpoints.replicas() if r.routable), None), "ready"
            )
            assert again.api_key == "sk-new"
        await endpoints.stop(ready.id)
        assert published[-1].phase is Phase.STOPPED and not endpoints.replicas()
    finally:
        await endpoints.close()


async def test_a_key_that_cannot_be_read_fails_the_replica_naming_the_field(
    tmp_path: Path,
) -> None:
    endpoints = ExternalEndpoints(lambda _r: None, probe_s=0.05)
    try:
        async with endpoint({"sk"}) as (url, seen):
            await endpoints.start(request(url, tmp_path / "nowhere", location="internal"))
            failed = await eventually(
                lambda: next((r for r in endpoints.replicas() if r.phase is Phase.FAILED), None),
                "failed",
            )
            assert "apiKey.file: cannot read" in failed.message and not failed.external
            await asyncio.sleep(0)
            assert seen == []  # nothing was asked without the key
    finally:
        await endpoints.close()
