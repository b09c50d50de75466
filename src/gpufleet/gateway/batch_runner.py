"""Runs batches: each line through the gateway's own request path at ``batch`` priority.

Every ``interval_s`` the runner claims the batches it may run (a lease in the store, so with
several gateways each batch has one runner, and a dead gateway's batches pass to another when
its lease expires), keeps up to ``concurrency`` lines of them in flight, and writes each answer
once (``Store.finish_line``). Lines go through ``execute`` — quotas, the fair queue (where
interactive requests go first: the batch yields), routing, the ledger — as the key that
created the batch. An answer the fleet could not give *now* (429 over quota, 503 no replica or
queue timeout, 502) leaves the line pending and the batch backs off; any other answer is final.
When no line is pending the batch is finalised: its output and error files are written and it
completes (or is cancelled / expired, with what was answered).

A line that was in flight when gpufleet stopped is still pending in the store and runs again,
so no line is lost and none is answered twice in the output. (Its first attempt may have
reached an engine: at-least-once towards engines, exactly once in the output.)
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.responses import Response

from gpufleet.errors import StoreError
from gpufleet.gateway.auth import Principal
from gpufleet.gateway.errors import ApiError
from gpufleet.gateway.ids import new_request_id
from gpufleet.outages import OutageReporter
from gpufleet.store import BatchLine, BatchRecord, FileRecord, Store
from gpufleet.supervise import wait_set

__all__ = ["BatchRunner"]

log = logging.getLogger("gpufleet.gateway.batches")

Execute = Callable[
    [str, Principal, bytes, Callable[[str], str | None], str, str], Awaitable[Response]
]

#: Answers that say "not now" rather than "no": the line stays pending and is tried again.
_TRANSIENT = frozenset({429, 502, 503})
_BATCH_HEADERS = {"x-gpufleet-priority": "batch"}


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class BatchRunner:
    def __init__(
        self,
        store: Store,
        execute: Execute,
        principal_for: Callable[[str], Principal | None],
        *,
        gateway_id: str,
        concurrency: int = 16,
        interval_s: float = 0.5,
        lease_s: float = 15.0,
        take_over: bool = False,
        outages: OutageReporter | None = None,
    ) -> None:
        self.store = store
        self.execute = execute
        self.principal_for = principal_for
        self.owner = gateway_id
        self.concurrency = concurrency
        self.interval_s = interval_s
        self.lease = dt.timedelta(seconds=lease_s)
        #: The only gateway (``gpufleet up``): take over claims left by a previous process.
        self.take_over = take_over
        #: A store outage is one line down and one back, not a traceback a pass.
        self.outages = outages or OutageReporter()
        #: Passes run, failed or not (tests wait on it).
        self.passes = 0
        self._in_flight: dict[str, dict[int, asyncio.Task[None]]] = {}
        self._backoff_until: dict[str, float] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def wake(self) -> None:
        self._wake.set()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="gateway:batches")

    async def close(self) -> None:
        """Stop: lines in flight are abandoned (still pending in the store, run again later)."""
        tasks = [t for lines in self._in_flight.values() for t in lines.values()]
        if self._task is not None:
            tasks.append(self._task)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._task = None
        self._in_flight.clear()

    async def _run(self) -> None:
        first = True
        while True:
            try:
                await self.step(take_over=self.take_over and first)
                first = False
                self.outages.recovered("store")
            except StoreError as exc:
                self.outages.failed("store", exc, affected="batches (lines wait)")
            except Exception:
                log.exception("batch runner pass failed; trying again")
            self.passes += 1
            await wait_set(self._wake, self.interval_s)
            self._wake.clear()

    async def step(self, *, take_over: bool = False) -> None:
        """One pass: claim, finalise what is done, fill free places with pending lines."""
        batches = await asyncio.to_thread(
            self.store.claim_batches, self.owner, _now(), self.lease, take_over=take_over
        )
        loop = asyncio.get_running_loop()
        free = self.concurrency - sum(len(v) for v in self._in_flight.values())
        for batch in batches:
            running = self._in_flight.setdefault(batch.id, {})
            if batch.status == "in_progress" and batch.expires_at <= _now():
                await asyncio.to_thread(
                    self.store.update_batch,
                    batch.id,
                    only_from=("in_progress",),
                    status="cancelling",
                    expired_at=_now(),
                )
                continue  # finalised as expired once its lines in flight are back
            if batch.status == "in_progress" and free > 0:
                if self._backoff_until.get(batch.id, 0.0) > loop.time():
                    continue
                lines = await asyncio.to_thread(
                    self.store.pending_lines, batch.id, limit=free, skip=list(running)
                )
                for line in lines:
                    running[line.line] = asyncio.create_task(
                        self._line(batch, line), name=f"batch:{batch.id}:{line.line}"
                    )
                free -= len(lines)
                if lines or running:
                    continue
            if running:
                continue
            if batch.status == "in_progress":
                pending = await asyncio.to_thread(self.store.pending_lines, batch.id, limit=1)
                if pending:
                    continue
            await self._finalise(batch)

    async def _line(self, batch: BatchRecord, line: BatchLine) -> None:
        try:
            principal = self.principal_for(batch.key_prefix)
            request_id = f"batch_req_{secrets.token_hex(12)}"
            if principal is None:
                status, body = (
                    401,
                    {
                        "error": {
                            "message": f"The API key {batch.key_prefix}… that created the batch "
                            "is revoked, expired or gone",
                            "type": "invalid_request_error",
                            "param": None,
                            "code": "invalid_api_key",
                        }
                    },
                )
            else:
                status, body = await self._call(batch, principal, line, request_id)
            if status in _TRANSIENT:
                loop = asyncio.get_running_loop()
                self._backoff_until[batch.id] = loop.time() + 1.0
                return  # still pending: tried again after the back-off
            result = {
                "status_code": status,
                "request_id": request_id,
                "body": body,
            }
            await asyncio.to_thread(
                self.store.finish_line, batch.id, line.line, 200 <= status < 300, result
            )
        except StoreError as exc:  # the line stays pending and runs again once the store is back
            self.outages.failed("store", exc, affected="batches (lines wait)")
        finally:
            self._in_flight.get(batch.id, {}).pop(line.line, None)
            self.wake()

    async def _call(
        self, batch: BatchRecord, principal: Principal, line: BatchLine, request_id: str
    ) -> tuple[int, Any]:
        raw = json.dumps(line.body).encode()
        try:
            # A gateway id per attempt: the ledger's key for the line's usage row and the id
            # the engine sees (a UUID: engines may refuse ``batch_req_…``); the line's own id
            # is kept beside it in the row, as a client's ``x-request-id`` is.
            response = await self.execute(
                batch.endpoint, principal, raw, _BATCH_HEADERS.get, request_id, new_request_id()
            )
        except ApiError as exc:
            return exc.status, exc.body()
        body = bytes(response.body)
        try:
            return response.status_code, json.loads(body)
        except json.JSONDecodeError:
            return response.status_code, {"raw": body.decode("utf-8", "replace")}

    async def _finalise(self, batch: BatchRecord) -> None:
        """Write the output and error files and end the batch."""
        if batch.status == "in_progress":
            await asyncio.to_thread(
                self.store.update_batch,
                batch.id,
                only_from=("in_progress",),
                status="finalizing",
                finalizing_at=_now(),
            )
        output: list[str] = []
        errors: list[str] = []
        for answered in await asyncio.to_thread(lambda: list(self.store.answered_lines(batch.id))):
            result = answered.result or {}
            ok = answered.status == "done"
            row = {
                "id": f"{batch.id}-{answered.line}",
                "custom_id": answered.custom_id,
                "response": result,
                "error": None
                if ok
                else {
                    "code": str(result.get("status_code", "")),
                    "message": _message(result.get("body")),
                },
            }
            (output if ok else errors).append(json.dumps(row))
        output_id = await self._file(batch, "output", output)
        error_id = await self._file(batch, "errors", errors)
        now = _now()
        if batch.status == "cancelling":
            fresh = await asyncio.to_thread(self.store.get_batch, batch.id)
            end: dict[str, Any] = (
                {"status": "expired"}
                if fresh is not None and fresh.expired_at is not None
                else {"status": "cancelled", "cancelled_at": now}
            )
        else:
            end = {"status": "completed", "completed_at": now}
        await asyncio.to_thread(
            self.store.update_batch,
            batch.id,
            output_file_id=output_id,
            error_file_id=error_id,
            owner=None,
            lease_until=None,
            **end,
        )
        self._in_flight.pop(batch.id, None)
        self._backoff_until.pop(batch.id, None)
        log.info("batch %s %s", batch.id, end["status"])

    async def _file(self, batch: BatchRecord, kind: str, rows: list[str]) -> str | None:
        if not rows:
            return None
        content = ("\n".join(rows) + "\n").encode()
        record = FileRecord(
            f"file-{secrets.token_hex(12)}",
            batch.tenant,
            "batch_output",
            f"{batch.id}_{kind}.jsonl",
            len(content),
            _now(),
        )
        await asyncio.to_thread(self.store.add_file, record, content)
        return record.id


def _message(body: Any) -> str:
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("message", ""))
    return ""
