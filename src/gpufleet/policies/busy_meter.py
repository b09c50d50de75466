"""Each replica's busy time, split between the requests in flight on it by token weight.

A replica costs its price whether busy or idle; a request is charged its share of the replica's
*busy* time. While several requests are in flight on a replica each second of busy time is split
between them in proportion to their token weight (prompt + output budget), so a long generation
pays more than a short one beside it. That is a fair-share integral, kept in O(1) per request
with a per-replica virtual clock (as weighted fair queueing does): ``V`` advances by ``dt / W``
where ``W`` is the weight in flight, and a request of weight ``w`` that started at ``V0`` is
charged ``w × (V − V0)`` replica-seconds. Time is a parameter: the gateway's proxy passes its
monotonic clock, the simulator its virtual time.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BusyMeter", "MeterTicket"]


@dataclass(slots=True)
class _Clock:
    virtual: float = 0.0
    weight: float = 0.0
    last: float = 0.0
    count: int = 0


@dataclass(frozen=True, slots=True)
class MeterTicket:
    replica: str
    weight: float
    start: float


class BusyMeter:
    """Each replica's busy time, split between its requests by token weight."""

    def __init__(self) -> None:
        self._clocks: dict[str, _Clock] = {}

    def _advance(self, replica: str, now: float) -> _Clock:
        clock = self._clocks.get(replica)
        if clock is None:
            clock = self._clocks[replica] = _Clock(last=now)
        if clock.weight > 0:
            clock.virtual += (now - clock.last) / clock.weight
        clock.last = now
        return clock

    def start(self, replica: str, weight: float, now: float) -> MeterTicket:
        weight = max(weight, 1.0)
        clock = self._advance(replica, now)
        clock.weight += weight
        clock.count += 1
        return MeterTicket(replica, weight, clock.virtual)

    def stop(self, ticket: MeterTicket, now: float) -> float:
        """The request's replica-seconds."""
        clock = self._advance(ticket.replica, now)
        share = ticket.weight * (clock.virtual - ticket.start)
        clock.count -= 1
        clock.weight = clock.weight - ticket.weight if clock.count else 0.0
        if not clock.count:
            del self._clocks[ticket.replica]  # idle: the next request starts a fresh clock
        return share
