"""Per-model admission: at most ``capacity()`` requests in flight, the rest wait their turn.

An engine batches what it is sent, so sending it more than its slots only moves the queue into
the engine, where every request's latency grows and nothing decides who goes first. The gateway
therefore holds the excess here, where it can decide:

1. **Strict priority between classes.** A lower ``priority`` is always served first (0 is
   interactive, 1 batch): interactive requests have a latency target, batch ones only a
   throughput one, so batch work fills the slots interactive work leaves free and no more.
2. **Weighted fair share between tenants within a class**, by virtual times as in start-time
   fair queueing (Goyal, Vin & Cheng, SIGCOMM 1996). A request gets the start tag
   ``S = max(V, F_prev)`` and the finish tag ``F = S + cost / weight``, where ``F_prev`` is the
   finish tag of the tenant's previous request and ``V`` the start tag of the latest request
   admitted; the waiter with the smallest finish tag goes next. Tags need no estimate of how
   fast the engines are, each operation is a heap push or pop (O(log n)), and a backlogged
   tenant's share is proportional to its weight however many requests it queues — a tenant
   flooding the queue only pushes its own tags further out, while a newcomer starts at ``V``
   and is served within a round. ``V`` moving forward also means an idle tenant banks no credit.
3. **FIFO within a tenant**, because its tags only grow; ties go to the earlier arrival.

The queue is bounded twice: at most ``max_length`` waiters (the next is refused at once, so a
client learns to back off instead of timing out), and at most ``max_wait_s`` per waiter.

Only waiters are tracked: once a class has no waiter its tags are dropped, since without a
backlog there is nothing to be fair about. The whole thing runs on the event loop thread, so
it needs no lock. The uncontended path is one ``capacity()`` call, two comparisons, a counter
and the ``Slot`` — no future, no timer — because it is paid on every request and the gateway's
budget is 0.5 ms (about 1 µs per acquire + release, measured on CPython 3.11). Waits are measured on
the loop's clock (``loop.time()``, which is ``time.monotonic`` unless a test swaps the loop).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from types import TracebackType
from typing import Literal

__all__ = ["AdmissionQueue", "AdmissionQueues", "QueueRejected", "QueueStats", "Slot"]

#: Slack before the lazily pruned heap and tenant table are compacted.
_SWEEP_MIN = 64


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


class _Tenant:
    __slots__ = ("last_finish", "served_finish", "waiting")

    def __init__(self) -> None:
        #: Finish tag of the tenant's latest waiter, and of its latest one served.
        self.last_finish = 0.0
        self.served_finish = 0.0
        self.waiting = 0


class _Class:
    """The waiters of one priority, ordered by finish tag; entries of departed waiters linger."""

    __slots__ = ("heap", "live", "priority", "sweep_at", "tenants", "vtime")

    def __init__(self, priority: int) -> None:
        self.priority = priority
        self.heap: list[tuple[float, int, _Waiter]] = []
        self.live = 0
        #: Tags of tenants with waiters, or whose last finish tag is still ahead of ``vtime``.
        self.tenants: dict[str, _Tenant] = {}
        self.sweep_at = _SWEEP_MIN
        self.vtime = 0.0


class _Waiter:
    __slots__ = ("cls", "enqueued_at", "finish", "fut", "queued", "start", "tenant", "timer")

    def __init__(
        self,
        fut: asyncio.Future[Slot],
        cls: _Class,
        tenant: str,
        start: float,
        finish: float,
        enqueued_at: float,
    ) -> None:
        self.fut = fut
        self.cls = cls
        self.tenant = tenant
        self.start = start
        self.finish = finish
        self.enqueued_at = enqueued_at
        self.queued = True
        self.timer: asyncio.TimerHandle | None = None


class AdmissionQueue:
    """Admission to one model's engines; see the module docstring for the order of service."""

    def __init__(
        self,
        name: str,
        capacity: Callable[[], int],
        *,
        max_length: int = 1000,
        max_wait_s: float = 30.0,
        retry_after_s: float = 1.0,
    ) -> None:
        if max_length < 0:
            raise ValueError(f"max_length must be at least 0, not {max_length}")
        if not max_wait_s > 0:
            raise ValueError(f"max_wait_s must be positive (math.inf: no limit), not {max_wait_s}")
        self.name = name
        self._capacity = capacity
        self._max_length = max_length
        self._max_wait_s = max_wait_s
        self._retry_after_s = retry_after_s
        self._in_flight = 0
        self._waiting = 0
        self._classes: dict[int, _Class] = {}
        self._seq = itertools.count()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def waiting(self) -> int:
        return self._waiting

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
        capacity = self._capacity()
        if self._in_flight < capacity:
            if self._waiting:
                self._admit()  # capacity grew and nobody poked: those waiting go first
            if not self._waiting and self._in_flight < capacity:
                self._in_flight += 1
                return Slot(self, 0.0)
        if self._waiting >= self._max_length:
            raise QueueRejected(
                self.name, "full", retry_after_s=self._retry_after_s, waiting=self._waiting
            )
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Slot] = loop.create_future()
        waiter = self._enqueue(fut, tenant, priority, cost / weight, loop.time())
        if self._max_wait_s < math.inf:
            waiter.timer = loop.call_later(self._max_wait_s, self._expire, waiter)
        try:
            return await fut
        except asyncio.CancelledError:
            if waiter.queued:
                self._unlink(waiter)
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
        self._in_flight -= 1
        if self._waiting:
            self._admit()

    def poke(self) -> None:
        """Admit waiters up to the capacity, which may have grown (a replica became ready)."""
        if self._waiting:
            self._admit()

    def stats(self) -> QueueStats:
        return QueueStats(
            in_flight=self._in_flight,
            waiting=self._waiting,
            waiting_by_priority={p: self._classes[p].live for p in sorted(self._classes)},
            capacity=self._capacity(),
        )

    def _enqueue(
        self, fut: asyncio.Future[Slot], tenant: str, priority: int, size: float, now: float
    ) -> _Waiter:
        cls = self._classes.get(priority)
        if cls is None:
            cls = self._classes[priority] = _Class(priority)
        state = cls.tenants.get(tenant)
        if state is None:
            state = cls.tenants[tenant] = _Tenant()
        start = max(cls.vtime, state.last_finish)
        finish = start + size
        state.last_finish = finish
        state.waiting += 1
        waiter = _Waiter(fut, cls, tenant, start, finish, now)
        heapq.heappush(cls.heap, (finish, next(self._seq), waiter))
        cls.live += 1
        self._waiting += 1
        return waiter

    def _unlink(self, waiter: _Waiter, *, served: bool = False) -> None:
        """Take a waiter out of the counts; its heap entry, if still there, is skipped later.

        A waiter leaving unserved (cancelled, timed out) as its tenant's latest, or its last,
        hands back its tag, so requests never served are not charged to the tenant's share.
        """
        waiter.queued = False
        if waiter.timer is not None:
            waiter.timer.cancel()
            waiter.timer = None
        self._waiting -= 1
        cls = waiter.cls
        cls.live -= 1
        if not cls.live:
            # No backlog left in this class: drop its tags with it (see the module docstring).
            del self._classes[cls.priority]
            return
        state = cls.tenants[waiter.tenant]
        state.waiting -= 1
        if served:
            state.served_finish = waiter.finish
        elif not state.waiting:
            state.last_finish = state.served_finish
        elif state.last_finish == waiter.finish:
            state.last_finish = waiter.start
        if not state.waiting and state.last_finish <= cls.vtime:
            del cls.tenants[waiter.tenant]  # max(V, last_finish) is V anyway
        if len(cls.heap) > 2 * cls.live + _SWEEP_MIN:
            # Many waiters left early (cancelled, timed out): compact so the heap stays bounded.
            cls.heap = [entry for entry in cls.heap if entry[2].queued]
            heapq.heapify(cls.heap)
        if len(cls.tenants) > cls.sweep_at:
            # Tenants gone idle whose tags ``vtime`` has since overtaken are forgotten; sweeping
            # only when the table doubled keeps this amortised O(1).
            cls.tenants = {
                name: t for name, t in cls.tenants.items() if t.waiting or t.last_finish > cls.vtime
            }
            cls.sweep_at = max(_SWEEP_MIN, 2 * len(cls.tenants))

    def _next(self) -> _Waiter | None:
        """The waiter to serve next, taken out of the queue; None once nobody waits."""
        while self._classes:
            cls = self._classes[min(self._classes)]
            _, _, waiter = heapq.heappop(cls.heap)
            if not waiter.queued:
                continue
            if waiter.fut.done():
                self._unlink(waiter)  # cancelled, its task not yet resumed to leave by itself
                continue
            if waiter.start > cls.vtime:
                cls.vtime = waiter.start
            self._unlink(waiter, served=True)
            return waiter
        return None

    def _admit(self) -> None:
        capacity = self._capacity()
        while self._waiting and self._in_flight < capacity:
            waiter = self._next()
            if waiter is None:
                break
            self._in_flight += 1
            now = asyncio.get_running_loop().time()
            waiter.fut.set_result(Slot(self, now - waiter.enqueued_at))

    def _expire(self, waiter: _Waiter) -> None:
        if not waiter.queued:
            return
        waiter.timer = None
        self._unlink(waiter)
        if not waiter.fut.done():
            waiter.fut.set_exception(
                QueueRejected(
                    self.name,
                    "timeout",
                    retry_after_s=self._retry_after_s,
                    waited_s=self._max_wait_s,
                )
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
