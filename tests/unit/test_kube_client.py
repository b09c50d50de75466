"""``ClientKube`` over HTTP against the fake API server (``tests.kube_server``): what the real
server tier (``tests/kube/test_client.py``) proves too, fast — tokens read from every client
release's place, kinds that are not served reported as such (a plain-text 404 is no crash),
a watch that yields its initial list and derives deletions after 410 Gone, pod logs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gpufleet.runtime.kubernetes import FakeKube
from gpufleet.runtime.kubernetes.api import NotServed, WatchEvent
from gpufleet.runtime.kubernetes.client import ClientKube, bearer_token
from tests.kube_server import serving

NS = "gpufleet"


def pod(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "labels": {"app": "x"}},
        "spec": {"containers": [{"name": "engine", "image": "x"}]},
    }


@pytest.fixture
async def api() -> AsyncIterator[tuple[FakeKube, ClientKube]]:
    kube = FakeKube()
    async with serving(kube) as url:
        client = ClientKube(url)
        try:
            yield kube, client
        finally:
            await client.close()


def test_the_bearer_token_is_found_wherever_the_client_release_keeps_it() -> None:
    assert bearer_token({"BearerToken": "Bearer abc"}) == "abc"  # kubeconfig, client ≥ 37
    assert bearer_token({"BearerToken": "bearer abc"}) == "abc"  # in-cluster loader, ≥ 37
    assert bearer_token({"authorization": "Bearer abc"}) == "abc"  # 31–36
    assert bearer_token({"authorization": "bearer abc"}) == "abc"
    assert bearer_token({}) is None and bearer_token(None) is None


async def test_a_kind_that_is_not_served_is_reported_not_crashed_on(
    api: tuple[FakeKube, ClientKube],
) -> None:
    kube, client = api
    assert await client.served("LeaderWorkerSet") and await client.served("Pod")
    kube.unserved.add("LeaderWorkerSet")
    fresh = ClientKube(client.host)
    try:
        assert not await fresh.served("LeaderWorkerSet")
        with pytest.raises(NotServed, match=r"LeaderWorkerSet .* not served"):
            await fresh.list("LeaderWorkerSet", NS)
        lws = {"apiVersion": "leaderworkerset.x-k8s.io/v1", "kind": "LeaderWorkerSet"}
        with pytest.raises(NotServed):
            await fresh.create({**lws, "metadata": {"name": "big", "namespace": NS}})
        with pytest.raises(NotServed):
            await anext(fresh.watch("LeaderWorkerSet", NS))
        await fresh.delete("LeaderWorkerSet", NS, "big")  # nothing to delete: not an error
        assert await fresh.get("Pod", NS, "nope") is None  # a missing object is no missing kind
    finally:
        await fresh.close()


async def test_a_watch_yields_its_list_then_changes_and_derives_deletions_after_410(
    api: tuple[FakeKube, ClientKube],
) -> None:
    kube, client = api
    for name in ("a", "b", "c"):
        await kube.create(pod(name))
    synced = asyncio.Event()
    stream = client.watch("Pod", NS, {"app": "x"}, synced=synced.set)
    first = [await anext(stream) for _ in range(3)]
    assert [(e.type, e.object["metadata"]["name"]) for e in first] == [
        ("ADDED", "a"), ("ADDED", "b"), ("ADDED", "c"),
    ]  # fmt: skip
    assert first[0].object["kind"] == "Pod"
    await kube.create(pod("d"))  # between the list and the watch
    event = await anext(stream)
    assert synced.is_set() and (event.type, event.object["metadata"]["name"]) == ("ADDED", "d")
    # Away for longer than the server keeps changes: a and b go, c changes, e comes.
    client.expire_watches()
    await kube.delete("Pod", NS, "a")
    await kube.delete("Pod", NS, "b")
    kube.set_status("Pod", NS, "c", phase="Running")
    await kube.create(pod("e"))
    kube.compact()
    seen: list[WatchEvent] = [await asyncio.wait_for(anext(stream), 10) for _ in range(4)]
    assert sorted((e.type, e.object["metadata"]["name"]) for e in seen) == [
        ("ADDED", "e"), ("DELETED", "a"), ("DELETED", "b"), ("MODIFIED", "c"),
    ]  # fmt: skip
    await kube.delete("Pod", NS, "c")  # and it watches on
    event = await asyncio.wait_for(anext(stream), 10)
    assert (event.type, event.object["metadata"]["name"]) == ("DELETED", "c")
    await stream.aclose()  # type: ignore[attr-defined]


async def test_pod_logs_come_back_as_text(api: tuple[FakeKube, ClientKube]) -> None:
    kube, client = api
    await kube.create(pod("a"))
    kube.pod_logs[(NS, "a")] = "one\ntwo\nthree\n"
    assert await client.logs(NS, "a", container="engine", tail=2) == "two\nthree\n"
