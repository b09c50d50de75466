"""The console's HTTP surface under ``/ui``: its pages, its static files and its JSON API.

Pages are one HTML shell (``templates/index.html``: the session's CSRF token, role and tenant
in ``<meta>`` tags) and the sign-in page; the shell's scripts (``static/``) draw each page from
JSON. The console calls three kinds of JSON, all under ``/ui/api`` and all authenticated by the
session cookie (writes also by the CSRF token):

- ``/ui/api/admin/v1/…``: the admin API's own routes (``gateway.admin.routes``), built a second
  time with the session as their authentication — the same handlers, role checks and errors as
  the CLI meets, and nothing added to the admin API's or the inference API's path;
- ``/ui/api/v1/…``: the model list and chat, through ``Gateway.execute`` as an API key's
  request goes (quotas, queueing, the ledger — usage is the session's key's);
- ``/ui/api/fleet``, ``/ui/api/models``, ``/ui/api/deploy/preview``: views the pages need
  that no API route gives (``console.fleet``, ``console.deploy``).

API-key callers never reach this code: the inference routes are dispatched before Starlette's
router, and these routes come last in its table.
"""

from __future__ import annotations

import asyncio
import functools
import html
import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from gpufleet.gateway import admin
from gpufleet.gateway.asgi import read_body
from gpufleet.gateway.auth import Principal, forbidden
from gpufleet.gateway.console.deploy import preview
from gpufleet.gateway.console.fleet import Planned, fleet_view, planned_of, replica_places
from gpufleet.gateway.console.sessions import Session, Sessions, clear_cookie, set_cookie
from gpufleet.gateway.errors import ApiError
from gpufleet.gateway.service import Gateway
from gpufleet.gateway.validate import parse_body
from gpufleet.planner import Placement, ReplicaKey
from gpufleet.spec import Inventory
from gpufleet.telemetry.gpus import GpuReading

__all__ = ["STATIC", "TEMPLATES", "Console", "routes"]

HERE = Path(__file__).parent
STATIC = HERE / "static"
TEMPLATES = HERE / "templates"

#: Scripts and styles only from the console itself; no frames, no plug-ins, no other origin.
_SECURITY = {
    "content-security-policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
        "form-action 'self'"
    ),
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
    "cache-control": "no-store",
}


_FORM_LIMIT = 16 * 1024
#: Where sign-in may send the browser back to: a console page's hash, nothing else.
_PAGE = re.compile(r"#/[A-Za-z0-9_.%/-]{0,200}")
#: A replica's start-up figures, where the runtime gives them (``runtime.Replica``).
_STARTUP = ("fetch_s", "load_s", "ready_s", "startup_s", "fetched_bytes", "weights_bytes")


@functools.cache
def _template(name: str) -> str:
    return (TEMPLATES / name).read_text(encoding="utf-8")


def _page(template: str, values: dict[str, str], status: int = 200) -> HTMLResponse:
    """A page: its template with ``{{name}}`` replaced by each value, HTML-escaped."""
    text = _template(template)
    for name, value in values.items():
        text = text.replace("{{" + name + "}}", html.escape(value, quote=True))
    return HTMLResponse(text, status_code=status, headers=_SECURITY)


async def _form(request: Request) -> dict[str, str]:
    """A small url-encoded form (sign-in, sign-out), read within a size limit."""
    raw = await read_body(request, _FORM_LIMIT)
    try:
        fields = parse_qs(raw.decode(), keep_blank_values=True, max_num_fields=16)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ApiError(400, "The form is not a valid url-encoded form", code="bad_form") from exc
    return {name: values[0] for name, values in fields.items()}


def _need_operator(principal: Principal) -> None:
    if not principal.is_operator:
        raise forbidden("operator")


def _placement(text: str) -> Placement:
    """A placement as the Kubernetes runtime keeps it on a pod (JSON of the dataclass)."""
    data = json.loads(text)
    data["replica"] = ReplicaKey(**data["replica"])
    return Placement(**data)


class Console:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.plane = gateway.plane
        self.sessions = Sessions(self.plane.store, gateway.keyring)

    # -- what the fleet holds ----------------------------------------------------------------

    def _planned(self) -> list[Planned]:
        """Placements where known: each pod's on a cluster, the planner's last plan here."""
        runtime = self.plane.runtime
        known = getattr(runtime, "placements", None)
        if callable(known):
            return planned_of((_placement(text), rid) for rid, text in known().items())
        capacity = getattr(getattr(self.plane, "autoscaler", None), "capacity", None)
        placed = getattr(capacity, "placements", ())
        return planned_of((p, None) for p in placed if isinstance(p, Placement))

    async def _inventory(self) -> Inventory | None:
        inventory_of = getattr(self.plane, "inventory", None)  # a cluster's reads the store
        if not callable(inventory_of):
            return None
        inventory = await asyncio.to_thread(inventory_of)
        return inventory if isinstance(inventory, Inventory) else None

    @staticmethod
    def _readings(request: Request) -> tuple[bool, list[GpuReading]]:
        telemetry = getattr(request.app.state, "telemetry", None)
        if telemetry is None:
            return False, []
        return True, list(telemetry.latest())

    # -- pages -------------------------------------------------------------------------------

    async def index(self, request: Request) -> Response:
        try:
            session = await self.sessions.read(request)
        except ApiError:
            return RedirectResponse("/ui/login", status_code=303)
        p = session.principal
        return _page(
            "index.html",
            {
                "csrf": session.csrf,
                "role": p.role,
                "tenant": p.tenant,
                "key": session.key_prefix,
                "auth": "on" if self.sessions.auth else "off",
            },
        )

    async def login_page(self, request: Request) -> Response:
        try:
            await self.sessions.read(request)
        except ApiError:
            return self._login_form()
        return RedirectResponse("/ui/", status_code=303)

    def _login_form(self, error: str = "", status: int = 200) -> Response:
        note = (
            "Sign in with an API key (gpufleet keys create makes one); its role decides what "
            "you see and may do."
            if self.sessions.auth
            else "Authentication is off on this server (--no-auth): sign in without a key."
        )
        return _page("login.html", {"error": error, "note": note}, status)

    async def login(self, request: Request) -> Response:
        # No session yet, so no CSRF token: a browser names the page that posted the form.
        origin = request.headers.get("origin")
        if origin and urlsplit(origin).netloc != request.headers.get("host"):
            return self._login_form("Sign-in refused: the form came from another site.", 403)
        form = await _form(request)
        try:
            token, _ = await self.sessions.open(form.get("key", ""))
        except ApiError as exc:
            return self._login_form(exc.message, exc.status)
        page = form.get("next", "")  # the console page asked for before signing in
        response = RedirectResponse("/ui/" + (page if _PAGE.fullmatch(page) else ""), 303)
        set_cookie(response, request, token, int(self.sessions.session_s))
        return response

    async def logout(self, request: Request) -> Response:
        csrf = (await _form(request)).get("csrf", "")
        try:
            session = await self.sessions.write(request, csrf)
        except ApiError as exc:
            if exc.status != 401:
                raise
        else:
            await self.sessions.close(session)
        response = RedirectResponse("/ui/login", status_code=303)
        clear_cookie(response, request)
        return response

    async def to_index(self, _: Request) -> Response:
        return RedirectResponse("/ui/", status_code=307)

    # -- JSON --------------------------------------------------------------------------------

    async def session(self, request: Request) -> Response:
        s = await self.sessions.read(request)
        return JSONResponse(self._session_view(s))

    def _session_view(self, s: Session) -> dict[str, Any]:
        return {
            "tenant": s.principal.tenant,
            "role": s.principal.role,
            "key": s.key_prefix,
            "auth": self.sessions.auth,
            "expires_at": s.expires_at.isoformat(),
        }

    async def fleet(self, request: Request) -> Response:
        _need_operator((await self.sessions.read(request)).principal)
        telemetry, readings = self._readings(request)
        view = fleet_view(
            await self._inventory(),
            readings,
            self._planned(),
            self.plane.directory.entries(),
            telemetry=telemetry,
        )
        return JSONResponse(view)

    async def models(self, request: Request) -> Response:
        """Every model the session may use, with its replicas; where they run, start-up times
        and spec figures for operators."""
        principal = (await self.sessions.read(request)).principal
        operator = principal.is_operator
        places: dict[str, list[str]] = {}
        if operator:
            places = replica_places(self._readings(request)[1], self._planned())
        rows = []
        for entry in self.plane.directory.entries():
            if not principal.may_use(entry.spec):
                continue
            row = admin.model_view(entry)
            spec = entry.spec
            row.update(
                context_length=spec.context_length,
                replicas_min=spec.replicas.min,
                replicas_max=spec.replicas.max,
                gpus=spec.resources.gpus,
                schedule=spec.schedule.windows if spec.schedule else None,
            )
            if operator:
                for replica, view in zip(entry.replicas, row["replicas"], strict=True):
                    view["where"] = places.get(replica.id) or (
                        ["CPU"] if not spec.resources.gpus else []
                    )
                    for name in _STARTUP:
                        view[name] = getattr(replica, name, None)
            else:
                row.pop("source")
                row["replicas"] = [{"id": r["id"], "phase": r["phase"]} for r in row["replicas"]]
            rows.append(row)
        return JSONResponse({"models": rows, "operator": operator})

    async def deploy_preview(self, request: Request) -> Response:
        _need_operator((await self.sessions.write(request)).principal)
        form = parse_body(await request.body())
        return JSONResponse(preview(form, await self._inventory()))

    async def v1_models(self, request: Request) -> Response:
        principal = (await self.sessions.read(request)).principal
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {"id": e.name, "object": "model", "created": e.created, "owned_by": "gpufleet"}
                    for e in self.plane.directory.entries()
                    if principal.may_use(e.spec)
                ],
            }
        )

    def inference(self, route: str) -> Any:
        """The playground's request: the session's key, then the same ``execute`` as an API
        key's request on ``route``."""
        settings = self.gateway.settings

        async def handler(request: Request) -> Response:
            principal = (await self.sessions.write(request)).principal
            raw = await read_body(request, settings.max_body_bytes, settings.body_idle_s)
            state = request.scope["state"]
            return await self.gateway.execute(
                route,
                principal,
                raw,
                request.headers.get,
                state["request_id"],
                state["gateway_id"],
            )

        return handler


def routes(gateway: Gateway) -> list[BaseRoute]:
    """The console's routes, for the end of the gateway's route table."""
    console = Console(gateway)
    mounted_admin = admin.routes(
        gateway.plane,
        console.sessions.authenticate,
        keyring=gateway.keyring,
        quotas=gateway.quotas,
        ledger=gateway.ledger,
        outages=gateway.outages,
    )
    return [
        Route("/ui", console.to_index, methods=["GET"]),
        Route("/ui/", console.index, methods=["GET"]),
        Route("/ui/login", console.login_page, methods=["GET"]),
        Route("/ui/login", console.login, methods=["POST"]),
        Route("/ui/logout", console.logout, methods=["POST"]),
        Route("/ui/api/session", console.session, methods=["GET"]),
        Route("/ui/api/fleet", console.fleet, methods=["GET"]),
        Route("/ui/api/models", console.models, methods=["GET"]),
        Route("/ui/api/deploy/preview", console.deploy_preview, methods=["POST"]),
        Route("/ui/api/v1/models", console.v1_models, methods=["GET"]),
        Route(
            "/ui/api/v1/chat/completions",
            console.inference("/v1/chat/completions"),
            methods=["POST"],
        ),
        Mount("/ui/api", routes=mounted_admin),
        Mount("/ui/static", StaticFiles(directory=STATIC), name="console-static"),
    ]
