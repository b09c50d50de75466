"""The gateway's request path: its parts, built once and wired here.

An inference request is validated (``request``), resolved to the deployments that may serve it
(``resolve``), admitted against its caller's quotas (``admission``), dispatched — held for a
replica, queued for a slot, forwarded, falling back along the chain (``dispatch``) — and
accounted for on every way out (``accounting``). The HTTP routes and the batch runner both call
``Gateway.execute``; the HTTP surface (``routes``) and the process (``assembly``) are built
around it.
"""

from __future__ import annotations

import asyncio

from starlette.responses import Response

from gpufleet.controller import ControlPlane
from gpufleet.gateway.accounting import Accounting, Charge
from gpufleet.gateway.admission import Admission
from gpufleet.gateway.auth import Keyring, Principal
from gpufleet.gateway.demand import DemandMeter
from gpufleet.gateway.dispatch import Capacity, Dispatcher
from gpufleet.gateway.errors import ApiError
from gpufleet.gateway.fairqueue import AdmissionQueues
from gpufleet.gateway.ledger import Ledger
from gpufleet.gateway.metrics import GatewayMetrics
from gpufleet.gateway.prefix_hints import RedisPrefixHints
from gpufleet.gateway.proxy import Upstream
from gpufleet.gateway.quotas import LocalQuotas, Quotas
from gpufleet.gateway.request import Header, parse, prepare
from gpufleet.gateway.resolve import Resolver
from gpufleet.gateway.settings import GatewaySettings
from gpufleet.outages import OutageReporter
from gpufleet.policies.pricing import Pricing

__all__ = ["Gateway"]


class Gateway:
    """Without a ``keyring`` every caller is an admin of the default tenant (the explicit
    ``--no-auth`` mode); without a ``ledger`` no usage rows are written."""

    def __init__(
        self,
        plane: ControlPlane,
        *,
        settings: GatewaySettings | None = None,
        metrics: GatewayMetrics | None = None,
        keyring: Keyring | None = None,
        quotas: Quotas | None = None,
        ledger: Ledger | None = None,
    ) -> None:
        self.plane = plane
        self.directory = plane.directory
        self.settings = settings = settings or GatewaySettings()
        self.metrics = metrics = metrics or GatewayMetrics()
        self.quotas = quotas = quotas or LocalQuotas()
        self.keyring, self.ledger = keyring, ledger
        #: Store and Redis outages, one line down and one back (admission, batches, admin,
        #: prefix hints).
        self.outages = OutageReporter(
            up=metrics.dependency_up,
            failures=metrics.dependency_failures,
            dependencies=("store", "redis") if settings.redis_url else ("store",),
        )
        hints = (
            RedisPrefixHints(
                settings.redis_url, timeout_s=settings.redis_timeout_s, outages=self.outages
            )
            if settings.redis_url
            else None
        )
        self.upstream = Upstream(metrics, hints=hints)
        pricing = Pricing()
        capacity = Capacity(self.directory, settings.slots_per_replica)
        self.queues = AdmissionQueues(
            capacity, max_length=settings.queue_max_length, max_wait_s=settings.queue_max_wait_s
        )
        self.demand = DemandMeter(self.directory, self.queues, self.upstream)
        if keyring is not None:
            keyring.outages = self.outages
        self.admission = Admission(keyring, quotas, pricing, metrics, outages=self.outages)
        self.dispatcher = Dispatcher(
            plane,
            self.queues,
            capacity,
            self.upstream,
            self.demand,
            metrics,
            hold_s=settings.hold_s,
        )
        self.resolver = Resolver(
            self.directory,
            pricing,
            self.demand,
            metrics,
            self.dispatcher.has_room,
            seed=settings.seed,
        )
        self.accounting = Accounting(
            self.directory, metrics, pricing, self.demand, self.admission, ledger
        )
        self.upstream.on_engine_error = self.accounting.engine_error
        if ledger is not None:
            metrics.registry.register(ledger.collector())
        plane.attach_demand(self.demand)

    async def execute(
        self,
        route: str,
        principal: Principal,
        raw: bytes,
        header: Header,
        request_id: str,
        gateway_id: str,
    ) -> Response:
        """One inference request of ``principal`` on ``route``, from validation to the answer:
        the HTTP routes and the batch runner (``x-gpufleet-priority: batch``) both go here.

        ``gateway_id`` is the gateway's own id (a UUID, ``ids.new_request_id``): the ledger's
        key and the only id the engine is sent. ``request_id`` is the caller's (the client's
        ``x-request-id``, a batch line's ``batch_req_…``), kept in the ledger beside it."""
        charge: Charge | None = None
        model = ""
        answered = False
        try:
            parsed = parse(route, raw)
            model = parsed.model
            resolved = self.resolver.resolve(parsed, principal, header)
            request = prepare(
                parsed,
                resolved.entry,
                principal,
                header,
                resolved.session,
                self.settings.default_max_tokens,
            )
            ticket = await self.admission.admit(
                principal, gateway_id, resolved.entry, request.tokens
            )
            charge = self.accounting.open(
                principal,
                ticket,
                route,
                parsed.model,
                (gateway_id, request_id if request_id != gateway_id else None),
                request.features.prompt_tokens,
            )
            response = await self.dispatcher.dispatch(
                resolved.chain, request, principal, route, gateway_id, charge.finisher
            )
            answered = True
            return response
        except ApiError as exc:
            if charge is None:
                self.accounting.refused(principal, model, exc.status, exc.code)
            else:
                charge.refused(exc.status, exc.code)
            raise
        except asyncio.CancelledError:
            if charge is not None:  # the caller went away (a batch runner stopping)
                charge.refused(499, "client_gone")
            raise
        finally:
            if not answered and charge is not None:
                charge.void()

    async def close(self) -> None:
        """Wait for what requests left running (quota settlements on their way)."""
        await self.admission.close()
