"""Tenants, keys, roles, quotas and the usage ledger through the gateway's HTTP API.

The engines are the engine emulator (it reports usage as vLLM does, streams included); the
client is the official ``openai`` SDK; the store is SQLite (PostgreSQL in test_ledger.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from openai import AsyncOpenAI

from gpufleet.controller import Controller
from gpufleet.gateway import GatewayStack
from gpufleet.gateway.auth import Keyring
from gpufleet.gateway.ledger import Ledger
from gpufleet.hardware import CATALOG
from gpufleet.runtime.fake import FakeRuntime
from gpufleet.spec import API_VERSION, load_text, parse_tenant
from gpufleet.store import Store
from tests import sites
from tests.conftest import eventually

CONFIG = sites.CONFIG
MODELS = f"""
apiVersion: gpufleet.io/v1alpha1
kind: Model
metadata: {{name: shared}}
spec: {{source: "file:{CONFIG}", engine: emulator, resources: {{gpus: 1, gpuTypes: [H100]}}}}
---
apiVersion: gpufleet.io/v1alpha1
kind: Model
metadata: {{name: private}}
spec:
  source: "file:{CONFIG}"
  engine: emulator
  access: {{tenants: [acme]}}
---
apiVersion: gpufleet.io/v1alpha1
kind: Model
metadata: {{name: metered}}
spec: {{source: "file:{CONFIG}", engine: emulator, pricing: {{perReplicaHour: 36}}}}
"""
HI = [{"role": "user", "content": "Say hello to the bank."}]


def tenant(name: str, **limits: Any) -> Any:
    return parse_tenant(
        {
            "apiVersion": API_VERSION,
            "kind": "Tenant",
            "metadata": {"name": name},
            "spec": {"limits": limits},
        }
    )


@dataclass
class Site:
    url: str
    store: Store
    keyring: Keyring
    ledger: Ledger
    keys: dict[str, str]
    http: aiohttp.ClientSession
    clients: list[AsyncOpenAI] = field(default_factory=list)

    def client(self, who: str | None) -> AsyncOpenAI:
        client = AsyncOpenAI(
            base_url=self.url + "/v1", api_key=self.keys.get(who or "", "none"), max_retries=0
        )
        self.clients.append(client)
        return client

    async def call(
        self, method: str, path: str, who: str | None, body: Any = None
    ) -> tuple[int, Any, dict[str, str]]:
        headers = {"authorization": f"Bearer {self.keys[who]}"} if who else {}
        data = json.dumps(body).encode() if body is not None else None
        async with self.http.request(method, self.url + path, data=data, headers=headers) as r:
            text = await r.read()
            return r.status, json.loads(text) if text else None, dict(r.headers)


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[Site]:
    keys: dict[str, str] = {}

    def tenancy(stack: GatewayStack) -> None:
        keyring, store = stack.keyring, stack.keyring.store
        keyring.bootstrap_admin(None)
        store.apply_tenant(tenant("acme", requestsPerMinute=1000))
        store.apply_tenant(tenant("globex", requestsPerMinute=3))
        store.apply_tenant(tenant("thrifty", budget={"usd": 0.05, "period": "day"}))
        keyring.load()
        keys.update(
            admin=keyring.create_key("default", name="admin2", role="admin")[0],
            operator=keyring.create_key("default", name="ops", role="operator")[0],
            acme=keyring.create_key("acme", name="app", role="user")[0],
            globex=keyring.create_key("globex", name="app", role="user")[0],
            thrifty=keyring.create_key("thrifty", name="app", role="user")[0],
            expired=keyring.create_key(
                "acme",
                name="old",
                role="user",
                expires_at=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1),
            )[0],
            revoked=keyring.create_key("acme", name="gone", role="user")[0],
        )
        store.revoke_key(keys["revoked"][:12])
        keyring.load()

    names = ("shared", "private", "metered")
    engines = [(name, sites.emulated(time_scale=0.02)) for name in names]
    async with sites.replica_servers(engines) as urls:
        by_model = dict(zip(names, urls, strict=True))
        async with (
            sites.site(
                tmp_path,
                MODELS,
                lambda r, _i: by_model.get(r.model, by_model["shared"]),
                auth=True,
                prepare=tenancy,
                key_refresh_s=0.2,
                ledger_flush_s=0.05,
            ) as s,
            aiohttp.ClientSession() as http,
        ):
            assert s.ledger is not None
            here = Site(s.url, s.store, s.keyring, s.ledger, keys, http)
            yield here
            for client in here.clients:
                await client.close()


async def test_requests_without_a_valid_key_get_401(site: Site) -> None:
    for who in (None, "expired", "revoked"):
        with pytest.raises(openai.AuthenticationError) as caught:
            await site.client(who).chat.completions.create(model="shared", messages=HI)  # type: ignore[arg-type]
        assert caught.value.status_code == 401
    status, body, headers = await site.call("GET", "/v1/models", None)
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert "Authorization: Bearer" in body["error"]["message"]
    assert headers["WWW-Authenticate"].startswith("Bearer")
    site.keys["forged"] = site.keys["acme"][:12] + "x" * 20  # right prefix, wrong secret
    status, body, _ = await site.call("GET", "/v1/models", "forged")
    assert status == 401 and body["error"]["message"] == "Invalid API key"
    status, body, _ = await site.call("GET", "/v1/models", "expired")
    assert status == 401 and "expired" in body["error"]["message"]
    status, body, _ = await site.call("GET", "/v1/models", "revoked")
    assert status == 401 and "revoked" in body["error"]["message"]


async def test_a_private_model_does_not_exist_for_other_tenants(site: Site) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        await site.client("globex").chat.completions.create(model="private", messages=HI)  # type: ignore[arg-type]
    assert "does not exist" in str(caught.value)  # the same answer as for a model that does not
    listed = {m.id async for m in site.client("globex").models.list()}
    assert listed == {"shared", "metered"}
    reply = await site.client("acme").chat.completions.create(
        model="private",
        messages=HI,  # type: ignore[arg-type]
        max_tokens=4,
    )
    assert reply.choices[0].message.content
    assert {m.id async for m in site.client("acme").models.list()} == {
        "shared",
        "private",
        "metered",
    }


async def test_roles_guard_the_admin_api(site: Site) -> None:
    for path in ("/admin/v1/models", "/admin/v1/keys", "/admin/v1/usage"):
        status, body, _ = await site.call("GET", path, "acme")
        assert status == 403 and body["error"]["type"] == "permission_error", path
    assert (await site.call("GET", "/admin/v1/models", "operator"))[0] == 200
    assert (await site.call("GET", "/admin/v1/usage", "operator"))[0] == 200
    assert (await site.call("GET", "/admin/v1/keys", "operator"))[0] == 403
    status, _, _ = await site.call(
        "POST", "/admin/v1/keys", "operator", {"tenant": "acme", "role": "admin"}
    )
    assert status == 403
    status, body, _ = await site.call("GET", "/admin/v1/keys", "admin")
    assert status == 200
    assert all("hash" not in k and "key" not in k for k in body["keys"])
    states = {k["name"]: k["state"] for k in body["keys"]}
    assert states["old"] == "expired" and states["gone"] == "revoked" and states["app"] == "active"


async def test_a_new_key_works_once_shown_and_its_secret_is_not_stored(site: Site) -> None:
    status, made, _ = await site.call(
        "POST", "/admin/v1/keys", "admin", {"tenant": "acme", "name": "batch-job"}
    )
    assert status == 201 and made["key"].startswith("gpf_") and made["role"] == "user"
    record = site.store.get_key(made["prefix"])
    assert record is not None and made["key"] not in json.dumps(record.__repr__())
    site.keys["new"] = made["key"]
    assert (await site.call("GET", "/v1/models", "new"))[0] == 200
    status, body, _ = await site.call(
        "POST", "/admin/v1/keys", "admin", {"tenant": "nobody", "name": "x"}
    )
    assert status == 400 and body["error"]["param"] == "tenant"


async def test_revocation_reaches_another_gateway_within_a_second(
    site: Site, tmp_path: Path
) -> None:
    """A second gateway on the same store: a key made and revoked through the first.

    The second gateway holds the key in memory once it has seen it; only its refresh, every
    ``refresh_s`` (0.5 s by default), brings the revocation: within a second by that period,
    which the test checks, rather than by a wall-clock bound a busy machine can miss."""
    controller = Controller(site.store, FakeRuntime(lambda _r, _i: "http://127.0.0.1:1"))
    await controller.start()
    try:
        async with sites.gateway(controller, auth=True) as other:
            assert other.keyring.refresh_s <= 0.5
            other_url = other.url
            _, made, _ = await site.call(
                "POST", "/admin/v1/keys", "admin", {"tenant": "acme", "name": "roaming"}
            )
            headers = {"authorization": f"Bearer {made['key']}"}
            async with site.http.get(other_url + "/v1/models", headers=headers) as resp:
                assert resp.status == 200  # made a moment ago elsewhere: looked up on a miss
            status, _, _ = await site.call("DELETE", f"/admin/v1/keys/{made['prefix']}", "admin")
            assert status == 200

            async def refused() -> bool:
                async with site.http.get(other_url + "/v1/models", headers=headers) as resp:
                    return resp.status == 401

            await eventually(refused, "the other gateway refuses the revoked key")
    finally:
        await controller.stop()


async def test_requests_per_minute_answer_429_with_retry_after(site: Site) -> None:
    async def one() -> tuple[int, Any, dict[str, str]]:
        return await site.call(
            "POST",
            "/v1/chat/completions",
            "globex",
            {"model": "shared", "messages": HI, "max_tokens": 2},
        )

    results = await asyncio.gather(*(one() for _ in range(8)))
    statuses = sorted(r[0] for r in results)
    assert statuses == [200] * 3 + [429] * 5  # globex may send 3 per minute
    refused = next(r for r in results if r[0] == 429)
    assert refused[1]["error"]["code"] == "rpm_limit_exceeded"
    assert "3 requests per minute" in refused[1]["error"]["message"]
    assert 1 <= int(refused[2]["Retry-After"]) <= 60
    async with site.http.get(site.url + "/metrics") as resp:
        text = await resp.text()
    assert 'gpufleet_rejections_total{reason="rpm",tenant="globex"} 5.0' in text


async def test_a_budget_is_never_overshot_by_concurrent_requests(site: Site) -> None:
    """thrifty may spend $0.05 a day on a model priced at $0.01 per replica-second.

    Each request reserves its upper estimate (tokens at a slow single stream's pace), so a
    burst is cut off before the reservations could add up past the budget."""

    async def one() -> int:
        status, _, _ = await site.call(
            "POST",
            "/v1/chat/completions",
            "thrifty",
            {"model": "metered", "messages": HI, "max_tokens": 8},
        )
        return status

    statuses = await asyncio.gather(*(one() for _ in range(30)))
    await site.ledger.flush()
    rows = site.store.usage_rows(tenant="thrifty")
    assert statuses.count(200) == len(rows) >= 1
    assert statuses.count(429) >= 1 and set(statuses) == {200, 429}
    assert all(r.cost_usd > 0 for r in rows)
    assert sum(r.cost_usd for r in rows) <= 0.05
    status, used, _ = await site.call("GET", "/admin/v1/tenants/thrifty/quota", "admin")
    assert status == 200 and used["used"]["spent_usd"] == pytest.approx(
        sum(r.cost_usd for r in rows), abs=1e-6
    )
    # A request that could never fit is told so.
    status, body, headers = await site.call(
        "POST",
        "/v1/chat/completions",
        "thrifty",
        {"model": "metered", "messages": HI, "max_tokens": 2000},
    )
    assert status == 429 and body["error"]["code"] == "budget_exceeded"
    assert int(headers["Retry-After"]) > 0


async def test_ledger_rows_match_what_clients_received(site: Site) -> None:
    client = site.client("acme")
    plain = await client.chat.completions.create(
        model="shared",
        messages=HI,  # type: ignore[arg-type]
        max_tokens=5,
        extra_headers={"x-request-id": "plain-1"},
    )
    # A stream whose client asked for usage gets it; one that did not ask gets none, and the
    # ledger still has the engine's count.
    asked = await client.chat.completions.create(
        model="shared",
        messages=HI,  # type: ignore[arg-type]
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"x-request-id": "stream-asked"},
    )
    asked_usage = None
    asked_text = ""
    async for chunk in asked:
        if chunk.usage is not None:
            asked_usage = chunk.usage
        for choice in chunk.choices:
            asked_text += choice.delta.content or ""
    silent = await client.chat.completions.create(
        model="shared",
        messages=HI,  # type: ignore[arg-type]
        max_tokens=7,
        stream=True,
        extra_headers={"x-request-id": "stream-silent"},
    )
    silent_chunks = [c async for c in silent]
    assert all(c.usage is None and c.choices for c in silent_chunks)
    await site.ledger.flush()
    rows = {r.client_request_id: r for r in site.store.usage_rows(tenant="acme")}
    assert all(r.request_id != r.client_request_id for r in rows.values())
    assert plain.usage is not None and asked_usage is not None
    assert rows["plain-1"].prompt_tokens == plain.usage.prompt_tokens
    assert rows["plain-1"].completion_tokens == plain.usage.completion_tokens
    assert rows["stream-asked"].completion_tokens == asked_usage.completion_tokens
    assert rows["stream-asked"].prompt_tokens == asked_usage.prompt_tokens
    # The emulator streams one token per chunk, as vLLM does.
    content_chunks = sum(1 for c in silent_chunks if c.choices[0].delta.content)
    assert rows["stream-silent"].completion_tokens == content_chunks == 7
    for row in rows.values():
        assert row.tenant == "acme" and row.key_prefix == site.keys["acme"][:12]
        assert row.model == "shared" and row.status == 200 and row.replica
        assert row.duration_ms > 0 and row.gpu_seconds > 0
        # One H100 at the catalog's price: cost and GPU-seconds agree.
        assert row.cost_usd == pytest.approx(
            row.gpu_seconds * CATALOG["H100"].price_per_hour / 3600
        )
    assert rows["stream-asked"].ttft_ms is not None and rows["plain-1"].ttft_ms is None
    status, report, _ = await site.call("GET", "/admin/v1/usage?by=tenant", "operator")
    assert status == 200
    acme = next(r for r in report["usage"] if r["tenant"] == "acme")
    assert acme["requests"] == 3
    assert acme["completion_tokens"] == sum(r.completion_tokens for r in rows.values())


async def test_three_gateways_sharing_redis_admit_a_quota_exactly(site: Site) -> None:
    """Three gateway replicas, each with its own keyring and Redis quota client, one tenant
    allowed 10 requests a minute: 30 concurrent requests spread over them, 10 admitted."""
    import secrets

    from gpufleet.gateway.quotas_redis import RedisQuotas

    name = f"shared-{secrets.token_hex(3)}"
    site.store.apply_tenant(tenant(name, requestsPerMinute=10))
    secret, _ = site.keyring.create_key(name, name="app", role="user")
    namespace = f"gpufleet-test:{secrets.token_hex(4)}"
    headers = {"authorization": f"Bearer {secret}"}
    async with contextlib.AsyncExitStack() as stack:
        urls = []
        for _ in range(3):
            controller = Controller(site.store, FakeRuntime(lambda _r, _i: "http://127.0.0.1:1"))
            await controller.start()
            stack.push_async_callback(controller.stop)
            quotas = RedisQuotas("redis://127.0.0.1:6379/0", namespace=namespace)
            served = await stack.enter_async_context(
                sites.gateway(controller, auth=True, quotas=quotas)
            )
            urls.append(served.url)

        async def one(url: str) -> int:
            # No engine behind these gateways: an admitted request is answered 503 after
            # admission, a refused one 429 before it.
            body = json.dumps({"model": "shared", "messages": HI}).encode()
            async with site.http.post(
                url + "/v1/chat/completions", data=body, headers=headers
            ) as resp:
                return resp.status

        statuses = await asyncio.gather(*(one(urls[i % 3]) for i in range(30)))
    assert statuses.count(429) == 20
    assert len(statuses) - statuses.count(429) == 10


async def test_a_busy_model_serves_tenants_fairly_and_interactive_first(site: Site) -> None:
    """maxInFlightPerReplica: 1 — acme floods 8 requests, then globex sends one and acme one
    more marked batch; globex's is served next, acme's batch request last."""
    site.store.apply_tenant(tenant("globex"))
    site.keyring.load()
    (fair,) = load_text(
        "apiVersion: gpufleet.io/v1alpha1\nkind: Model\nmetadata: {name: fair}\n"
        f"spec: {{source: 'file:{CONFIG}', engine: emulator, "
        "routing: {maxInFlightPerReplica: 1}}\n"
    )
    site.store.apply_model(fair)
    finished: list[str] = []
    async with sites.replica_servers([("fair", sites.emulated(time_scale=1.0))]) as (engine,):
        controller = Controller(site.store, FakeRuntime(lambda _r, _i: engine))
        await controller.start()
        try:
            async with sites.gateway(controller, auth=True) as other:
                url = other.url
                async with asyncio.timeout(10):
                    while not sites.all_ready(controller.directory):
                        await asyncio.sleep(0.02)

                async def one(who: str, tag: str, *, batch: bool = False) -> None:
                    headers = {"authorization": f"Bearer {site.keys[who]}"}
                    if batch:
                        headers["x-gpufleet-priority"] = "batch"
                    body = {"model": "fair", "messages": HI, "max_tokens": 8}
                    async with site.http.post(
                        url + "/v1/chat/completions",
                        data=json.dumps(body).encode(),
                        headers=headers,
                    ) as resp:
                        assert resp.status == 200, await resp.text()
                    finished.append(tag)

                flood = [asyncio.create_task(one("acme", f"acme-{i}")) for i in range(8)]
                # acme's requests hold the slot and fill the queue.
                queue = other.stack.gateway.queues.get("fair")
                await eventually(
                    lambda: queue.in_flight == 1 and queue.waiting == 7, "acme's backlog queued"
                )
                late = [
                    asyncio.create_task(one("acme", "acme-batch", batch=True)),
                    asyncio.create_task(one("globex", "globex")),
                ]
                await asyncio.gather(*flood, *late)
        finally:
            await controller.stop()
    assert finished.index("globex") <= 2  # not behind acme's backlog of 7
    assert finished[-1] == "acme-batch"


async def test_a_repeated_client_request_id_still_counts_twice(site: Site) -> None:
    """The ledger keys rows by the gateway's own id; the client's is kept beside it."""
    client = site.client("acme")
    for _ in range(2):
        await client.completions.create(
            model="shared", prompt="same id", max_tokens=2, extra_headers={"x-request-id": "dup"}
        )
    await site.ledger.flush()
    rows = [r for r in site.store.usage_rows(tenant="acme") if r.client_request_id == "dup"]
    assert len(rows) == 2 and rows[0].request_id != rows[1].request_id


async def test_a_canary_split_can_keep_each_tenant_on_one_side(site: Site) -> None:
    """spec.routing.splitBy: tenant — a tenant sees one version, whatever its sessions."""
    doc = {
        "apiVersion": API_VERSION,
        "kind": "Model",
        "metadata": {"name": "ab"},
        "spec": {
            "source": f"file:{CONFIG}",
            "engine": "emulator",
            "routing": {"split": [{"model": "metered", "weight": 50}], "splitBy": "tenant"},
        },
    }
    status, _, _ = await site.call("POST", "/admin/v1/models", "admin", {"documents": [doc]})
    assert status == 200
    names = [f"team-{i}" for i in range(12)]
    for name in names:
        site.store.apply_tenant(tenant(name))
    site.keyring.load()
    for name in names:
        site.keys[name] = site.keyring.create_key(name, name="app", role="user")[0]
    sides: dict[str, set[str]] = {}
    for name in names:
        for i in range(4):
            headers = {"authorization": f"Bearer {site.keys[name]}", "x-session-id": f"s{i}"}
            body = json.dumps({"model": "ab", "prompt": "hi", "max_tokens": 1}).encode()
            async with site.http.post(
                site.url + "/v1/completions", data=body, headers=headers
            ) as resp:
                assert resp.status == 200, await resp.text()
                sides.setdefault(name, set()).add(resp.headers["x-gpufleet-model"])
    assert all(len(s) == 1 for s in sides.values()), sides  # sessions do not matter
    assert set().union(*sides.values()) == {"ab", "metered"}  # tenants spread over both


async def test_another_gateways_tenant_change_reaches_existing_keys(site: Site) -> None:
    """A refresh rebuilds principals when a tenant changed, and only then."""
    ring = Keyring(site.store)
    ring.load()
    before = await ring.authenticate(f"Bearer {site.keys['acme']}")
    assert before.tenant_limits.rpm == 1000
    ring._refresh()
    assert await ring.authenticate(f"Bearer {site.keys['acme']}") == before  # nothing changed
    site.store.apply_tenant(tenant("acme", requestsPerMinute=5))
    ring._refresh()
    after = await ring.authenticate(f"Bearer {site.keys['acme']}")
    assert after.tenant_limits.rpm == 5


async def test_the_cost_report_charges_requests_and_idle_and_refuses_bad_windows(
    site: Site,
) -> None:
    client = site.client("acme")
    await client.chat.completions.create(model="shared", messages=HI, max_tokens=3)  # type: ignore[arg-type]
    status, report, _ = await site.call("GET", "/admin/v1/report?by=tenant&since=1h", "operator")
    assert status == 200, report
    acme = next(line for line in report["lines"] if line["tenant"] == "acme")
    assert acme["successful"] == 1 and acme["busy_cost"] > 0
    assert acme["total_cost"] == pytest.approx(acme["busy_cost"] + acme["idle_cost"], abs=2e-6)
    # The H100 replica of "shared" and the $36/h one of "metered" are placed: their cost is
    # charged (to acme in proportion, or to nobody for a model nobody used), never lost.
    window = urllib.parse.urlencode({"since": report["since"], "until": report["until"]})
    status, by_model, _ = await site.call("GET", f"/admin/v1/report?by=model&{window}", "operator")
    assert status == 200 and by_model["until"] == report["until"]
    placed = sum(line["placed_cost"] for line in by_model["lines"])
    assert placed > 0
    charged = sum(line["total_cost"] for line in report["lines"])
    charged += sum(item["idle_cost"] for item in report["unattributed"])
    assert charged == pytest.approx(placed, abs=1e-5)
    assert {item["model"] for item in report["unattributed"]} >= {"metered"}
    for query, param in (("by=nope", "by"), ("since=1h&until=2h", "until"), ("since=x", "since")):
        status, body, _ = await site.call("GET", f"/admin/v1/report?{query}", "operator")
        assert status == 400 and body["error"]["param"] == param, body
    assert (await site.call("GET", "/admin/v1/report", "acme"))[0] == 403


async def test_latency_per_model_from_the_ledger(site: Site) -> None:
    client = site.client("acme")
    stream = await client.chat.completions.create(
        model="shared",
        messages=HI,  # type: ignore[arg-type]
        max_tokens=6,
        stream=True,
    )
    tokens = len([c async for c in stream if c.choices and c.choices[0].delta.content])
    status, body, _ = await site.call(
        "GET", "/admin/v1/models/shared/latency?since=10m&step=60", "operator"
    )
    assert status == 200, body
    summary = body["summary"]
    assert summary["requests"] >= 1 and summary["completion_tokens"] >= tokens
    assert summary["ttft_ms_p50"] > 0 and summary["itl_ms_p99"] is not None
    assert summary["e2e_ms_p99"] >= summary["ttft_ms_p99"]
    # One H100 replica, held since the site started (less than the 10-minute window): tokens
    # per GPU-second over the time it was held.
    assert 0 < summary["gpu_seconds"] < 600
    assert summary["tokens_per_s_per_gpu"] == pytest.approx(
        summary["completion_tokens"] / summary["gpu_seconds"], rel=0.01
    )
    assert (
        len(body["series"]) == 10
        and sum(p["requests"] for p in body["series"]) == summary["requests"]
    )
    status, body, _ = await site.call(
        "GET", "/admin/v1/models/shared/latency?since=7d&step=1", "operator"
    )
    assert status == 400 and body["error"]["param"] == "step"
