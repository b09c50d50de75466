"""Who gets a model's next free slot: the fair queue's order of service, with time a parameter.

An engine batches what it is sent, so the gateway holds a model's excess requests and decides
who goes first:

1. **Strict priority between classes.** A lower ``priority`` is always served first (0 is
   interactive, 1 batch): interactive requests have a latency target, batch ones only a
   throughput one, so batch work fills the slots interactive work leaves free and no more.
2. **Weighted fair share between tenants within a class**, by virtual times as in start-time
   fair queueing (Goyal, Vin & Cheng, SIGCOMM 1996). Each tenant's waiters form a FIFO and only
   its first waiter (its head) is tagged, when it becomes the head: start ``S = max(V, F)`` and
   finish ``S + cost / weight``, where ``F`` is the finish tag of the tenant's latest request
   *served* and ``V`` the start tag of the latest request served in the class (a head that
   leaves unserved hands its start tag to the next); the head with the smallest finish tag
   goes next. Tags need no estimate of how fast the engines are, each
   operation is a heap push or pop (O(log n)), and a backlogged tenant's share is proportional
   to its weight however many requests it queues — a tenant flooding the queue only lengthens
   its own FIFO, while a newcomer starts at ``V`` and is served within a round. ``V`` moving
   forward also means an idle tenant banks no credit.
3. **FIFO within a tenant.** Ties go to the earlier tag.

The queue is bounded twice: at most ``max_length`` waiters (the next is refused at once, so a
client learns to back off instead of timing out), and at most ``max_wait_s`` per waiter. A
request that leaves unserved (cancelled, timed out) charges its tenant nothing: tags chain from
the requests served only, so a tenant whose older waiters time out under overload keeps its
share (tagging every waiter at arrival, each from the one before, would let a tenant's
expired waiters push its next tags ever further out until it is starved). Only waiters are
tracked: once a class has no waiter its tags are dropped, since without a backlog there is
nothing to be fair about.

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

__all__ = ["QUEUE_PRIORITIES", "FairOrder", "Refusal", "Waiter"]

T = TypeVar("T")

#: A tenant's ``priority`` as the queue's class (lower first).
QUEUE_PRIORITIES = {"interactive": 0, "batch": 1}

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
    """One queued request: its tenant, its tags (once at its tenant's head), its deadline and
    its driver's ``item``."""

    __slots__ = (
        "cls",
        "deadline",
        "enqueued_at",
        "finish",
        "item",
        "queued",
        "size",
        "start",
        "state",
        "tenant",
    )

    def __init__(
        self,
        item: T,
        cls: _Class[T],
        state: _Tenant[T],
        tenant: str,
        size: float,
        enqueued_at: float,
        deadline: float,
    ) -> None:
        self.item = item
        self.cls = cls
        self.state = state
        self.tenant = tenant
        #: ``cost / weight``: how far serving it moves its tenant's finish tag.
        self.size = size
        #: Its tags; NaN until it is its tenant's head.
        self.start = math.nan
        self.finish = math.nan
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


class _Tenant(Generic[T]):
    __slots__ = ("fifo", "served_finish", "waiting")

    def __init__(self) -> None:
        #: Finish tag of the tenant's latest waiter served.
        self.served_finish = 0.0
        #: Its waiters in arrival order, the head first; departed ones linger until compacted.
        self.fifo: deque[Waiter[T]] = deque()
        self.waiting = 0


class _Class(Generic[T]):
    """The waiters of one priority: each backlogged tenant's head in a heap by finish tag;
    entries of heads that departed linger."""

    __slots__ = ("heap", "live", "priority", "sweep_at", "tenants", "vtime")

    def __init__(self, priority: int) -> None:
        self.priority = priority
        self.heap: list[tuple[float, int, Waiter[T]]] = []
        self.live = 0
        #: Tenants with waiters, or whose last finish tag served is still ahead of ``vtime``.
        self.tenants: dict[str, _Tenant[T]] = {}
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
        waiter = Waiter(item, cls, state, tenant, cost / weight, now, now + self.max_wait_s)
        state.fifo.append(waiter)
        state.waiting += 1
        if state.waiting == 1:
            self._promote(cls, state)
        cls.live += 1
        self.waiting += 1
        if self.max_wait_s < math.inf:
            if len(self._arrivals) > 2 * self.waiting + _SWEEP_MIN:
                self._arrivals = deque(w for w in self._arrivals if w.queued)
            self._arrivals.append(waiter)
        return waiter

    def _promote(self, cls: _Class[T], state: _Tenant[T], start: float | None = None) -> None:
        """Tag the tenant's first waiter still queued, now its head, and put it in the heap:
        from ``start`` when it takes the place of a head that left unserved, else from
        ``max(V, F)`` (its tenant became backlogged, or its previous head was served)."""
        fifo = state.fifo
        while fifo and not fifo[0].queued:
            fifo.popleft()
        if not fifo:
            return
        head = fifo[0]
        head.start = max(cls.vtime, state.served_finish) if start is None else start
        head.finish = head.start + head.size
        heapq.heappush(cls.heap, (head.finish, next(self._seq), head))

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

        Serving it moves its class's virtual time to its start tag and its tenant's finish tag
        to its own.
        """
        if self.peek() is not waiter:
            raise ValueError(f"{waiter!r} is not the next to serve")
        cls = waiter.cls
        heapq.heappop(cls.heap)
        if waiter.start > cls.vtime:
            cls.vtime = waiter.start
        waiter.state.served_finish = waiter.finish
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

        A head leaving hands the head to its tenant's next waiter: served, the next is tagged
        from the tenant's new finish tag; unserved, the next takes its start tag, so the tenant
        keeps its place while it stays backlogged and the one that left charged nothing.
        """
        waiter.queued = False
        self.waiting -= 1
        cls = waiter.cls
        cls.live -= 1
        if not cls.live:
            # No backlog left in this class: drop its tags with it (see the module docstring).
            del self._classes[cls.priority]
            return
        state = waiter.state
        state.waiting -= 1
        fifo = state.fifo
        if fifo[0] is waiter:
            fifo.popleft()
            self._promote(cls, state, None if served else waiter.start)
        elif len(fifo) > 2 * state.waiting + _SWEEP_MIN:
            state.fifo = deque(w for w in fifo if w.queued)
        if not state.waiting and state.served_finish <= cls.vtime:
            del cls.tenants[waiter.tenant]  # max(V, served_finish) is V anyway
        if len(cls.heap) > 2 * cls.live + _SWEEP_MIN:
            # Many heads left early (cancelled, timed out): compact so the heap stays bounded.
            cls.heap = [entry for entry in cls.heap if entry[2].queued]
            heapq.heapify(cls.heap)
        if len(cls.tenants) > cls.sweep_at:
            # Tenants gone idle whose tags ``vtime`` has since overtaken are forgotten; sweeping
            # only when the table doubled keeps this amortised O(1).
            cls.tenants = {
                name: t
                for name, t in cls.tenants.items()
                if t.waiting or t.served_finish > cls.vtime
            }
            cls.sweep_at = max(_SWEEP_MIN, 2 * len(cls.tenants))
