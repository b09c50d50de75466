"""The store's side of the cost report: replica spans, and the ledger summed for a window.

A mixin of ``Store`` (same engine, same write lock). The controller opens a span when it starts
a replica, closes it when the replica is gone, and moves ``seen_at`` on for the spans of the
replicas it still sees; a span a dead process left open ends at its last ``seen_at``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection
from contextlib import AbstractContextManager
from typing import Any

from sqlalchemy import Connection, and_, case, func, insert, or_, select, update

from gpufleet.policies.costs import Span, UsageTotals
from gpufleet.spec import Inventory
from gpufleet.store.tables import aware, inventories, replica_spans, usage

__all__ = ["CostStore"]


class CostStore:
    def _connect(self) -> AbstractContextManager[Connection]:
        raise NotImplementedError

    def _write(self) -> AbstractContextManager[Connection]:
        raise NotImplementedError

    def open_span(
        self,
        model: str,
        replica: str,
        *,
        generation: int,
        gpus: float,
        gpu_type: str | None,
        price_per_hour: float,
        at: dt.datetime,
        namespace: str = "default",
    ) -> None:
        """A replica begins to hold capacity (once: a replica with an open span keeps it)."""
        s = replica_spans.c
        with self._write() as conn:
            open_ = conn.execute(
                select(s.id).where(s.replica == replica, s.ended_at.is_(None))
            ).first()
            if open_ is not None:
                return
            conn.execute(
                insert(replica_spans).values(
                    namespace=namespace,
                    model=model,
                    replica=replica,
                    generation=generation,
                    gpus=gpus,
                    gpu_type=gpu_type,
                    price_per_hour=price_per_hour,
                    started_at=at,
                    seen_at=at,
                    ended_at=None,
                )
            )

    def close_span(self, replica: str, at: dt.datetime) -> None:
        s = replica_spans.c
        with self._write() as conn:
            conn.execute(
                update(replica_spans)
                .where(s.replica == replica, s.ended_at.is_(None))
                .values(ended_at=at, seen_at=at)
            )

    def end_spans(self, at: dt.datetime) -> int:
        """End every open span at ``at``: the process that ran their replicas stopped them."""
        s = replica_spans.c
        with self._write() as conn:
            ended = conn.execute(
                update(replica_spans).where(s.ended_at.is_(None)).values(ended_at=at, seen_at=at)
            )
            return int(ended.rowcount or 0)

    def open_spans(self) -> list[str]:
        """The replicas whose spans are open."""
        s = replica_spans.c
        with self._connect() as conn:
            return [r[0] for r in conn.execute(select(s.replica).where(s.ended_at.is_(None)))]

    def touch_spans(self, live: Collection[str], at: dt.datetime) -> int:
        """Move ``seen_at`` on for the open spans of ``live`` replicas; end every other open
        span at its last ``seen_at`` (its replica is gone and nobody saw it go). Returns how
        many spans were ended. A span opened after ``at`` is left alone: its replica started
        after the caller listed the live ones."""
        s = replica_spans.c
        with self._write() as conn:
            if live:
                conn.execute(
                    update(replica_spans)
                    .where(s.ended_at.is_(None), s.replica.in_(list(live)))
                    .values(seen_at=at)
                )
            gone = conn.execute(
                update(replica_spans)
                .where(s.ended_at.is_(None), s.replica.not_in(list(live)), s.seen_at < at)
                .values(ended_at=s.seen_at)
            )
            return int(gone.rowcount or 0)

    def put_inventory(self, inventory: Inventory, at: dt.datetime, namespace: str) -> None:
        """The operator's latest view of the nodes (written when it changes)."""
        document = inventory.model_dump(mode="json", by_alias=True, exclude_none=True)
        i = inventories.c
        with self._write() as conn:
            done = conn.execute(
                update(inventories)
                .where(i.namespace == namespace)
                .values(document=document, updated_at=at)
            )
            if not done.rowcount:
                conn.execute(
                    insert(inventories).values(
                        namespace=namespace, document=document, updated_at=at
                    )
                )

    def get_inventory(self, namespace: str) -> Inventory | None:
        i = inventories.c
        with self._connect() as conn:
            row = conn.execute(select(i.document).where(i.namespace == namespace)).first()
        return Inventory.model_validate(row[0]) if row is not None else None

    def spans_between(self, since: dt.datetime, until: dt.datetime) -> list[Span]:
        """Spans that held capacity at some time in [since, until)."""
        s = replica_spans.c
        query = select(replica_spans).where(
            s.started_at < until,
            or_(s.ended_at.is_(None), s.ended_at > since),
        )
        with self._connect() as conn:
            rows = list(conn.execute(query))
        return [
            Span(
                model=r.model,
                replica=r.replica,
                gpus=float(r.gpus),
                price_per_hour=float(r.price_per_hour),
                start=aware(r.started_at).timestamp(),
                end=aware(r.ended_at).timestamp() if r.ended_at is not None else None,
                gpu_type=r.gpu_type,
            )
            for r in rows
        ]

    def usage_totals(
        self, since: dt.datetime, until: dt.datetime, *, tenant: str | None = None
    ) -> list[UsageTotals]:
        """The ledger's rows in [since, until), summed per (model, tenant, key)."""
        u = usage.c
        failed = u.status >= 500
        query = (
            select(
                u.model,
                u.tenant,
                u.key_prefix,
                func.count(),
                func.sum(case((and_(u.status >= 200, u.status < 300), 1), else_=0)),
                func.sum(u.prompt_tokens),
                func.sum(u.completion_tokens),
                func.sum(u.gpu_seconds),
                func.sum(case((failed, 0.0), else_=u.cost_usd)),
                func.sum(case((failed, u.gpu_seconds), else_=0.0)),
            )
            .where(u.at >= since, u.at < until)
            .group_by(u.model, u.tenant, u.key_prefix)
        )
        if tenant is not None:
            query = query.where(u.tenant == tenant)
        with self._connect() as conn:
            rows: list[Any] = list(conn.execute(query))
        return [
            UsageTotals(
                model=r[0],
                tenant=r[1],
                key=r[2],
                requests=int(r[3]),
                successful=int(r[4] or 0),
                prompt_tokens=int(r[5] or 0),
                completion_tokens=int(r[6] or 0),
                gpu_seconds=float(r[7] or 0.0),
                answered_cost=float(r[8] or 0.0),
                failed_gpu_seconds=float(r[9] or 0.0),
            )
            for r in rows
        ]
