"""The OpenAI Files and Batches API: ``/v1/files`` and ``/v1/batches``.

A batch is a JSONL file of requests (``custom_id``, ``method``, ``url``, ``body``) answered in
the background at ``batch`` priority through the same path as a live request — the same
quotas, fair queue, routing and ledger — so it fills idle capacity and yields to interactive
traffic. Everything a caller can get wrong is checked when the batch is created and answered
with a 400 naming the line and the field (OpenAI accepts and fails the batch later; an error
at once loses nothing and is easier to act on). Files and batches belong to the caller's
tenant; an admin sees all.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
import secrets
from collections.abc import Awaitable, Callable, Collection
from typing import Any

from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gpufleet.gateway.asgi import read_body
from gpufleet.gateway.auth import Principal
from gpufleet.gateway.errors import ApiError, bad_request
from gpufleet.gateway.validate import parse_body
from gpufleet.store import BatchLine, BatchRecord, FileRecord, Store

__all__ = ["MAX_LINES", "batch_view", "file_view", "routes"]

Authenticate = Callable[[Request], Awaitable[Principal]]

#: Requests in one batch at most, and bytes in one file (OpenAI's limits: 50,000 and 200 MB).
MAX_LINES = 50_000
MAX_FILE_BYTES = 100 * 1024 * 1024
_PURPOSES = ("batch", "batch_output", "fine-tune", "assistants", "user_data", "evals")
_WINDOW = re.compile(r"^(\d{1,3})h$")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _ts(value: dt.datetime | None) -> int | None:
    return int(value.timestamp()) if value is not None else None


def file_view(f: FileRecord) -> dict[str, Any]:
    return {
        "id": f.id,
        "object": "file",
        "bytes": f.bytes,
        "created_at": _ts(f.created_at),
        "filename": f.filename,
        "purpose": f.purpose,
        "status": "processed",
    }


def batch_view(b: BatchRecord) -> dict[str, Any]:
    return {
        "id": b.id,
        "object": "batch",
        "endpoint": b.endpoint,
        "errors": None,
        "input_file_id": b.input_file_id,
        "completion_window": b.completion_window,
        "status": b.status,
        "output_file_id": b.output_file_id,
        "error_file_id": b.error_file_id,
        "created_at": _ts(b.created_at),
        "in_progress_at": _ts(b.in_progress_at),
        "expires_at": _ts(b.expires_at),
        "finalizing_at": _ts(b.finalizing_at),
        "completed_at": _ts(b.completed_at),
        "failed_at": None,
        "expired_at": _ts(b.expired_at),
        "cancelling_at": _ts(b.cancelling_at),
        "cancelled_at": _ts(b.cancelled_at),
        "request_counts": {"total": b.total, "completed": b.completed, "failed": b.failed},
        "metadata": b.meta,
    }


def _not_found(kind: str, ident: str, param: str) -> ApiError:
    return ApiError(404, f"No such {kind}: '{ident}'", param=param, code=f"{kind}_not_found")


def parse_lines(content: bytes, endpoint: str, file_id: str) -> list[BatchLine]:
    """The batch's requests, or a 400 that names the first bad line and what is wrong."""
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise bad_request(f"{file_id} is not UTF-8 text", param="input_file_id") from exc
    lines: list[BatchLine] = []
    seen: set[str] = set()
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue

        def fail(problem: str, number: int = number) -> ApiError:
            return bad_request(
                f"line {number} of {file_id}: {problem}",
                param="input_file_id",
                code="invalid_batch_line",
            )

        try:
            item = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise fail(f"not JSON ({exc.msg} at column {exc.colno})") from exc
        if not isinstance(item, dict):
            raise fail("must be a JSON object with custom_id, method, url and body")
        custom_id = item.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id or len(custom_id) > 512:
            raise fail("custom_id must be a non-empty string of at most 512 characters")
        if custom_id in seen:
            raise fail(f"custom_id '{custom_id}' appears twice; each line needs its own")
        seen.add(custom_id)
        if item.get("method", "POST") != "POST":
            raise fail("method must be POST")
        if item.get("url") != endpoint:
            raise fail(f"url is {item.get('url')!r} but the batch's endpoint is '{endpoint}'")
        body = item.get("body")
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            raise fail("body must be a JSON object with a 'model'")
        if body.get("stream") is True:
            raise fail("body.stream must not be true: batch answers are not streamed")
        lines.append(BatchLine(len(lines), custom_id, body))
        if len(lines) > MAX_LINES:
            raise bad_request(
                f"{file_id} has more than {MAX_LINES} requests; split it into several batches",
                param="input_file_id",
            )
    if not lines:
        raise bad_request(f"{file_id} holds no requests", param="input_file_id")
    return lines


def routes(
    store: Store,
    authenticate: Authenticate,
    endpoints: Collection[str],
    *,
    wake: Callable[[], None] = lambda: None,
) -> list[Route]:
    """``wake`` tells the batch runner that a batch was created or cancelled."""

    def visible(principal: Principal, tenant: str) -> bool:
        return principal.is_admin or principal.tenant == tenant

    async def own_file(principal: Principal, file_id: str) -> FileRecord:
        record = await asyncio.to_thread(store.get_file, file_id)
        if record is None or not visible(principal, record.tenant):
            raise _not_found("file", file_id, "file_id")
        return record

    async def own_batch(principal: Principal, batch_id: str) -> BatchRecord:
        record = await asyncio.to_thread(store.get_batch, batch_id)
        if record is None or not visible(principal, record.tenant):
            raise _not_found("batch", batch_id, "batch_id")
        return record

    async def create_file(request: Request) -> Response:
        principal = await authenticate(request)
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise bad_request("Send the file as multipart/form-data with 'file' and 'purpose'")
        async with request.form(max_files=1, max_fields=10) as form:
            upload, purpose = form.get("file"), form.get("purpose")
            if not isinstance(upload, UploadFile):
                raise bad_request("The form has no 'file' part", param="file")
            if purpose not in _PURPOSES:
                raise bad_request(f"purpose must be one of {', '.join(_PURPOSES)}", param="purpose")
            content = await upload.read(MAX_FILE_BYTES + 1)
            filename = (upload.filename or "upload.jsonl")[:255]
        if len(content) > MAX_FILE_BYTES:
            raise ApiError(
                413, f"The file is larger than {MAX_FILE_BYTES // (1 << 20)} MiB", param="file"
            )
        record = FileRecord(
            f"file-{secrets.token_hex(12)}",
            principal.tenant,
            str(purpose),
            filename,
            len(content),
            _now(),
        )
        await asyncio.to_thread(store.add_file, record, content)
        return JSONResponse(file_view(record))

    async def list_files(request: Request) -> Response:
        principal = await authenticate(request)
        tenant = None if principal.is_admin else principal.tenant
        purpose = request.query_params.get("purpose")
        rows = await asyncio.to_thread(store.list_files, tenant, purpose=purpose)
        return JSONResponse({"object": "list", "data": [file_view(f) for f in rows]})

    async def get_file(request: Request) -> Response:
        principal = await authenticate(request)
        return JSONResponse(file_view(await own_file(principal, request.path_params["id"])))

    async def file_content(request: Request) -> Response:
        principal = await authenticate(request)
        record = await own_file(principal, request.path_params["id"])
        content = await asyncio.to_thread(store.file_content, record.id)
        return Response(content or b"", media_type="application/octet-stream")

    async def delete_file(request: Request) -> Response:
        principal = await authenticate(request)
        record = await own_file(principal, request.path_params["id"])
        await asyncio.to_thread(store.delete_file, record.id)
        return JSONResponse({"id": record.id, "object": "file", "deleted": True})

    async def create_batch(request: Request) -> Response:
        principal = await authenticate(request)
        data = parse_body(await read_body(request, 1 << 20))
        endpoint = data.get("endpoint")
        if not isinstance(endpoint, str) or endpoint not in endpoints:
            raise bad_request(
                f"endpoint must be one of {', '.join(sorted(endpoints))}", param="endpoint"
            )
        window = data.get("completion_window", "24h")
        match = _WINDOW.match(window) if isinstance(window, str) else None
        if match is None or not 1 <= int(match.group(1)) <= 168:
            raise bad_request(
                "completion_window must be hours such as '24h' (1h to 168h)",
                param="completion_window",
            )
        meta = data.get("metadata")
        if meta is not None and not (
            isinstance(meta, dict)
            and len(meta) <= 16
            and all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
        ):
            raise bad_request("metadata must map at most 16 strings to strings", param="metadata")
        file_id = data.get("input_file_id")
        if not isinstance(file_id, str):
            raise bad_request("input_file_id is required", param="input_file_id")
        source = await own_file(principal, file_id)
        if source.purpose != "batch":
            raise bad_request(
                f"{file_id} has purpose '{source.purpose}'; upload it with purpose 'batch'",
                param="input_file_id",
            )
        content = await asyncio.to_thread(store.file_content, file_id)
        lines = parse_lines(content or b"", endpoint, file_id)
        now = _now()
        record = BatchRecord(
            id=f"batch_{secrets.token_hex(12)}",
            tenant=principal.tenant,
            key_prefix=principal.key_prefix,
            endpoint=endpoint,
            input_file_id=file_id,
            completion_window=window,
            status="in_progress",
            output_file_id=None,
            error_file_id=None,
            total=len(lines),
            completed=0,
            failed=0,
            meta=meta,
            created_at=now,
            expires_at=now + dt.timedelta(hours=int(match.group(1))),
            in_progress_at=now,
        )
        await asyncio.to_thread(store.create_batch, record, lines)
        wake()
        return JSONResponse(batch_view(record))

    async def get_batch(request: Request) -> Response:
        principal = await authenticate(request)
        return JSONResponse(batch_view(await own_batch(principal, request.path_params["id"])))

    async def list_batches(request: Request) -> Response:
        principal = await authenticate(request)
        try:
            limit = min(max(int(request.query_params.get("limit", "20")), 1), 100)
        except ValueError as exc:
            raise bad_request("limit must be a whole number", param="limit") from exc
        tenant = None if principal.is_admin else principal.tenant
        after = request.query_params.get("after")
        rows = await asyncio.to_thread(store.list_batches, tenant, limit=limit + 1, after=after)
        page = rows[:limit]
        return JSONResponse(
            {
                "object": "list",
                "data": [batch_view(b) for b in page],
                "first_id": page[0].id if page else None,
                "last_id": page[-1].id if page else None,
                "has_more": len(rows) > limit,
            }
        )

    async def cancel_batch(request: Request) -> Response:
        principal = await authenticate(request)
        record = await own_batch(principal, request.path_params["id"])
        if record.status in ("in_progress", "validating"):
            await asyncio.to_thread(
                store.update_batch,
                record.id,
                only_from=("in_progress", "validating"),
                status="cancelling",
                cancelling_at=_now(),
            )
            wake()
        elif record.status not in ("cancelling", "cancelled"):
            raise ApiError(
                409,
                f"The batch is {record.status}; only a batch in progress can be cancelled",
                param="batch_id",
                code="batch_not_cancellable",
            )
        updated = await asyncio.to_thread(store.get_batch, record.id)
        assert updated is not None
        return JSONResponse(batch_view(updated))

    return [
        Route("/v1/files", create_file, methods=["POST"]),
        Route("/v1/files", list_files, methods=["GET"]),
        Route("/v1/files/{id}", get_file, methods=["GET"]),
        Route("/v1/files/{id}", delete_file, methods=["DELETE"]),
        Route("/v1/files/{id}/content", file_content, methods=["GET"]),
        Route("/v1/batches", create_batch, methods=["POST"]),
        Route("/v1/batches", list_batches, methods=["GET"]),
        Route("/v1/batches/{id}", get_batch, methods=["GET"]),
        Route("/v1/batches/{id}/cancel", cancel_batch, methods=["POST"]),
    ]
