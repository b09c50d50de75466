"""Pending quota settlements: bounded, one per lease, retried with back-off until they land."""

from __future__ import annotations

import asyncio

import pytest

from gpufleet.gateway.settlements import PendingSettlements
from gpufleet.policies.settle_backlog import SettleBacklog
from tests.conftest import eventually


def test_one_settlement_per_lease_oldest_first() -> None:
    b: SettleBacklog[str] = SettleBacklog()
    b.add("a", "a1", 0.0)
    b.add("b", "b1", 0.0)
    b.add("a", "a2", 0.0)  # the same lease again: replaced, not doubled
    assert b.due(0.0) == [("b", "b1"), ("a", "a2")]
    assert b.since == 0.0


def test_back_off_grows_to_its_cap_and_resets_on_landing() -> None:
    b: SettleBacklog[str] = SettleBacklog(first_delay_s=0.25, max_delay_s=2.0)
    b.add("a", "x", 10.0)
    assert [b.failed(10.0) for _ in range(5)] == [0.25, 0.5, 1.0, 2.0, 2.0]
    assert b.due(11.9) == []
    assert b.next_attempt(11.0) == pytest.approx(1.0)
    assert b.due(12.0) == [("a", "x")]
    b.failed(12.0)
    b.wake(12.1)  # the store answered something else: due at once
    assert b.due(12.1) == [("a", "x")]
    b.landed("a", 12.2)
    assert len(b) == 0 and b.since is None
    assert b.due(12.2) == []


def test_the_bound_drops_the_oldest() -> None:
    b: SettleBacklog[int] = SettleBacklog(max_items=2)
    assert b.add("a", 1, 0.0) is None
    assert b.add("b", 2, 0.0) is None
    assert b.add("c", 3, 0.0) == 1
    assert [lease for lease, _ in b.due(0.0)] == ["b", "c"]
    assert b.dropped == 1


class FakeStore:
    """A store that is down until ``up``; records what landed, each settlement as often as sent."""

    def __init__(self) -> None:
        self.up = False
        self.landed: list[str] = []

    async def send(self, item: str) -> None:
        if not self.up:
            raise ConnectionError("down")
        self.landed.append(item)


def temporary(exc: Exception) -> bool:
    return isinstance(exc, ConnectionError)


async def test_kept_settlements_land_once_the_store_is_back() -> None:
    store = FakeStore()
    pending: PendingSettlements[str] = PendingSettlements(
        store.send, temporary, where="fake", max_delay_s=0.05
    )
    try:
        pending.keep("a", "settle a", ConnectionError("down"))
        pending.keep("b", "settle b", ConnectionError("down"))
        await pending.flush()  # still down: nothing lands, nothing is lost
        assert len(pending) == 2 and store.landed == []
        store.up = True
        await eventually(lambda: not pending, "the backlog drained")
        assert store.landed == ["settle a", "settle b"]
        assert pending.landed_total == 2
    finally:
        await pending.close()


async def test_a_settlement_that_fails_for_good_is_dropped_not_blocking() -> None:
    store = FakeStore()
    store.up = True
    sent: list[str] = []

    async def send(item: str) -> None:
        sent.append(item)
        if item == "bad":
            raise ValueError("script error")
        await store.send(item)

    pending: PendingSettlements[str] = PendingSettlements(send, temporary, where="fake")
    pending.keep("x", "bad", ConnectionError("down"))
    pending.keep("y", "good", ConnectionError("down"))
    pending.wake()
    await pending.flush()
    await pending.close()
    assert sent == ["bad", "good"] and store.landed == ["good"] and not pending


async def test_close_tries_once_more_and_stops_the_retries() -> None:
    store = FakeStore()
    pending: PendingSettlements[str] = PendingSettlements(store.send, temporary, where="fake")
    pending.keep("a", "settle a", ConnectionError("down"))
    await asyncio.sleep(0)
    await pending.close()  # still down: logged as lost, and no task left running
    assert len(pending) == 1 and store.landed == []
