"""Quota settlements the shared store has not taken yet: kept, bounded, retried with back-off.

A request admitted before the quota store (Redis) went away finishes while it is away; its
settlement — free the concurrency slot, replace the reserved tokens and cost by the actual
ones — must land when the store is back, or the slot stays taken until its lease expires
(30 s after its last renewal, ``SHARED_LEASE_S``) and the reservation stays charged.
Settlements are idempotent per lease (the store's script removes the lease by id and applies
corrections once), so retrying one that may already have landed is safe, and the backlog keeps
one per lease.

The store is either there or not for all of them, so the back-off is the backlog's, not each
settlement's: ``failed`` pushes the next attempt out (0.25 s doubling to ``max_delay_s``, kept
short so slots free within seconds of the store's return), ``landed`` resets it, and ``wake``
makes everything due at once (the store just answered something else). The bound keeps an
outage from growing memory without limit: past ``max_items`` the oldest is dropped and counted
(its slot then frees when its lease expires). Pure: ``now`` is an argument.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, TypeVar

__all__ = ["SettleBacklog"]

T = TypeVar("T")


class SettleBacklog(Generic[T]):
    """Pending settlements by lease, oldest first, with one back-off for all of them."""

    def __init__(
        self, *, max_items: int = 10_000, first_delay_s: float = 0.25, max_delay_s: float = 2.0
    ) -> None:
        if max_items < 1:
            raise ValueError(f"max_items must be at least 1, not {max_items}")
        self.max_items = max_items
        self.first_delay_s = first_delay_s
        self.max_delay_s = max_delay_s
        self._items: OrderedDict[str, T] = OrderedDict()
        self._failures = 0
        self._next_at = 0.0
        #: Since when the backlog has been non-empty (None while empty).
        self.since: float | None = None
        #: Settlements dropped to keep the bound, in this process's life.
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._items)

    def add(self, lease: str, item: T, now: float) -> T | None:
        """Keep ``item`` until it lands (replacing one for the same lease); returns the oldest
        item when it had to go to keep the bound."""
        if not self._items:
            self.since = now
        self._items[lease] = item
        self._items.move_to_end(lease)
        if len(self._items) <= self.max_items:
            return None
        self.dropped += 1
        return self._items.popitem(last=False)[1]

    def due(self, now: float) -> list[tuple[str, T]]:
        """Every pending settlement, oldest first, if an attempt is due at ``now``; else none."""
        if now < self._next_at:
            return []
        return list(self._items.items())

    def items(self) -> list[tuple[str, T]]:
        """Every pending settlement, oldest first, due or not."""
        return list(self._items.items())

    def next_attempt(self, now: float) -> float:
        """Seconds from ``now`` until the next attempt is due (0 when it is)."""
        return max(0.0, self._next_at - now)

    def landed(self, lease: str, now: float) -> None:
        """The store took ``lease``'s settlement: forget it, and the back-off."""
        self._items.pop(lease, None)
        self._failures = 0
        self._next_at = now
        if not self._items:
            self.since = None

    def failed(self, now: float) -> float:
        """The store refused an attempt: the next one waits; returns how long."""
        self._failures += 1
        delay = min(self.max_delay_s, self.first_delay_s * 2.0 ** (self._failures - 1))
        self._next_at = now + delay
        return delay

    def wake(self, now: float) -> None:
        """The store answered something else: try everything now."""
        self._failures = 0
        self._next_at = now
