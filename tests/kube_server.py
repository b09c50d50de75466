"""A Kubernetes API server over HTTP for tests, backed by ``FakeKube``: the REST paths, list
and watch (JSON lines), 404/409 answers and status patches that ``ClientKube`` uses."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiohttp import web

from gpufleet.runtime.kubernetes import FakeKube
from gpufleet.runtime.kubernetes.api import Conflict
from gpufleet.runtime.kubernetes.client import KINDS
from tests.conftest import free_port

_BY_PLURAL = {(k.api_version, k.plural): kind for kind, k in KINDS.items()}


def _route(path: str) -> tuple[str, str, str | None, bool]:
    """(kind, namespace, name, status subresource) of a REST path."""
    parts = path.strip("/").split("/")
    if parts[0] == "api":
        version, rest = "v1", parts[2:]
    else:
        version, rest = f"{parts[1]}/{parts[2]}", parts[3:]
    namespace = ""
    if len(rest) >= 3 and rest[0] == "namespaces":  # namespaces/{ns}/{plural}[/{name}]
        namespace, rest = rest[1], rest[2:]
    kind = _BY_PLURAL[(version, rest[0])]
    name = rest[1] if len(rest) > 1 else None
    return kind, namespace, name, len(rest) > 2 and rest[2] == "status"


def _labels(selector: str | None) -> dict[str, str] | None:
    if not selector:
        return None
    return dict(part.split("=", 1) for part in selector.split(","))


def app_for(kube: FakeKube) -> web.Application:
    watches: set[asyncio.Task[object]] = set()

    async def handle(request: web.Request) -> web.StreamResponse:
        kind, namespace, name, status = _route(request.path)
        scope = namespace if KINDS[kind].namespaced else ""
        if request.method == "GET" and name is None:
            selector = _labels(request.query.get("labelSelector"))
            if request.query.get("watch") == "true":
                resp = web.StreamResponse()
                await resp.prepare(request)
                task = asyncio.current_task()
                assert task is not None
                watches.add(task)
                try:
                    async for event in kube.watch(kind, scope, selector):
                        line = json.dumps({"type": event.type, "object": event.object}) + "\n"
                        await resp.write(line.encode())
                finally:
                    watches.discard(task)
                return resp
            items = await kube.list(kind, scope, selector)
            return web.json_response(
                {"kind": f"{kind}List", "metadata": {"resourceVersion": "1"}, "items": items}
            )
        if request.method == "POST":
            try:
                return web.json_response(await kube.create(await request.json()), status=201)
            except FileExistsError as exc:
                return web.json_response({"message": str(exc)}, status=409)
        assert name is not None
        if request.method == "GET":
            found = await kube.get(kind, scope, name)
            if found is None:
                return web.json_response({"message": "not found"}, status=404)
            return web.json_response(found)
        if request.method == "DELETE":
            await kube.delete(kind, scope, name)
            return web.json_response({"status": "Success"})
        if request.method == "PUT":
            try:
                return web.json_response(await kube.replace(await request.json()))
            except Conflict as exc:
                return web.json_response({"message": str(exc)}, status=409)
            except KeyError:
                return web.json_response({"message": "not found"}, status=404)
        if request.method == "PATCH" and status:
            patch = await request.json()
            await kube.patch_status(kind, scope, name, patch["status"])
            return web.json_response(await kube.get(kind, scope, name))
        return web.json_response({"message": "unsupported"}, status=405)

    async def end_watches(_: web.Application) -> None:
        for task in list(watches):
            task.cancel()

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    app.on_shutdown.append(end_watches)
    return app


@asynccontextmanager
async def serving(kube: FakeKube) -> AsyncIterator[str]:
    runner = web.AppRunner(app_for(kube))
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()
