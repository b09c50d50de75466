"""The ledger's timings of one model over a window: what the latency report reads.

A mixin of ``Store``. Only answered requests (2xx) count: a refusal or a failure has no time
to first token worth charting. The rows come by the ledger's (model, at) index.
"""

from __future__ import annotations

import datetime as dt
from contextlib import AbstractContextManager

from sqlalchemy import Connection, and_, select

from gpufleet.policies.latency import Timing
from gpufleet.store.tables import aware, usage

__all__ = ["TimingStore"]


class TimingStore:
    def _connect(self) -> AbstractContextManager[Connection]:
        raise NotImplementedError

    def timings(self, model: str, since: dt.datetime, until: dt.datetime) -> list[Timing]:
        u = usage.c
        query = select(u.at, u.ttft_ms, u.duration_ms, u.completion_tokens).where(
            u.model == model,
            u.at >= since,
            u.at < until,
            and_(u.status >= 200, u.status < 300),
        )
        with self._connect() as conn:
            return [
                Timing(aware(r[0]).timestamp(), r[1], float(r[2]), int(r[3]))
                for r in conn.execute(query)
            ]
