"""``gpufleet tenants``, ``gpufleet keys`` and ``gpufleet usage``: tenancy from the terminal.

Everything goes through the admin API with the key in ``GPUFLEET_API_KEY`` (role ``admin`` for
tenants and keys, ``operator`` for usage). A new key is printed once; only its prefix is shown
afterwards.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.table import Table

from gpufleet.cli.output import fail, out
from gpufleet.cli.tables import print_table

__all__ = ["DEFAULT_SERVER", "ServerOpt", "call", "keys_app", "tenants_app", "usage"]

tenants_app = typer.Typer(help="Create and list tenants.", no_args_is_help=True)
keys_app = typer.Typer(help="Create, list and revoke API keys.", no_args_is_help=True)

ServerOpt = Annotated[
    str, typer.Option("--server", "-s", envvar="GPUFLEET_SERVER", help="gpufleet server URL")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON")]
DEFAULT_SERVER = "http://127.0.0.1:8000"


def call(server: str, method: str, path: str, body: Any = None) -> Any:
    """An admin API call; a failure is the CLI's error and exit code."""
    from gpufleet.cli.client import AdminClient, ClientError

    try:
        return AdminClient(server).request(method, path, body)
    except ClientError as exc:
        raise fail(str(exc), 2 if exc.status is None else 1) from exc


def _limits(
    rpm: int | None, tpm: int | None, concurrency: int | None, budget: float | None, period: str
) -> dict[str, Any]:
    limits: dict[str, Any] = {}
    if rpm is not None:
        limits["requestsPerMinute"] = rpm
    if tpm is not None:
        limits["tokensPerMinute"] = tpm
    if concurrency is not None:
        limits["concurrency"] = concurrency
    if budget is not None:
        limits["budget"] = {"usd": budget, "period": period}
    return limits


RpmOpt = Annotated[int | None, typer.Option("--rpm", help="requests per minute")]
TpmOpt = Annotated[int | None, typer.Option("--tpm", help="tokens per minute")]
ConcOpt = Annotated[int | None, typer.Option("--concurrency", help="requests in flight")]
BudgetOpt = Annotated[float | None, typer.Option("--budget", help="spend limit in USD")]
PeriodOpt = Annotated[str, typer.Option("--period", help="budget period: day, week or month")]


@tenants_app.command("create")
def tenants_create(
    name: str,
    rpm: RpmOpt = None,
    tpm: TpmOpt = None,
    concurrency: ConcOpt = None,
    budget: BudgetOpt = None,
    period: PeriodOpt = "month",
    priority: Annotated[str, typer.Option(help="interactive or batch")] = "interactive",
    weight: Annotated[float, typer.Option(help="fair share relative to other tenants")] = 1.0,
    server: ServerOpt = DEFAULT_SERVER,
) -> None:
    """Create a tenant, or update its limits."""
    doc = {
        "metadata": {"name": name},
        "spec": {
            "limits": _limits(rpm, tpm, concurrency, budget, period),
            "priority": priority,
            "weight": weight,
        },
    }
    result = call(server, "POST", "/admin/v1/tenants", doc)
    out.print(f"tenant/{result['name']} {result['result']}", highlight=False)


@tenants_app.command("list")
def tenants_list(server: ServerOpt = DEFAULT_SERVER, json_out: JsonOpt = False) -> None:
    """List tenants and their limits."""
    rows = call(server, "GET", "/admin/v1/tenants")["tenants"]
    if json_out:
        out.print_json(json.dumps(rows))
        return
    table = Table(box=None, header_style="bold")
    for col in ("NAME", "PRIORITY", "WEIGHT", "RPM", "TPM", "CONCURRENCY", "BUDGET"):
        table.add_column(col)
    for t in rows:
        lim = t.get("limits") or {}
        budget = lim.get("budget")
        table.add_row(
            t["name"],
            t["priority"],
            f"{t['weight']:g}",
            str(lim.get("requestsPerMinute") or "-"),
            str(lim.get("tokensPerMinute") or "-"),
            str(lim.get("concurrency") or "-"),
            f"${budget['usd']:g}/{budget['period']}" if budget else "-",
        )
    print_table(table)


@tenants_app.command("delete")
def tenants_delete(name: str, server: ServerOpt = DEFAULT_SERVER) -> None:
    """Delete a tenant; its keys are revoked."""
    call(server, "DELETE", f"/admin/v1/tenants/{name}")
    out.print(f"tenant/{name} deleted", highlight=False)


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option("--tenant", "-t", help="the key's tenant")] = "default",
    role: Annotated[str, typer.Option(help="admin, operator or user")] = "user",
    name: Annotated[str, typer.Option(help="a label for listings")] = "key",
    expires_in_days: Annotated[float | None, typer.Option(help="expiry")] = None,
    rpm: RpmOpt = None,
    tpm: TpmOpt = None,
    concurrency: ConcOpt = None,
    budget: BudgetOpt = None,
    period: PeriodOpt = "month",
    server: ServerOpt = DEFAULT_SERVER,
    json_out: JsonOpt = False,
) -> None:
    """Create an API key; it is printed once, keep it."""
    body: dict[str, Any] = {"tenant": tenant, "role": role, "name": name}
    limits = _limits(rpm, tpm, concurrency, budget, period)
    if limits:
        body["limits"] = limits
    if expires_in_days is not None:
        body["expires_in_days"] = expires_in_days
    result = call(server, "POST", "/admin/v1/keys", body)
    if json_out:
        out.print_json(json.dumps(result))
        return
    out.print(result["key"], highlight=False, soft_wrap=True)
    typer.echo(
        f"key {result['prefix']}… for tenant {result['tenant']} (role {result['role']}); "
        "this is the only time it is shown",
        err=True,
    )


@keys_app.command("list")
def keys_list(
    tenant: Annotated[str | None, typer.Option("--tenant", "-t")] = None,
    server: ServerOpt = DEFAULT_SERVER,
    json_out: JsonOpt = False,
) -> None:
    """List API keys (prefixes only)."""
    path = "/admin/v1/keys" + (f"?tenant={tenant}" if tenant else "")
    rows = call(server, "GET", path)["keys"]
    if json_out:
        out.print_json(json.dumps(rows))
        return
    table = Table(box=None, header_style="bold")
    for col in ("PREFIX", "NAME", "TENANT", "ROLE", "STATE", "CREATED", "EXPIRES"):
        table.add_column(col)
    for k in rows:
        table.add_row(
            k["prefix"],
            k["name"],
            k["tenant"],
            k["role"],
            k["state"],
            k["created_at"][:19],
            (k["expires_at"] or "-")[:19],
        )
    print_table(table)


@keys_app.command("revoke")
def keys_revoke(prefix: str, server: ServerOpt = DEFAULT_SERVER) -> None:
    """Revoke a key by its prefix; every gateway refuses it within a second."""
    call(server, "DELETE", f"/admin/v1/keys/{prefix}")
    out.print(f"key {prefix} revoked", highlight=False)


def usage(
    by: Annotated[str, typer.Option(help="group by tenant, model or key")] = "tenant",
    since: Annotated[
        str | None, typer.Option(help="ISO date/time or a span such as 24h, 7d (default: today)")
    ] = None,
    tenant: Annotated[str | None, typer.Option("--tenant", "-t")] = None,
    output: Annotated[str, typer.Option("--output", "-o", help="table or json")] = "table",
    server: ServerOpt = DEFAULT_SERVER,
) -> None:
    """Requests, tokens, GPU-seconds and cost from the usage ledger; apart, what went to
    endpoints outside the company, and a mark where token counts include estimates."""
    if by not in ("tenant", "model", "key"):
        raise fail("--by must be tenant, model or key")
    query = f"?by={by}"
    if since:
        query += f"&since={since}"
    if tenant:
        query += f"&tenant={tenant}"
    data = call(server, "GET", "/admin/v1/usage" + query)
    if output == "json":
        out.print_json(json.dumps(data))
        return
    rows = data["usage"]
    table = Table(box=None, header_style="bold", title=f"usage since {data['since'][:19]} UTC")
    cols = ("REQUESTS", "ERRORS", "PROMPT", "CACHED", "COMPLETION", "GPU-S", "COST $")
    table.add_column(by.upper())
    for col in cols:
        table.add_column(col, justify="right")
    for r in rows:
        # "~": some of the row's tokens are the gateway's estimate, not the engine's count.
        mark = "~" if r.get("estimated_requests") else ""
        table.add_row(
            r[by],
            str(r["requests"]),
            str(r["errors"]),
            f"{mark}{r['prompt_tokens']}",
            str(r["cached_tokens"]),
            f"{mark}{r['completion_tokens']}",
            f"{r['gpu_seconds']:.2f}",
            f"{r['cost_usd']:.4f}",
        )
    print_table(table)
    external = [r for r in rows if r.get("external_requests")]
    if external:
        # Part of the totals above: what was sent to endpoints outside the company.
        sent = Table(box=None, header_style="bold", title="of which to external endpoints")
        for col in (by.upper(), "REQUESTS", "PROMPT", "COMPLETION", "COST $"):
            sent.add_column(col, justify="left" if col == by.upper() else "right")
        for r in external:
            sent.add_row(
                r[by],
                str(r["external_requests"]),
                str(r["external_prompt_tokens"]),
                str(r["external_completion_tokens"]),
                f"{r['external_cost_usd']:.4f}",
            )
        print_table(sent)
    estimated = sum(r.get("estimated_requests", 0) for r in rows)
    if estimated:
        out.print(
            f"note: ~ marks token counts that include the gateway's estimates: {estimated} "
            "request(s) whose engine reported no usage",
            highlight=False,
        )
    refusals = data.get("refusals") or []
    if refusals:
        # Refused before any engine (401, 413, 429, 503, validation): counted per day, not rows.
        refused = Table(box=None, header_style="bold", title="refused before an engine")
        for col in (by.upper(), "STATUS", "REASON", "REFUSED"):
            refused.add_column(col, justify="right" if col in ("STATUS", "REFUSED") else "left")
        for r in refusals:
            refused.add_row(r[by] or "-", str(r["status"]), r["reason"], str(r["refused"]))
        print_table(refused)
