"""The fair queue's order of service as a pure core: plain functions, time passed in, no loop."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest

from gpufleet.policies import fair_order
from gpufleet.policies.fair_order import FairOrder, Refusal, Waiter


class Slots:
    """One model's slots driven by hand: requests arrive, finish, and time is whatever we say.

    ``served`` lists the labels in the order they got a slot, which is the order under test.
    """

    def __init__(self, capacity: int = 1, **kwargs: Any) -> None:
        self.capacity = capacity
        self.order: FairOrder[str] = FairOrder(**kwargs)
        self.served: list[str] = []
        self.refused: list[tuple[str, Refusal]] = []
        self.waiters: dict[str, Waiter[str]] = {}

    def arrive(self, label: str, tenant: str, now: float = 0.0, **kwargs: Any) -> None:
        if self.order.take(self.capacity):
            self.served.append(label)
            return
        got = self.order.enqueue(label, tenant, now, **kwargs)
        if isinstance(got, Refusal):
            self.refused.append((label, got))
        else:
            self.waiters[label] = got

    def finish(self, n: int = 1) -> None:
        """``n`` requests in flight end; each freed slot goes to the next waiter."""
        for _ in range(n):
            self.order.release()
            waiter = self.order.grant(self.capacity)
            if waiter is not None:
                self.served.append(waiter.item)


def one_slot_busy(**kwargs: Any) -> Slots:
    slots = Slots(1, **kwargs)
    slots.arrive("holder", "holder")
    return slots


def tenants(labels: list[str]) -> str:
    return "".join(label[0] for label in labels)


def test_runs_without_an_event_loop() -> None:
    with pytest.raises(RuntimeError):
        asyncio.get_running_loop()
    slots = one_slot_busy(max_wait_s=5.0)
    slots.arrive("A0", "A", now=100.0)
    assert slots.order.next_deadline() == 105.0
    assert slots.order.expire(104.999) == []
    assert [w.item for w in slots.order.expire(105.0)] == ["A0"]


def test_exports() -> None:
    assert sorted(fair_order.__all__) == ["FairOrder", "QUEUE_PRIORITIES", "Refusal", "Waiter"]


def test_a_free_slot_is_taken_at_once_unless_someone_waits() -> None:
    order: FairOrder[str] = FairOrder()
    assert order.take(2)
    assert order.take(2)
    assert not order.take(2)
    assert order.enqueue("w", "a", 0.0) is not None
    order.release()
    assert order.in_flight == 1
    assert not order.take(2)  # a slot is free, but who waits goes first
    waiter = order.grant(2)
    assert waiter is not None and waiter.item == "w"
    assert (order.in_flight, order.waiting) == (2, 0)
    assert order.grant(2) is None


def test_lower_priority_number_is_served_first() -> None:
    slots = one_slot_busy()
    for i in range(3):
        slots.arrive(f"batch{i}", "t", priority=1)
    for i in range(3):
        slots.arrive(f"interactive{i}", "t", priority=0)
    assert slots.order.waiting_by_priority() == {0: 3, 1: 3}
    slots.finish(6)
    assert slots.served[1:] == [
        "interactive0",
        "interactive1",
        "interactive2",
        "batch0",
        "batch1",
        "batch2",
    ]


def test_a_flooding_tenant_does_not_starve_another() -> None:
    slots = one_slot_busy()
    for i in range(60):
        slots.arrive(f"A{i}", "A")
    for i in range(20):
        slots.arrive(f"B{i}", "B")
    slots.finish(80)
    first = tenants(slots.served[1:41])
    assert first.count("B") == 20
    assert max(len(run) for run in first.split("B")) <= 1  # strictly alternating


def test_weights_divide_the_service_while_both_are_backlogged() -> None:
    slots = one_slot_busy()
    for i in range(60):
        slots.arrive(f"A{i}", "A", weight=2.0)
        slots.arrive(f"B{i}", "B", weight=1.0)
    slots.finish(60)
    assert tenants(slots.served[1:]).count("A") == 40  # exactly 2 : 1


def test_cost_counts_against_the_tenant_share() -> None:
    slots = one_slot_busy()
    for i in range(40):
        slots.arrive(f"A{i}", "A", cost=1.0)
        slots.arrive(f"B{i}", "B", cost=3.0)
    slots.finish(40)
    assert tenants(slots.served[1:]).count("A") == 30  # B's cost three times as much


def test_each_tenant_is_served_in_arrival_order() -> None:
    slots = one_slot_busy()
    for i in range(30):
        tenant = "AB"[i % 3 == 0]
        slots.arrive(f"{tenant}{i:02d}", tenant, cost=1.0 + i % 4)
    slots.finish(30)
    for tenant in "AB":
        mine = [label for label in slots.served[1:] if label[0] == tenant]
        assert mine == sorted(mine)


def test_a_newcomer_starts_at_the_current_virtual_time() -> None:
    slots = one_slot_busy()
    for i in range(40):
        slots.arrive(f"A{i}", "A")
    slots.finish(20)
    for i in range(10):
        slots.arrive(f"B{i}", "B")
    slots.finish(10)
    recent = tenants(slots.served[21:31])
    assert "B" in recent[:2]  # served within a round of arriving...
    assert recent.count("A") >= 4  # ...but with no credit banked while it was away
    assert recent.count("B") >= 4


def test_waiters_that_left_unserved_hand_their_tags_back() -> None:
    slots = one_slot_busy()
    for i in range(30):
        slots.arrive(f"A{i}", "A")
    for i in range(10):
        slots.arrive(f"gone{i}", "B")
    for i in range(10):
        slots.order.leave(slots.waiters[f"gone{i}"])
        slots.order.leave(slots.waiters[f"gone{i}"])  # twice changes nothing
    assert slots.order.waiting == 30
    slots.finish(5)
    slots.arrive("B", "B")
    slots.finish(2)
    assert "B" in slots.served[6:8]


def test_a_full_queue_refuses_with_a_retry_delay() -> None:
    slots = one_slot_busy(max_length=2, retry_after_s=3.0)
    slots.arrive("w0", "a")
    slots.arrive("w1", "b")
    slots.arrive("w2", "c")
    assert slots.refused == [("w2", Refusal("full", 3.0, waiting=2))]
    assert slots.order.waiting == 2


def test_waiters_expire_at_their_deadline_oldest_first() -> None:
    slots = one_slot_busy(max_wait_s=10.0, retry_after_s=2.0)
    slots.arrive("early", "a", now=100.0)
    slots.arrive("served", "b", now=101.0)
    slots.arrive("late", "c", now=102.5)
    slots.finish(1)  # "early" goes, "served" is next
    slots.order.leave(slots.waiters["served"])
    assert slots.order.next_deadline() == 112.5
    assert slots.order.expire(112.4) == []
    expired = slots.order.expire(112.5)
    assert [w.item for w in expired] == ["late"]
    assert slots.order.timed_out == Refusal("timeout", 2.0, waited_s=10.0)
    assert (slots.order.waiting, slots.order.waiting_by_priority()) == (0, {})
    assert slots.order.next_deadline() is None


def test_without_a_wait_limit_nobody_expires() -> None:
    slots = one_slot_busy(max_wait_s=math.inf)
    slots.arrive("w", "a", now=0.0)
    assert slots.order.next_deadline() is None
    assert slots.order.expire(1e12) == []
    assert slots.order.waiting == 1


def test_a_shrunk_capacity_grants_nothing_until_enough_release() -> None:
    slots = Slots(3)
    for i in range(3):
        slots.arrive(f"r{i}", "a")
    slots.capacity = 1
    slots.arrive("w", "b")
    slots.finish(2)
    assert slots.served == ["r0", "r1", "r2"]
    slots.finish(1)
    assert slots.served[-1] == "w"
    assert slots.order.in_flight == 1


def test_only_the_next_waiter_can_be_served() -> None:
    slots = one_slot_busy()
    slots.arrive("first", "a", priority=0)
    slots.arrive("second", "b", priority=1)
    with pytest.raises(ValueError, match="not the next"):
        slots.order.serve(slots.waiters["second"])
    next_up = slots.order.peek()
    assert next_up is slots.waiters["first"]
    slots.order.serve(next_up)
    assert slots.order.in_flight == 2


def test_bad_settings_and_shares_are_refused() -> None:
    with pytest.raises(ValueError, match="max_length"):
        FairOrder(max_length=-1)
    with pytest.raises(ValueError, match="max_wait_s"):
        FairOrder(max_wait_s=0.0)
    order: FairOrder[str] = FairOrder()
    bad: list[dict[str, Any]] = [{"weight": 0.0}, {"weight": math.nan}, {"cost": -1.0}]
    for kwargs in bad:
        with pytest.raises(ValueError, match="weight"):
            order.enqueue("w", "a", 0.0, **kwargs)
    assert order.waiting == 0


def test_state_stays_bounded_when_waiters_leave_early() -> None:
    order: FairOrder[str] = FairOrder(max_wait_s=60.0)
    order.take(1)
    order.enqueue("long", "long", 0.0)
    for i in range(300):
        waiter = order.enqueue(f"w{i}", f"t{i}", float(i))
        assert isinstance(waiter, Waiter)
        order.leave(waiter)
    cls = order._classes[0]
    assert cls.live == 1
    assert len(cls.heap) <= 2 * cls.live + fair_order._SWEEP_MIN + 1
    assert len(cls.tenants) <= 2 * fair_order._SWEEP_MIN
    assert len(order._arrivals) <= 2 * order.waiting + fair_order._SWEEP_MIN + 1


def test_a_backlog_is_served_and_expired_in_virtual_time() -> None:
    """A driver as the simulator will be: one slot, one-second requests, a 10 s wait limit."""
    order: FairOrder[int] = FairOrder(max_wait_s=10.0)
    assert order.take(1)
    done_at = [1.0]
    waited: dict[int, float] = {}
    expired: list[int] = []
    for i in range(50):
        order.enqueue(i, "A" if i % 2 else "B", 0.0)
    now = 0.0
    while order.waiting or done_at:
        deadline = order.next_deadline()
        now = min(done_at + ([deadline] if deadline is not None else []))
        expired += [w.item for w in order.expire(now)]
        if done_at and done_at[0] <= now:
            done_at.pop(0)
            order.release()
            waiter = order.grant(1)
            if waiter is not None:
                waited[waiter.item] = now - waiter.enqueued_at
                done_at.append(now + 1.0)
    assert sorted(waited.values()) == [float(s) for s in range(1, 10)]
    assert len(expired) == 50 - 9
    assert now == 10.0
    assert (order.in_flight, order.waiting) == (0, 0)


def test_expired_waiters_cost_a_backlogged_tenant_nothing() -> None:
    """Overload with a wait limit: both tenants send twice what one slot serves, most of it
    times out, and what is served still splits by weight (3 : 1). Tags chained through every
    waiter at arrival would let the light tenant's expired waiters push its next tags ever
    further out, until it starved."""
    order: FairOrder[str] = FairOrder(max_wait_s=5.0)
    served = {"heavy": 0, "light": 0}
    busy_until = 0.0
    for tick in range(4000):  # 400 s in steps of 0.1 s
        now = tick / 10
        for w in order.expire(now):
            assert w.tenant in served
        if tick % 5 == 0:  # each tenant sends 2 a second
            order.enqueue("h", "heavy", now, weight=3.0)
            order.enqueue("l", "light", now, weight=1.0)
        if now >= busy_until:  # one slot, one second a request
            if order.in_flight:
                order.release()
            waiter = order.grant(1)
            if waiter is not None:
                served[waiter.tenant] += 1
                busy_until = now + 1.0
    assert sum(served.values()) > 350
    assert served["heavy"] / served["light"] == pytest.approx(3.0, rel=0.05)
