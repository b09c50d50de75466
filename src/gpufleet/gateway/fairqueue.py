"""Per-model admission: at most ``capacity()`` requests in flight, the rest wait their turn.

An engine batches what it is sent, so sending it more than its slots only moves the queue into
the engine, where every request's latency grows and nothing decides who goes first. The gateway
therefore holds the excess here, where it can decide. *What* it decides — strict priority, then
weighted fair share between tenants, FIFO within a tenant, a bounded length and wait — is
``gpufleet.policies.fair_order``'s, a pure core that the simulator drives in virtual time; this
module is its asyncio shell: a future per waiter, a timer per deadline, cancellation.

The whole thing runs on the event loop thread, so it needs no lock. The uncontended path is one
``capacity()`` call, ``FairOrder.take`` and the ``Slot`` — no future, no timer — because it is
paid on every request and the gateway's budget is 0.5 ms (about 0.5 µs per acquire + release,
measured on CPython 3.11). Waits are measured on the loop's clock (``loop.time()``, which is
``time.monotonic`` unless a test swaps the loop).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from types import TracebackType
from typing import Literal

from gpufleet.policies.fair_order import FairOrder, Refusal, Waiter

__all__ = ["AdmissionQueue", "AdmissionQueues", "QueueRejected", "QueueStats", "Slot"]


class QueueRejected(Exception):
    """A request refused admission; the gateway answers it with ``retry-after``."""

    def __init__(
        self,
        model: str,
        reason: Literal["full", "timeout"],
        *,
        retry_after_s: float,
        waiting: int = 0,
        waited_s: float = 0.0,
    ) -> None:
        if reason == "full":
            message = f"the queue for model '{model}' is full ({waiting} waiting); retry later"
        else:
            message = f"waited {waited_s:g} s for model '{model}' without a free slot"
        super().__init__(message)
        self.model = model
        self.reason: Literal["full", "timeout"] = reason
        self.retry_after_s = retry_after_s


@dataclass(frozen=True, slots=True)
class QueueStats:
    in_flight: int
    waiting: int
    #: Waiters by priority class, lowest (most urgent) first; classes with none are left out.
    waiting_by_priority: dict[int, int]
    capacity: int


class Slot:
    """One admitted request's place; give it back with ``release`` or by leaving ``async with``."""

    __slots__ = ("_queue", "released", "waited_s")

    def __init__(self, queue: AdmissionQueue, waited_s: float) -> None:
        self._queue = queue
        #: Seconds the request spent queued (0.0 when admitted at once).
        self.waited_s = waited_s
        self.released = False

    def release(self) -> None:
        self._queue.release(self)

    async def __aenter__(self) -> Slot:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._queue.release(self)

    def __repr__(self) -> str:
        state = "released" if self.released else "held"
        return f"<Slot {self._queue.name!r} {state} waited={self.waited_s:.3f}s>"


class _Pending:
    """The shell's side of one waiter: the future its caller awaits and its expiry timer."""

    __slots__ = ("fut", "timer")

    def __init__(self, fut: asyncio.Future[Slot]) -> None:
        self.fut = fut
        self.timer: asyncio.TimerHandle | None = None

    def cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class AdmissionQueue:
    """Admission to one model's engines: ``FairOrder``'s decisions, carried out on the loop."""

    def __init__(
        self,
        name: str,
        capacity: Callable[[], int],
        *,
        max_length: int = 1000,
        max_wait_s: float = 30.0,
        retry_after_s: float = 1.0,
    ) -> None:
        self.name = name
        self._capacity = capacity
        self._order: FairOrder[_Pending] = FairOrder(
            max_length=max_length, max_wait_s=max_wait_s, retry_after_s=retry_after_s
        )

    @property
    def in_flight(self) -> int:
        return self._order.in_flight

    @property
    def waiting(self) -> int:
        return self._order.waiting

    async def acquire(
        self, tenant: str, *, priority: int = 0, weight: float = 1.0, cost: float = 1.0
    ) -> Slot:
        """A slot, at once if one is free and nobody waits, else in turn.

        Raises ``QueueRejected`` when the queue is full or the wait exceeds ``max_wait_s``.
        Cancelling the caller takes it out of the queue; a slot granted in the same instant is
        given back, never leaked.
        """
        if not (0.0 < weight < math.inf and 0.0 <= cost < math.inf):
            raise ValueError(f"weight must be positive and cost non-negative: {weight}, {cost}")
        order = self._order
        capacity = self._capacity()
        if order.take(capacity):
            return Slot(self, 0.0)
        if order.waiting and order.in_flight < capacity:
            self._admit()  # capacity grew and nobody poked: those waiting go first
            if order.take(capacity):
                return Slot(self, 0.0)
        loop = asyncio.get_running_loop()
        pending = _Pending(loop.create_future())
        waiter = order.enqueue(
            pending, tenant, loop.time(), priority=priority, weight=weight, cost=cost
        )
        if isinstance(waiter, Refusal):
            raise _rejected(self.name, waiter)
        if waiter.deadline < math.inf:
            pending.timer = loop.call_at(waiter.deadline, self._expire, waiter)
        fut = pending.fut
        try:
            return await fut
        except asyncio.CancelledError:
            if waiter.queued:
                order.leave(waiter)
                pending.cancel_timer()
            elif fut.done() and not fut.cancelled() and fut.exception() is None:
                self.release(fut.result())  # granted in the instant the caller went away
            raise

    def release(self, slot: Slot) -> None:
        """Give a slot back and admit the next waiter; releasing twice does nothing."""
        if slot._queue is not self:
            raise ValueError(f"{slot!r} belongs to another queue than {self.name!r}")
        if slot.released:
            return
        slot.released = True
        if self._order.release():
            self._admit()

    def poke(self) -> None:
        """Admit waiters up to the capacity, which may have grown (a replica became ready)."""
        if self._order.waiting:
            self._admit()

    def stats(self) -> QueueStats:
        return QueueStats(
            in_flight=self._order.in_flight,
            waiting=self._order.waiting,
            waiting_by_priority=self._order.waiting_by_priority(),
            capacity=self._capacity(),
        )

    def _admit(self) -> None:
        order = self._order
        capacity = self._capacity()
        while order.waiting and order.in_flight < capacity:
            waiter = order.peek()
            if waiter is None:
                break
            pending = waiter.item
            pending.cancel_timer()
            if pending.fut.done():
                order.leave(waiter)  # cancelled, its task not yet resumed to leave by itself
                continue
            order.serve(waiter)
            now = asyncio.get_running_loop().time()
            pending.fut.set_result(Slot(self, now - waiter.enqueued_at))

    def _expire(self, waiter: Waiter[_Pending]) -> None:
        # The loop may run a timer up to a clock tick early: its deadline has come all the same.
        now = max(asyncio.get_running_loop().time(), waiter.deadline)
        for gone in self._order.expire(now):
            gone.item.cancel_timer()
            if not gone.item.fut.done():
                gone.item.fut.set_exception(_rejected(self.name, self._order.timed_out))


def _rejected(model: str, refusal: Refusal) -> QueueRejected:
    return QueueRejected(
        model,
        refusal.reason,
        retry_after_s=refusal.retry_after_s,
        waiting=refusal.waiting,
        waited_s=refusal.waited_s,
    )


class AdmissionQueues:
    """One ``AdmissionQueue`` per model name, created on first use."""

    def __init__(
        self,
        capacity_of: Callable[[str], int],
        *,
        max_length: int = 1000,
        max_wait_s: float = 30.0,
        retry_after_s: float = 1.0,
    ) -> None:
        self._capacity_of = capacity_of
        self._max_length = max_length
        self._max_wait_s = max_wait_s
        self._retry_after_s = retry_after_s
        self._queues: dict[str, AdmissionQueue] = {}

    def get(self, model: str) -> AdmissionQueue:
        queue = self._queues.get(model)
        if queue is None:
            queue = self._queues[model] = AdmissionQueue(
                model,
                partial(self._capacity_of, model),
                max_length=self._max_length,
                max_wait_s=self._max_wait_s,
                retry_after_s=self._retry_after_s,
            )
        return queue

    def poke_all(self) -> None:
        """Admit waiters everywhere capacity allows, e.g. after replicas changed."""
        for queue in list(self._queues.values()):
            queue.poke()

    def stats(self) -> dict[str, QueueStats]:
        return {model: queue.stats() for model, queue in self._queues.items()}
