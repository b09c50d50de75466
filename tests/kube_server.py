"""A Kubernetes API server over HTTP for tests, backed by ``FakeKube``: the REST paths, list
and watch (JSON lines, resumed from a resourceVersion, 410 Gone once ``compact``ed), discovery,
pod logs, status patches, and the answers a real server gives — ``Status`` objects for 404 and
409, and the plain-text ``404 page not found`` for a kind it does not serve."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web

from gpufleet.runtime.kubernetes import FakeKube
from gpufleet.runtime.kubernetes.api import Conflict, Gone, KubeError
from gpufleet.runtime.kubernetes.client import KINDS
from tests.conftest import free_port

_BY_PLURAL = {(k.api_version, k.plural): kind for kind, k in KINDS.items()}


def _route(path: str) -> tuple[str, str | None, str, str | None, str]:
    """(api version, kind or None for discovery, namespace, name, subresource) of a path."""
    parts = path.strip("/").split("/")
    if parts[0] == "api":
        version, rest = "v1", parts[2:]
    else:
        version, rest = f"{parts[1]}/{parts[2]}", parts[3:]
    if not rest:
        return version, None, "", None, ""
    namespace = ""
    if len(rest) >= 3 and rest[0] == "namespaces":  # namespaces/{ns}/{plural}[/{name}]
        namespace, rest = rest[1], rest[2:]
    kind = _BY_PLURAL.get((version, rest[0]), "")
    name = rest[1] if len(rest) > 1 else None
    return version, kind, namespace, name, rest[2] if len(rest) > 2 else ""


def _labels(selector: str | None) -> dict[str, str] | None:
    if not selector:
        return None
    return dict(part.split("=", 1) for part in selector.split(","))


def _status(code: int, reason: str, message: str) -> web.Response:
    body = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message,
            "reason": reason, "code": code}  # fmt: skip
    return web.json_response(body, status=code)


def _page_not_found() -> web.Response:
    return web.Response(status=404, text="404 page not found\n", content_type="text/plain")


def app_for(kube: FakeKube) -> web.Application:
    watches: set[asyncio.Task[object]] = set()

    def discovery(version: str) -> web.Response:
        resources: list[dict[str, Any]] = [
            {"name": k.plural, "kind": kind, "namespaced": k.namespaced}
            for kind, k in KINDS.items()
            if k.api_version == version and kind not in kube.unserved
        ]
        if not resources:
            return _page_not_found()
        return web.json_response(
            {"kind": "APIResourceList", "groupVersion": version, "resources": resources}
        )

    async def watch(
        request: web.Request, kind: str, scope: str, selector: dict[str, str] | None
    ) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        task = asyncio.current_task()
        assert task is not None
        watches.add(task)
        since = request.query.get("resourceVersion") or None
        try:
            async for event in kube.changes(kind, scope, selector, since=since):
                line = json.dumps({"type": event.type, "object": event.object}) + "\n"
                await resp.write(line.encode())
        except Gone as exc:
            error = {"kind": "Status", "code": 410, "reason": "Expired", "message": str(exc)}
            await resp.write((json.dumps({"type": "ERROR", "object": error}) + "\n").encode())
        finally:
            watches.discard(task)
        return resp

    async def handle(request: web.Request) -> web.StreamResponse:
        version, kind, namespace, name, sub = _route(request.path)
        if kind is None:
            return discovery(version)
        if not kind or kind in kube.unserved:
            return _page_not_found()
        scope = namespace if KINDS[kind].namespaced else ""
        if request.method == "GET" and name is None:
            selector = _labels(request.query.get("labelSelector"))
            if request.query.get("watch") == "true":
                return await watch(request, kind, scope, selector)
            items = await kube.list(kind, scope, selector)
            return web.json_response(
                {
                    "kind": f"{kind}List",
                    "metadata": {"resourceVersion": kube.version},
                    "items": items,
                }
            )
        if request.method == "POST":
            try:
                return web.json_response(await kube.create(await request.json()), status=201)
            except FileExistsError as exc:
                return _status(409, "AlreadyExists", str(exc))
        assert name is not None
        if request.method == "GET" and sub == "log":
            tail = request.query.get("tailLines")
            try:
                text = await kube.logs(
                    scope, name, container=request.query.get("container"),
                    tail=int(tail) if tail else None,
                )  # fmt: skip
            except KubeError as exc:
                return _status(exc.status or 500, "NotFound", str(exc))
            return web.Response(text=text, content_type="text/plain")
        if request.method == "GET":
            found = await kube.get(kind, scope, name)
            if found is None:
                return _status(404, "NotFound", f'{KINDS[kind].plural} "{name}" not found')
            return web.json_response(found)
        if request.method == "DELETE":
            if kube.peek(kind, scope, name) is None:
                return _status(404, "NotFound", f'{KINDS[kind].plural} "{name}" not found')
            await kube.delete(kind, scope, name)
            return web.json_response({"kind": "Status", "status": "Success"})
        if request.method == "PUT":
            try:
                return web.json_response(await kube.replace(await request.json()))
            except Conflict as exc:
                return _status(409, "Conflict", str(exc))
            except KeyError:
                return _status(404, "NotFound", f'{KINDS[kind].plural} "{name}" not found')
        if request.method == "PATCH" and sub == "status":
            if kube.peek(kind, scope, name) is None:
                return _status(404, "NotFound", f'{KINDS[kind].plural} "{name}" not found')
            patch = await request.json()
            await kube.patch_status(kind, scope, name, patch["status"])
            return web.json_response(await kube.get(kind, scope, name))
        return _status(405, "MethodNotAllowed", "unsupported")

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
