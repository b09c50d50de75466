"""The per-model admission queue: capacity, priority, fair share, bounds, cancellation."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import Any

import pytest

from gpufleet.gateway import fairqueue
from gpufleet.gateway.fairqueue import (
    AdmissionQueue,
    AdmissionQueues,
    QueueRejected,
    QueueStats,
    Slot,
)
from gpufleet.policies import fair_order


async def settle() -> None:
    """Let woken tasks run: a granted waiter resumes within one loop iteration."""
    for _ in range(4):
        await asyncio.sleep(0)


def now_or_never(awaitable: Awaitable[Slot]) -> Slot:
    """The result of an awaitable that must complete without suspending (the fast path)."""
    coro = awaitable.__await__()
    with pytest.raises(StopIteration) as stop:
        coro.send(None)
    slot: Slot = stop.value.value
    return slot


class Harness:
    """Waiters that record the order they are served in and keep their slots until released.

    With capacity 1 and the test holding the only slot, ``serve(n)`` hands the slot on n times,
    so ``order`` is exactly the queue's order of service.
    """

    def __init__(self, queue: AdmissionQueue) -> None:
        self.queue = queue
        self.order: list[str] = []
        self.held: list[Slot] = []
        self.tasks: list[asyncio.Task[None]] = []

    async def add(self, label: str, tenant: str, **kwargs: Any) -> None:
        async def wait() -> None:
            slot = await self.queue.acquire(tenant, **kwargs)
            self.order.append(label)
            self.held.append(slot)

        self.tasks.append(asyncio.create_task(wait(), name=f"waiter-{label}"))
        await settle()

    async def serve(self, n: int) -> None:
        for _ in range(n):
            self.queue.release(self.held.pop(0))
            await settle()

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for slot in self.held:
            self.queue.release(slot)


async def one_slot_held(**kwargs: Any) -> Harness:
    queue = AdmissionQueue("m", lambda: 1, **kwargs)
    harness = Harness(queue)
    harness.held.append(now_or_never(queue.acquire("holder")))
    return harness


def test_exports() -> None:
    assert sorted(fairqueue.__all__) == [
        "AdmissionQueue",
        "AdmissionQueues",
        "QueueRejected",
        "QueueStats",
        "Slot",
    ]


async def test_fast_path_admits_without_suspending() -> None:
    queue = AdmissionQueue("m", lambda: 2)
    first = now_or_never(queue.acquire("a"))
    second = now_or_never(queue.acquire("b", priority=1))
    assert first.waited_s == 0.0
    assert queue.stats() == QueueStats(in_flight=2, waiting=0, waiting_by_priority={}, capacity=2)
    queue.release(first)
    queue.release(second)
    assert queue.stats().in_flight == 0


async def test_in_flight_never_exceeds_capacity_under_concurrency() -> None:
    queue = AdmissionQueue("m", lambda: 7)
    peak = 0
    served = 0

    async def request(i: int) -> None:
        nonlocal peak, served
        async with await queue.acquire(f"t{i % 5}", priority=i % 2):
            peak = max(peak, queue.stats().in_flight)
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            served += 1

    await asyncio.gather(*(request(i) for i in range(100)))
    assert served == 100
    assert peak == 7
    assert queue.stats() == QueueStats(in_flight=0, waiting=0, waiting_by_priority={}, capacity=7)


async def test_lower_priority_number_is_served_first() -> None:
    h = await one_slot_held()
    for i in range(3):
        await h.add(f"batch{i}", "t", priority=1)
    for i in range(3):
        await h.add(f"interactive{i}", "t", priority=0)
    assert h.queue.stats().waiting_by_priority == {0: 3, 1: 3}
    await h.serve(6)
    assert h.order == [
        "interactive0",
        "interactive1",
        "interactive2",
        "batch0",
        "batch1",
        "batch2",
    ]
    await h.close()


async def test_a_flooding_tenant_does_not_starve_another() -> None:
    h = await one_slot_held()
    for i in range(60):
        await h.add(f"A{i}", "A")
    for i in range(20):
        await h.add(f"B{i}", "B")
    await h.serve(80)
    tenants = [label[0] for label in h.order]
    assert tenants[:40].count("B") == 20  # B's 20 all done within the first 40 services
    assert max(len(run) for run in "".join(tenants[:40]).split("B")) <= 1  # strictly alternating
    await h.close()


async def test_weights_divide_the_service_while_both_are_backlogged() -> None:
    h = await one_slot_held()
    for i in range(60):
        await h.add(f"A{i}", "A", weight=2.0)
    for i in range(60):
        await h.add(f"B{i}", "B", weight=1.0)
    await h.serve(60)
    share_a = [label[0] for label in h.order].count("A") / 60
    assert share_a == pytest.approx(2 / 3, abs=0.04)
    await h.close()


async def test_cost_counts_against_the_tenant_share() -> None:
    h = await one_slot_held()
    for i in range(40):
        await h.add(f"A{i}", "A", cost=1.0)
    for i in range(40):
        await h.add(f"B{i}", "B", cost=3.0)
    await h.serve(40)
    count_a = [label[0] for label in h.order].count("A")
    assert 29 <= count_a <= 31  # B's requests cost three times as much: A gets ~3/4 of them
    await h.close()


async def test_a_newcomer_starts_at_the_current_virtual_time() -> None:
    h = await one_slot_held()
    for i in range(40):
        await h.add(f"A{i}", "A")
    await h.serve(20)
    for i in range(10):
        await h.add(f"B{i}", "B")
    await h.serve(10)
    recent = [label[0] for label in h.order[20:30]]
    assert "B" in recent[:2]  # served within a round of arriving...
    assert recent.count("A") >= 4  # ...but with no credit banked while it was away
    assert recent.count("B") >= 4
    await h.close()


async def test_requests_that_left_unserved_are_not_charged_to_the_tenant() -> None:
    h = await one_slot_held()
    for i in range(30):
        await h.add(f"A{i}", "A")
    for i in range(10):
        await h.add(f"gone{i}", "B")
    for task in h.tasks[30:]:
        task.cancel()
    await asyncio.gather(*h.tasks[30:], return_exceptions=True)
    await h.serve(5)
    await h.add("B", "B")
    await h.serve(2)
    assert "B" in h.order[5:7]
    await h.close()


async def test_each_tenant_is_served_in_arrival_order() -> None:
    h = await one_slot_held()
    for i in range(12):
        tenant = "AB"[i % 3 == 0]
        await h.add(f"{tenant}{i:02d}", tenant, priority=i % 2)
    await h.serve(12)
    for tenant in "AB":
        for priority in (0, 1):
            mine = [x for x in h.order if x[0] == tenant and int(x[1:]) % 2 == priority]
            assert mine == sorted(mine)
    assert sorted(h.order) == sorted(f"{'AB'[i % 3 == 0]}{i:02d}" for i in range(12))
    await h.close()


async def test_a_full_queue_refuses_at_once() -> None:
    h = await one_slot_held(max_length=2)
    await h.add("w0", "a")
    await h.add("w1", "b")
    with pytest.raises(QueueRejected) as rejected:
        h.queue.acquire("c").__await__().send(None)  # refused without suspending: at once
    assert rejected.value.reason == "full"
    assert rejected.value.retry_after_s > 0
    assert str(rejected.value) == "the queue for model 'm' is full (2 waiting); retry later"
    assert h.queue.stats().waiting == 2
    await h.close()


async def test_a_waiter_not_served_in_time_is_rejected_and_removed() -> None:
    queue = AdmissionQueue("m", lambda: 0, max_wait_s=0.05)
    started = time.monotonic()
    with pytest.raises(QueueRejected) as rejected:
        await queue.acquire("a")
    waited = time.monotonic() - started
    assert 0.04 <= waited < 10.0  # the bound, not before; the upper one only catches a hang
    assert rejected.value.reason == "timeout"
    assert str(rejected.value) == "waited 0.05 s for model 'm' without a free slot"
    assert queue.stats() == QueueStats(in_flight=0, waiting=0, waiting_by_priority={}, capacity=0)


async def test_a_cancelled_waiter_leaves_no_trace() -> None:
    h = await one_slot_held()
    await h.add("gone", "a")
    await h.add("stays", "b", priority=1)
    gone = h.tasks[0]
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert h.queue.stats().waiting_by_priority == {1: 1}
    await h.serve(1)
    assert h.order == ["stays"]
    assert h.queue.stats() == QueueStats(in_flight=1, waiting=0, waiting_by_priority={}, capacity=1)
    await h.close()
    assert h.queue.stats().in_flight == 0


async def test_a_slot_granted_as_the_waiter_is_cancelled_is_given_back() -> None:
    h = await one_slot_held()
    await h.add("unlucky", "a")
    await h.add("next", "b")
    unlucky = h.tasks[0]
    h.queue.release(h.held.pop())  # grants "unlucky"'s slot...
    unlucky.cancel()  # ...which goes away before it can run
    with pytest.raises(asyncio.CancelledError):
        await unlucky
    await settle()
    assert h.order == ["next"]  # the slot passed on rather than leaked
    assert h.queue.stats().in_flight == 1
    await h.close()
    assert h.queue.stats() == QueueStats(in_flight=0, waiting=0, waiting_by_priority={}, capacity=1)


async def test_a_waiter_cancelled_but_not_yet_resumed_is_skipped() -> None:
    h = await one_slot_held()
    await h.add("cancelled", "a")
    await h.add("next", "b")
    h.tasks[0].cancel()  # its future is cancelled; the task has not run its handler yet
    h.queue.release(h.held.pop())
    await settle()
    assert h.tasks[0].cancelled()
    assert h.order == ["next"]
    assert h.queue.stats().in_flight == 1
    assert h.queue.stats().waiting == 0
    await h.close()
    assert h.queue.stats().in_flight == 0


async def test_poke_admits_up_to_a_grown_capacity() -> None:
    capacity = [0]
    queue = AdmissionQueue("m", lambda: capacity[0])
    h = Harness(queue)
    for i in range(5):
        await h.add(f"w{i}", f"t{i}")
    queue.poke()  # nothing to admit yet
    await settle()
    assert h.order == []
    capacity[0] = 3
    queue.poke()
    await settle()
    assert sorted(h.order) == ["w0", "w1", "w2"]
    assert queue.stats() == QueueStats(
        in_flight=3, waiting=2, waiting_by_priority={0: 2}, capacity=3
    )
    await h.close()
    assert queue.stats().in_flight == 0


async def test_an_arrival_admits_those_waiting_if_capacity_grew_unpoked() -> None:
    capacity = [0]
    queue = AdmissionQueue("m", lambda: capacity[0])
    h = Harness(queue)
    await h.add("early", "a")
    capacity[0] = 2
    late = now_or_never(queue.acquire("b"))
    await settle()
    assert h.order == ["early"]
    assert queue.stats().in_flight == 2
    queue.release(late)
    await h.close()


async def test_a_shrunk_capacity_admits_nobody_until_enough_releases() -> None:
    capacity = [3]
    queue = AdmissionQueue("m", lambda: capacity[0])
    slots = [now_or_never(queue.acquire("a")) for _ in range(3)]
    capacity[0] = 1
    h = Harness(queue)
    await h.add("w", "b")
    queue.release(slots[0])
    queue.release(slots[1])
    await settle()
    assert h.order == []
    assert queue.stats().in_flight == 1
    queue.release(slots[2])
    await settle()
    assert h.order == ["w"]
    assert queue.stats().in_flight == 1
    await h.close()


async def test_release_is_idempotent_and_async_with_releases() -> None:
    h = await one_slot_held()
    await h.add("w", "a")
    slot = h.held.pop()
    h.queue.release(slot)
    h.queue.release(slot)
    slot.release()
    await settle()
    assert h.queue.stats().in_flight == 1  # "w" holds it; the repeats freed nothing more
    await h.serve(1)
    assert h.queue.stats().in_flight == 0

    async with await h.queue.acquire("b") as held:
        assert h.queue.stats().in_flight == 1
        assert not held.released
    assert held.released
    assert h.queue.stats().in_flight == 0
    await h.close()


async def test_a_slot_is_released_only_to_its_own_queue() -> None:
    one, other = AdmissionQueue("one", lambda: 1), AdmissionQueue("other", lambda: 1)
    slot = now_or_never(one.acquire("a"))
    with pytest.raises(ValueError, match="another queue"):
        other.release(slot)
    one.release(slot)


async def test_waited_s_measures_the_time_queued() -> None:
    loop = asyncio.get_running_loop()  # the queue's clock
    h = await one_slot_held()
    before_add = loop.time()
    await h.add("w", "a")
    queued = loop.time()
    await asyncio.sleep(0.02)
    before_serve = loop.time()
    await h.serve(1)
    # Queued before ``queued`` and served after ``before_serve`` (the 20 ms between them
    # included), both within the calls.
    assert before_serve - queued <= h.held[0].waited_s <= loop.time() - before_add
    await h.close()


async def test_bad_weight_or_cost_is_refused() -> None:
    queue = AdmissionQueue("m", lambda: 1)
    for kwargs in ({"weight": 0.0}, {"weight": float("nan")}, {"cost": -1.0}):
        with pytest.raises(ValueError):
            await queue.acquire("a", **kwargs)
    assert queue.stats().in_flight == 0


async def test_waiters_that_leave_early_do_not_grow_the_queue_state() -> None:
    queue = AdmissionQueue("m", lambda: 0)
    h = Harness(queue)
    await h.add("long", "long")
    for i in range(300):
        task = asyncio.create_task(queue.acquire(f"t{i}"))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    cls = queue._order._classes[0]
    assert cls.live == 1
    assert len(cls.heap) <= 2 * cls.live + fair_order._SWEEP_MIN + 1
    assert len(cls.tenants) <= 2 * fair_order._SWEEP_MIN
    await h.close()
    assert queue._order._classes == {}


async def test_tenants_served_once_are_forgotten_as_virtual_time_passes() -> None:
    h = await one_slot_held(max_length=2000)
    for i in range(600):
        await h.add(f"A{i}", "A")
    for i in range(300):
        await h.add(f"t{i}", f"t{i}")  # a one-off tenant, served within a round
        await h.serve(2)
    assert sum(label.startswith("t") for label in h.order) == 300
    cls = h.queue._order._classes[0]
    assert len(cls.tenants) <= 2 * fair_order._SWEEP_MIN
    await h.close()


async def test_the_registry_keeps_one_queue_per_model() -> None:
    capacities = {"a": 1, "b": 0}
    asked: list[str] = []

    def capacity_of(model: str) -> int:
        asked.append(model)
        return capacities[model]

    queues = AdmissionQueues(capacity_of, max_length=5, max_wait_s=10.0)
    assert queues.get("a") is queues.get("a")
    slot = now_or_never(queues.get("a").acquire("t"))
    h = Harness(queues.get("b"))
    await h.add("w", "t")
    assert set(asked) == {"a", "b"}
    assert queues.stats() == {
        "a": QueueStats(in_flight=1, waiting=0, waiting_by_priority={}, capacity=1),
        "b": QueueStats(in_flight=0, waiting=1, waiting_by_priority={0: 1}, capacity=0),
    }
    capacities["b"] = 1
    queues.poke_all()
    await settle()
    assert h.order == ["w"]
    queues.get("a").release(slot)
    await h.close()
