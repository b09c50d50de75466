"""Admission: who is calling (key → principal) and whether their quotas let this request in.

A request is admitted by reserving what it may use (its prompt plus the most the answer may
take, and that at the model's price) against every quota of its tenant and key; once it is
answered the reservation is replaced by what it used (``settle``). The quota stores speak in
``QuotaExceeded`` and ``QuotaStoreUnavailable``; this is where those become the OpenAI-style
429 and 503 answers. In-process quotas settle inline; shared ones (Redis) settle in a task of
their own, so an answer is never held back for a round trip — ``close`` waits for those.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

from starlette.requests import Request

from gpufleet.controller import ModelEntry
from gpufleet.gateway.auth import ANONYMOUS, Keyring, Principal
from gpufleet.gateway.errors import ApiError, quota_store_unavailable
from gpufleet.gateway.metrics import GatewayMetrics
from gpufleet.gateway.quotas import (
    Demand,
    LocalQuotas,
    QuotaExceeded,
    Quotas,
    QuotaStoreUnavailable,
    Ticket,
)
from gpufleet.outages import OutageReporter
from gpufleet.policies.pricing import Pricing

__all__ = ["Admission"]


class Admission:
    """Keys and quotas. Without a ``keyring`` every caller is an admin of the default tenant
    (the explicit ``--no-auth`` mode)."""

    def __init__(
        self,
        keyring: Keyring | None,
        quotas: Quotas,
        pricing: Pricing,
        metrics: GatewayMetrics,
        *,
        outages: OutageReporter | None = None,
    ) -> None:
        self.keyring = keyring
        self.quotas = quotas
        self._local = quotas if isinstance(quotas, LocalQuotas) else None
        self._pricing = pricing
        self._metrics = metrics
        self._outages = outages or OutageReporter()
        self._background: set[asyncio.Task[Any]] = set()

    async def authenticate(self, request: Request) -> Principal:
        """The caller of ``request``, from its ``Authorization`` header (401 without a key
        this gateway knows)."""
        if self.keyring is None:
            return ANONYMOUS
        try:
            return await self.keyring.authenticate(request.headers.get("authorization"))
        except ApiError:
            self._metrics.rejections.labels("", "unauthorized").inc()
            raise

    def principal_for(self, prefix: str) -> Principal | None:
        """The owner of a key by its prefix (the batch runner acts as the key that made a
        batch); None once the key is gone."""
        return self.keyring.principal_for(prefix) if self.keyring is not None else ANONYMOUS

    async def admit(
        self, principal: Principal, request_id: str, entry: ModelEntry, tokens: int
    ) -> Ticket:
        """Reserve ``tokens`` on ``entry`` against the principal's quotas, or refuse (429 over
        a limit, 503 when the shared quota store cannot be reached)."""
        demand = Demand(tokens=tokens, cost_usd=self._pricing.estimate(entry, tokens))
        try:
            ticket = await self.quotas.admit(request_id, principal.scopes(), demand)
        except QuotaExceeded as exc:
            if self._local is None:
                self._outages.recovered("redis")  # it answered
            self._metrics.rejections.labels(principal.tenant, exc.limit).inc()
            raise ApiError(
                429,
                str(exc),
                type="rate_limit_error" if exc.limit != "budget" else "insufficient_quota",
                code=f"{exc.limit}_limit_exceeded" if exc.limit != "budget" else "budget_exceeded",
                headers={"retry-after": str(max(1, int(exc.retry_after_s + 0.999)))},
            ) from exc
        except QuotaStoreUnavailable as exc:
            self._outages.failed("redis", exc, affected="admission: requests refused with 503")
            raise quota_store_unavailable("Quotas cannot be checked") from exc
        if self._local is None:
            self._outages.recovered("redis")
        return ticket

    def settle(self, ticket: Ticket, tokens: int, cost: float) -> None:
        """Replace the reservation by what the request used: inline in process, else in a
        task of its own (the answer is not held for Redis)."""
        if self._local is not None:
            self._local.settle_now(ticket, tokens=tokens, cost_usd=cost)
        else:
            self._spawn(self.settle_shared(ticket, tokens, cost))

    async def settle_shared(self, ticket: Ticket, tokens: int, cost: float) -> None:
        try:
            await self.quotas.settle(ticket, tokens=tokens, cost_usd=cost)
        except QuotaStoreUnavailable as exc:
            self._outages.failed("redis", exc, affected="quota settlements")

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        """Wait for the settlements still on their way to the shared store."""
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
