"""The ``gpufleet`` command line.

``up`` runs the embedded stack in this process; every other command talks to a running server
through its admin API. Heavy modules are imported inside the commands that need them, so
``gpufleet get models`` answers in a fraction of a second.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.parse
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from gpufleet.cli.accounts import keys_app, tenants_app, usage
from gpufleet.cli.client import AdminClient, ClientError
from gpufleet.cli.emulate import EMULATE_SETTINGS, emulate
from gpufleet.cli.estimate import estimate
from gpufleet.cli.jobs import jobs_app
from gpufleet.cli.output import fail, out, spec_problems
from gpufleet.cli.plan import plan_command
from gpufleet.cli.render import render_command
from gpufleet.cli.report import report
from gpufleet.cli.sim import sim_command
from gpufleet.cli.tables import Kind, Output, event_table, print_table, resource_table
from gpufleet.errors import GpufleetError, SpecError

if TYPE_CHECKING:
    from gpufleet.runtime.kubernetes import KubeApi

__all__ = ["app", "main"]

DEFAULT_SERVER = "http://127.0.0.1:8000"

app = typer.Typer(
    name="gpufleet",
    help="Turn a pool of GPUs into one OpenAI-compatible LLM service.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


ServerOpt = Annotated[
    str, typer.Option("--server", "-s", envvar="GPUFLEET_SERVER", help="gpufleet server URL")
]
OutputOpt = Annotated[
    Output, typer.Option("--output", "-o", help="table, wide (every column, nothing cut) or json")
]
FilesOpt = Annotated[
    list[Path], typer.Option("--file", "-f", help="YAML file of resources; repeatable")
]


def _load_all(files: list[Path]) -> tuple[list[Any], list[Any]]:
    from gpufleet.spec import load_file_resources

    models: list[Any] = []
    tenants: list[Any] = []
    problems: list[str] = []
    for f in files:
        try:
            m, t = load_file_resources(f)
        except SpecError as exc:
            problems += exc.problems
            continue
        models += m
        tenants += t
    if problems:
        spec_problems(problems)
        raise fail("the spec is invalid; nothing was changed")
    return models, tenants


def default_data_dir() -> Path:
    env = os.environ.get("GPUFLEET_DATA_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "gpufleet"


@app.command()
def up(
    file: FilesOpt = [],  # noqa: B006 - typer reads the default
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 8000,
    data_dir: Annotated[
        Path | None, typer.Option(help="where state and logs live (env GPUFLEET_DATA_DIR)")
    ] = None,
    store: Annotated[
        str | None, typer.Option(help="database URL; default: SQLite in the data dir")
    ] = None,
    max_body_bytes: Annotated[int, typer.Option(help="largest request body accepted")] = 8 << 20,
    hold_seconds: Annotated[
        float,
        typer.Option(help="how long a request waits for a replica of a model with none ready"),
    ] = 60.0,
    header_timeout: Annotated[
        float,
        typer.Option(help="seconds a client has to send a request's headers; then it is closed"),
    ] = 30.0,
    body_timeout: Annotated[
        float,
        typer.Option(help="seconds a request's body may make no progress; then 408 and closed"),
    ] = 30.0,
    redis: Annotated[
        str | None,
        typer.Option(help="Redis URL shared with other gateways (quotas, prefix hints)"),
    ] = None,
    no_auth: Annotated[
        bool,
        typer.Option(
            "--no-auth",
            help="serve without API keys (single-user machine); every caller is an admin",
        ),
    ] = False,
    gpu_sample_seconds: Annotated[
        float,
        typer.Option(
            help="seconds between readings of this machine's GPUs (memory, utilisation, "
            "processes; none without GPUs)",
            min=0.1,
        ),
    ] = 2.0,
    inventory: Annotated[
        Path | None,
        typer.Option(
            "--inventory",
            help="kind: Inventory YAML declaring this machine's GPUs instead of discovering "
            "them: emulated GPUs, which the engine emulator's models and GPU jobs are planned "
            "on (real engines need the GPUs that are there)",
        ),
    ] = None,
) -> None:
    """Run gateway, controller and engines here; serve SmolLM2 when no file is given."""
    models, tenants = _load_all(file)
    declared = None
    if inventory is not None:
        from gpufleet.hardware import load_inventory

        try:
            declared = load_inventory(inventory)
        except SpecError as exc:
            spec_problems(exc.problems)
            raise fail("the inventory is invalid; nothing was started") from exc
        except (OSError, GpufleetError) as exc:
            raise fail(f"{inventory}: {exc}") from exc
    import asyncio

    from gpufleet.embedded import UpConfig, serve

    _log_to_stderr()
    cfg = UpConfig(
        data_dir=data_dir or default_data_dir(),
        host=host,
        port=port,
        store_url=store,
        models=models,
        tenants=tenants,
        max_body_bytes=max_body_bytes,
        hold_s=hold_seconds,
        header_timeout_s=header_timeout,
        body_idle_s=body_timeout,
        redis_url=redis,
        auth=not no_auth,
        gpu_sample_s=gpu_sample_seconds,
        inventory=declared,
    )
    import importlib.util

    run = asyncio.run
    if importlib.util.find_spec("uvloop") is not None:  # comes with uvicorn[standard]
        import uvloop

        run = uvloop.run
    try:
        run(serve(cfg))
    except GpufleetError as exc:
        raise fail(str(exc)) from exc


@app.command()
def apply(file: FilesOpt, server: ServerOpt = DEFAULT_SERVER) -> None:
    """Create or update the resources in FILE on the running server."""
    if not file:
        raise fail("give at least one file with -f FILE")
    models, tenants = _load_all(file)
    # Tenants first: a model may name them in spec.access.
    for t in tenants:
        done = _call(server, "POST", "/admin/v1/tenants", t.document())
        out.print(f"tenant/{done['name']} {done['result']}", highlight=False)
    if not models:
        return
    result = _call(
        server, "POST", "/admin/v1/models", {"documents": [m.document() for m in models]}
    )
    for r in result["results"]:
        out.print(
            f"model/{r['name']} {r['result']} (generation {r['generation']})", highlight=False
        )


KindArg = Annotated[
    str,
    typer.Argument(
        help="models, replicas or events (singular or plural, as kubectl accepts)",
        show_default=False,
    ),
]


def _kind(word: str) -> Kind:
    kind = Kind.parse(word)
    if kind is None:
        raise fail(f"unknown kind {word!r}; try: model, replica or event (or their plurals)")
    return kind


@app.command()
def get(
    kind: KindArg, output: OutputOpt = Output.table, server: ServerOpt = DEFAULT_SERVER
) -> None:
    """List models, replicas or events."""
    what = _kind(kind)
    rows = _call(server, "GET", f"/admin/v1/{what.value}")[what.value]
    if output is Output.json:
        out.print_json(json.dumps(rows))
        return
    wide = output is Output.wide
    print_table(resource_table(what, rows, wide=wide), wide=wide)


EnginePortOpt = Annotated[
    int,
    typer.Option(
        help="port engines listen on in their pods", envvar="GPUFLEET_ENGINE_PORT", min=1, max=65535
    ),
]


@app.command()
def operator(
    namespace: Annotated[
        str, typer.Option(help="namespace of the Model resources and engines")
    ] = "gpufleet",
    store: Annotated[
        str,
        typer.Option(
            help="database URL (PostgreSQL when several replicas may lead)", envvar="GPUFLEET_STORE"
        ),
    ] = "sqlite:////tmp/gpufleet-operator.db",
    identity: Annotated[
        str, typer.Option(help="leader-election identity (default: host name)")
    ] = "",
    redis: Annotated[
        str | None,
        typer.Option(
            help="Redis the gateways publish demand to (autoscaling)", envvar="GPUFLEET_REDIS"
        ),
    ] = None,
    engine_port: EnginePortOpt = 8000,
    lease: Annotated[
        float, typer.Option(help="seconds a stand-by waits for a silent leader", min=3)
    ] = 15.0,
    dcgm_url: Annotated[
        str | None,
        typer.Option(
            help="the NVIDIA DCGM exporters' /metrics URLs (comma-separated), or a Prometheus "
            "…/api/v1/query URL that scrapes them: the leader reads the GPUs there every "
            "--gpu-sample-seconds and keeps their history in the store",
            envvar="GPUFLEET_DCGM_URL",
        ),
    ] = None,
    gpu_sample_seconds: Annotated[
        float, typer.Option(help="seconds between readings of the DCGM exporters", min=0.1)
    ] = 2.0,
    job_checkpoint_class: Annotated[
        str | None,
        typer.Option(
            help="storage class of GPU jobs' checkpoint claims (ReadWriteMany for gangs across "
            "nodes; default: the cluster's default class)",
            envvar="GPUFLEET_JOB_CHECKPOINT_CLASS",
        ),
    ] = None,
    job_checkpoint_size: Annotated[
        str,
        typer.Option(
            help="size of a GPU job's checkpoint claim", envvar="GPUFLEET_JOB_CHECKPOINT_SIZE"
        ),
    ] = "10Gi",
) -> None:
    """Run the Kubernetes operator: Model and GpuJob resources into pods and Jobs, status back."""
    from gpufleet.operator import OperatorConfig, run_operator
    from gpufleet.runtime.kubernetes import RenderSettings
    from gpufleet.runtime.kubernetes.jobs import CheckpointVolume

    cfg = OperatorConfig(
        namespace=namespace,
        store_url=store,
        identity=identity,
        redis_url=redis,
        lease_s=lease,
        settings=RenderSettings(namespace=namespace, engine_port=engine_port),
        dcgm_url=dcgm_url or None,
        gpu_sample_s=gpu_sample_seconds,
        job_checkpoint=CheckpointVolume(
            size=job_checkpoint_size, storage_class=job_checkpoint_class
        ),
    )
    _run_on_cluster(lambda api: run_operator(cfg, api))


@app.command()
def gateway(
    namespace: Annotated[
        str, typer.Option(help="namespace of the Model resources and engines")
    ] = "gpufleet",
    store: Annotated[
        str, typer.Option(help="database URL (shared with the operator)", envvar="GPUFLEET_STORE")
    ] = "sqlite:////tmp/gpufleet-gateway.db",
    redis: Annotated[
        str | None,
        typer.Option(help="Redis shared by gateways and the operator", envvar="GPUFLEET_REDIS"),
    ] = None,
    host: Annotated[str, typer.Option(help="address to listen on")] = "0.0.0.0",
    port: Annotated[int, typer.Option(help="port to listen on")] = 8000,
    engine_port: EnginePortOpt = 8000,
    ledger_spool: Annotated[
        Path | None,
        typer.Option(
            help="directory of the usage ledger's local spool (a volume of the pod's own): "
            "rows there survive a crash of the process and are written when it starts again",
            envvar="GPUFLEET_LEDGER_SPOOL",
        ),
    ] = None,
) -> None:
    """Run a gateway replica on Kubernetes: Models and engine pods read from the API."""
    from gpufleet.cluster import GatewayConfig, serve_cluster_gateway

    cfg = GatewayConfig(
        namespace=namespace,
        store_url=store,
        redis_url=redis,
        host=host,
        port=port,
        engine_port=engine_port,
        ledger_spool=ledger_spool,
    )
    _run_on_cluster(lambda api: serve_cluster_gateway(cfg, api))


@app.command()
def events(
    model: Annotated[str | None, typer.Argument(help="only this model's events")] = None,
    output: OutputOpt = Output.table,
    server: ServerOpt = DEFAULT_SERVER,
) -> None:
    """What the controller and autoscaler did, and why (newest last)."""
    path = "/admin/v1/events" + (f"?model={urllib.parse.quote(model)}" if model else "")
    rows = _call(server, "GET", path)["events"]
    if output is Output.json:
        out.print_json(json.dumps(rows))
        return
    wide = output is Output.wide
    print_table(event_table(rows, wide=wide), wide=wide)


@app.command()
def delete(
    kind: Annotated[str, typer.Argument(help="what to delete: model (or models)")],
    name: str,
    server: ServerOpt = DEFAULT_SERVER,
) -> None:
    """Delete a model and stop its replicas."""
    if Kind.parse(kind) is not Kind.models:
        raise fail(f"cannot delete {kind!r}; try: gpufleet delete model NAME")
    _call(server, "DELETE", f"/admin/v1/models/{name}")
    out.print(f"model/{name} deleted", highlight=False)


@app.command()
def logs(
    model: str,
    tail: Annotated[int, typer.Option(help="lines per replica")] = 200,
    server: ServerOpt = DEFAULT_SERVER,
) -> None:
    """Print the engine logs of MODEL's replicas."""
    text = _call(server, "GET", f"/admin/v1/models/{model}/logs?tail={tail}")
    sys.stdout.write(text if isinstance(text, str) else json.dumps(text))


app.add_typer(tenants_app, name="tenants")
app.add_typer(keys_app, name="keys")
app.add_typer(jobs_app, name="jobs")
app.command()(usage)
app.command()(report)
app.command()(estimate)
app.command("plan")(plan_command)
app.command("render")(render_command)
app.command("sim")(sim_command)
app.command(context_settings=EMULATE_SETTINGS)(emulate)


def _log_to_stderr() -> None:
    import logging

    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )


def _run_on_cluster(serve: Callable[[KubeApi], Awaitable[None]]) -> None:
    """Run ``serve`` with the cluster found in the environment (in-cluster or kubeconfig)."""
    import asyncio

    from gpufleet.runtime.kubernetes.client import ClientKube

    _log_to_stderr()

    async def main() -> None:
        api = ClientKube.from_environment()
        try:
            await serve(api)
        finally:
            await api.close()

    try:
        asyncio.run(main())
    except GpufleetError as exc:
        raise fail(str(exc)) from exc


def _call(server: str, method: str, path: str, body: Any = None) -> Any:
    try:
        return AdminClient(server).request(method, path, body)
    except ClientError as exc:
        raise fail(str(exc), 2 if exc.status is None else 1) from exc


def main() -> None:
    app()
