"""Daily time windows: is a model's schedule open at a given instant, and when next?

Pure (the instant is a parameter). Windows are local times in the schedule's time zone, so a
"20:00-06:00" window follows daylight saving; one that crosses midnight belongs to the day it
opens on (``days: [fri]`` with "20:00-06:00" runs Friday night into Saturday morning).
"""

from __future__ import annotations

import datetime as dt
import zoneinfo

from gpufleet.spec import ScheduleSpec

__all__ = ["is_open", "next_opening"]

_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def _parse(window: str) -> tuple[dt.time, dt.timedelta]:
    start, end = window.split("-")
    h1, m1 = (int(x) for x in start.split(":"))
    h2, m2 = (int(x) for x in end.split(":"))
    begin = h1 * 60 + m1
    finish = h2 * 60 + m2
    length = (finish - begin) % (24 * 60) or 24 * 60
    return dt.time(h1, m1), dt.timedelta(minutes=length)


def _openings(schedule: ScheduleSpec, around: dt.datetime) -> list[tuple[dt.datetime, dt.datetime]]:
    zone = zoneinfo.ZoneInfo(schedule.timezone)
    local = around.astimezone(zone)
    spans = []
    for offset in (-1, 0, 1, 2, 3, 4, 5, 6, 7):
        day = local.date() + dt.timedelta(days=offset)
        if schedule.days and _DAYS[day.weekday()] not in schedule.days:
            continue
        for window in schedule.windows:
            start, length = _parse(window)
            begin = dt.datetime.combine(day, start, tzinfo=zone)
            spans.append((begin, begin + length))
    return sorted(spans)


def is_open(schedule: ScheduleSpec | None, now: float) -> bool:
    """True when ``now`` (unix seconds) is inside one of the windows (or there is no schedule)."""
    if schedule is None:
        return True
    at = dt.datetime.fromtimestamp(now, dt.UTC)
    return any(begin <= at < end for begin, end in _openings(schedule, at))


def next_opening(schedule: ScheduleSpec, now: float) -> dt.datetime | None:
    """The next time a window opens after ``now``, in the schedule's time zone."""
    at = dt.datetime.fromtimestamp(now, dt.UTC)
    later = [begin for begin, _ in _openings(schedule, at) if begin > at]
    return min(later) if later else None
