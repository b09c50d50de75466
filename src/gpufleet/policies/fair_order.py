"""Who gets a model's next free slot: the fair queue's order of service, with time a parameter.

An engine batches what it is sent, so the gateway holds a model's excess requests and decides
who goes first:

1. **Strict priority between classes.** A lower ``priority`` is always served first (0 is
   interactive, 1 batch): interactive requests have a latency target, batch ones only a
   throughput one, so batch work fills the slots interactive work leaves free and no more.
2. **Weighted fair share between tenants within a class**, by virtual times as in start-time
   fair queueing (Goyal, Vin & Cheng, SIGCOMM 1996). A request gets the start tag
   ``S = max(V, F_prev)`` and the finish tag ``F = S + cost / weight``, where ``F_prev`` is the
   finish tag of the tenant's previous request and ``V`` the start tag of the latest request
   served; the waiter with the smallest finish tag goes next. Tags need no estimate of how
   fast the engines are, each operation is a heap push or pop (O(log n)), and a backlogged
   tenant's share is proportional to its weight however many requests it queues — a tenant
   flooding the queue only pushes its own tags further out, while a newcomer starts at ``V``
   and is served within a round. ``V`` moving forward also means an idle tenant banks no credit.
3. **FIFO within a tenant**, because its tags only grow; ties go to the earlier arrival.

The queue is bounded twice: at most ``max_length`` waiters (the next is refused at once, so a
client learns to back off instead of timing out), and at most ``max_wait_s`` per waiter. A
request that leaves unserved (cancelled, timed out) hands its tag back, so requests never
served are not charged to its tenant's share. Only waiters are tracked: once a class has no
waiter its tags are dropped, since without a backlog there is nothing to be fair about.

``FairOrder`` owns exactly these decisions and the counts they rest on (in flight, waiting) —
no futures, no timers, no clock: every method that depends on time takes ``now``. The
gateway's asyncio shell (``gpufleet.gateway.fairqueue``) drives it in loop time, resolving a
future per waiter; the simulator drives the same object in virtual time. A waiter carries an
opaque ``item`` for its driver (the shell's future, the simulator's request).
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

__all__ = ["FairOrder", "Refusal", "Waiter"]

T = TypeVar("T")

#: Slack before the lazily pruned heaps, arrival list and tenant tables are compacted.
_SWEEP_MIN = 64


@dataclass(frozen=True, slots=True)
class Refusal:
    """A request refused a place (queue full) or taken out unserved (waited too long)."""

    reason: Literal["full", "timeout"]
    retry_after_s: float
    waiting: int = 0
    """How many were waiting when a full queue refused it."""
    waited_s: float = 0.0
    """How long it waited before it timed out: the queue's ``max_wait_s``."""


class Waiter(Generic[T]):
    """One queued request: its tenant, its tags, its deadline and its driver's ``item``."""

    __slots__ = ("cls", "deadline", "enqueued_at", "finish", "item", "queued", "start", "tenant")

    def __init__(
        self,
        item: T,
        cls: _Class[T],
        tenant: str,
        start: float,
        finish: float,
        enqueued_at: float,
        deadline: float,
    ) -> None:
        self.item = item
        self.cls = cls
        self.tenant = tenant
        self.start = start
        self.finish = finish
        self.enqueued_at = enqueued_at
        #: ``enqueued_at + max_wait_s``: from then on ``expire`` takes it out.
        self.deadline = deadline
        #: Still waiting: neither served, nor left, nor expired.
        self.queued = True

    @property
    def priority(self) -> int:
        return self.cls.priority

    def __repr__(self) -> str:
        return f"<Waiter {self.tenant!r} p{self.cls.priority} F={self.finish:g} {self.item!r}>"


class _Tenant:
    __slots__ = ("last_finish", "served_finish", "waiting")

    def __init__(self) -> None:
        #: Finish tag of the tenant's latest waiter, and of its latest one served.
        self.last_finish = 0.0
        self.served_finish = 0.0
        self.waiting = 0


class _Class(Generic[T]):
    """The waiters of one priority, ordered by finish tag; entries of departed waiters linger."""

    __slots__ = ("heap", "live", "priority", "sweep_at", "tenants", "vtime")

    def __init__(self, priority: int) -> None:
        self.priority = priority
        self.heap: list[tuple[float, int, Waiter[T]]] = []
        self.live = 0
        #: Tags of tenants with waiters, or whose last finish tag is still ahead of ``vtime``.
        self.tenants: dict[str, _Tenant] = {}
        self.sweep_at = _SWEEP_MIN
        self.vtime = 0.0


class FairOrder(Generic[T]):
    """The order of service and the slot count of one model; see the module docstring.

    A driver calls ``take`` for a request that may go at once, ``enqueue`` for one that must
    wait, ``peek`` and ``serve`` (or ``grant``) when a slot may be free, ``leave`` when a waiter
    goes away, ``expire`` when time passes and ``release`` when a request in flight ends.
    ``in_flight`` and ``waiting`` are for reading only.
    """

    __slots__ = (
        "_arrivals",
        "_classes",
        "_seq",
        "in_flight",
        "max_length",
        "max_wait_s",
        "retry_after_s",
        "timed_out",
        "waiting",
    )

    def __init__(
        self, *, max_length: int = 1000, max_wait_s: float = 30.0, retry_after_s: float = 1.0
    ) -> None:
        if max_length < 0:
            raise ValueError(f"max_length must be at least 0, not {max_length}")
        if not max_wait_s > 0:
            raise ValueError(f"max_wait_s must be positive (math.inf: no limit), not {max_wait_s}")
        self.max_length = max_length
        self.max_wait_s = max_wait_s
        self.retry_after_s = retry_after_s
        #: The refusal of every waiter ``expire`` takes out.
        self.timed_out = Refusal("timeout", retry_after_s, waited_s=max_wait_s)
        self.in_flight = 0
        self.waiting = 0
        self._classes: dict[int, _Class[T]] = {}
        #: Waiters in arrival order, hence deadline order; departed ones linger until compacted.
        self._arrivals: deque[Waiter[T]] = deque()
        self._seq = itertools.count()

    def take(self, capacity: int) -> bool:
        """Count a request in flight if a slot is free and nobody waits (who waits goes first)."""
        if self.in_flight < capacity and not self.waiting:
            self.in_flight += 1
            return True
        return False

    def release(self) -> bool:
        """A request in flight ended (its driver makes sure each is released once); whether
        someone waits for the slot it freed."""
        self.in_flight -= 1
        return self.waiting > 0

    def enqueue(
        self,
        item: T,
        tenant: str,
        now: float,
        *,
        priority: int = 0,
        weight: float = 1.0,
        cost: float = 1.0,
    ) -> Waiter[T] | Refusal:
        """Queue a request that cannot go at once, or refuse it when ``max_length`` wait."""
        if not (0.0 < weight < math.inf and 0.0 <= cost < math.inf):
            raise ValueError(f"weight must be positive and cost non-negative: {weight}, {cost}")
        if self.waiting >= self.max_length:
            return Refusal("full", self.retry_after_s, waiting=self.waiting)
        cls = self._classes.get(priority)
        if cls is None:
            cls = self._classes[priority] = _Class(priority)
        state = cls.tenants.get(tenant)
        if state is None:
            state = cls.tenants[tenant] = _Tenant()
        start = max(cls.vtime, state.last_finish)
        finish = start + cost / weight
        state.last_finish = finish
        state.waiting += 1
        waiter = Waiter(item, cls, tenant, start, finish, now, now + self.max_wait_s)
        heapq.heappush(cls.heap, (finish, next(self._seq), waiter))
        cls.live += 1
        self.waiting += 1
        if self.max_wait_s < math.inf:
            if len(self._arrivals) > 2 * self.waiting + _SWEEP_MIN:
                self._arrivals = deque(w for w in self._arrivals if w.queued)
            self._arrivals.append(waiter)
        return waiter

    def peek(self) -> Waiter[T] | None:
        """The waiter to serve next, left in the queue; None when nobody waits."""
        if not self._classes:
            return None
        heap = self._classes[min(self._classes)].heap
        while not heap[0][2].queued:  # a class exists only while one of its waiters is queued
            heapq.heappop(heap)
        return heap[0][2]

    def serve(self, waiter: Waiter[T]) -> None:
        """Give ``waiter``, the one ``peek`` returned, the next slot: out of the queue, in flight.

        Serving it moves its class's virtual time to its start tag.
        """
        if self.peek() is not waiter:
            raise ValueError(f"{waiter!r} is not the next to serve")
        cls = waiter.cls
        heapq.heappop(cls.heap)
        if waiter.start > cls.vtime:
            cls.vtime = waiter.start
        self._unlink(waiter, served=True)
        self.in_flight += 1

    def grant(self, capacity: int) -> Waiter[T] | None:
        """Serve the next waiter if one of ``capacity`` slots is free; None otherwise."""
        if self.in_flight >= capacity:
            return None
        waiter = self.peek()
        if waiter is not None:
            self.serve(waiter)
        return waiter

    def leave(self, waiter: Waiter[T]) -> None:
        """Take a waiter out unserved (its client went away); doing it twice does nothing."""
        if waiter.queued:
            self._unlink(waiter)

    def expire(self, now: float) -> list[Waiter[T]]:
        """Take out the waiters whose ``max_wait_s`` ran out by ``now``, each refused with
        ``timed_out``, oldest first."""
        expired = []
        arrivals = self._arrivals
        while arrivals:
            waiter = arrivals[0]
            if waiter.queued:
                if waiter.deadline > now:
                    break
                self._unlink(waiter)
                expired.append(waiter)
            arrivals.popleft()
        return expired

    def next_deadline(self) -> float | None:
        """When ``expire`` will next take someone out; None when no waiter has a deadline."""
        arrivals = self._arrivals
        while arrivals and not arrivals[0].queued:
            arrivals.popleft()
        return arrivals[0].deadline if arrivals else None

    def waiting_by_priority(self) -> dict[int, int]:
        """Waiters by priority class, most urgent first; classes with none are left out."""
        return {p: self._classes[p].live for p in sorted(self._classes)}

    def _unlink(self, waiter: Waiter[T], *, served: bool = False) -> None:
        """Take a waiter out of the counts; its heap entry, if still there, is skipped later.

        A waiter leaving unserved as its tenant's latest, or its last, hands back its tag.
        """
        waiter.queued = False
        self.waiting -= 1
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
