"""The stream path: an engine's server-sent events relayed to the client as they come.

``Upstream.forward`` commits a stream's status only with its first event (``first_event``): an
engine that ends a stream before any (llama-cpp-python's 200 to a prompt beyond the context) is
asked again unstreamed, and its refusal answered as it would be unstreamed (``Streams.refused``).
After that the client has bytes, so nothing can be retried: ``Streams.relay`` passes whole SSE
events on (a usage event is never split across yields), reads the engine's usage or — an engine
that streams none — counts with it before ``[DONE]`` (``stream_usage``), and gives the outcome
to ``done`` before the stream's last byte leaves, so its ledger row is spooled before the client
has it all. A stream that breaks ends with an OpenAI-shaped error event and a clean close (502);
a client that goes away ends it as 499 with the tokens so far.

``Upstream`` builds one ``Streams`` and keeps routing's books: it is told when a stream's first
token arrives (its prefill done, its time to first token learnt) and when the stream ends; an
engine's error answer is worded by the proxy, as for unstreamed requests.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from starlette.responses import Response, StreamingResponse

from gpufleet.controller import ModelEntry
from gpufleet.gateway.errors import ApiError, error_response, sse_error, upstream_failed
from gpufleet.gateway.metrics import GatewayMetrics
from gpufleet.gateway.stream_usage import (
    ask_unstreamed,
    count_stream,
    streamed_text,
    usage_event,
)
from gpufleet.gateway.upstream_http import Reply, UpstreamClient, UpstreamError
from gpufleet.runtime import Replica

if TYPE_CHECKING:
    from gpufleet.gateway.proxy import Done, Outcome

__all__ = ["Streams", "first_event"]

#: The proxy's log: its stream lines are where its other lines are.
log = logging.getLogger("gpufleet.gateway.proxy")

_DONE = b"data: [DONE]\n\n"


class Streams:
    """The proxy's stream path, over the proxy's HTTP client (``http``) and its books:
    ``prefilled`` and ``learn_prefill`` at a stream's first token, ``release`` at its end;
    ``engine_error`` and ``refusal`` for an engine that refused a stream before its first
    event."""

    def __init__(
        self,
        metrics: GatewayMetrics,
        http: Callable[[], UpstreamClient],
        *,
        prefilled: Callable[[Replica, int], None],
        learn_prefill: Callable[[ModelEntry, int, float], None],
        release: Callable[[Replica, str, int | None], None],
        engine_error: Callable[[ModelEntry, Replica, int], None],
        refusal: Callable[[ModelEntry, Replica, str, str, int, bytes, str], ApiError],
    ) -> None:
        self._metrics = metrics
        self._http = http
        self._prefilled = prefilled
        self._learn_prefill = learn_prefill
        self._release = release
        self._engine_error = engine_error
        self._refusal = refusal

    def relay(
        self,
        entry: ModelEntry,
        replica: Replica,
        resp: Reply,
        started: float,
        prefill: int,
        tenant: str,
        outcome: Outcome,
        strip_usage: bool,
        stop_meter: Callable[[], float],
        done: Done | None,
        ahead: int = 0,
        request: tuple[str, bytes, str] = ("", b"", ""),
        head: bytes = b"",
    ) -> Response:
        metrics = self._metrics
        itl = metrics.itl.labels(entry.name, tenant)

        async def chunks() -> AsyncIterator[bytes]:
            first = True
            pending = b""
            last = first_at = 0.0
            gaps = 0  # events after the first (for the stream's mean inter-token latency)
            #: The events of a stream that has shown no usage yet, counted at its end if none.
            events: list[bytes] = []
            ended = False

            def end() -> None:
                """The outcome to ``done``, once, before the stream's last byte (``[DONE]`` or
                an error event) leaves: its ledger row is spooled before the client has it all."""
                nonlocal ended
                if not ended:
                    ended = True
                    outcome.duration_s = time.perf_counter() - started
                    if gaps:
                        outcome.itl_s = (last - first_at) / gaps
                    outcome.replica_seconds = stop_meter()
                    if done is not None:
                        done(outcome)

            try:
                async for chunk in _after(head, resp):
                    # Whole SSE events only, so a usage event is never split across yields.
                    pending += chunk
                    cut = pending.rfind(b"\n\n")
                    if cut < 0:
                        continue
                    out, pending = pending[: cut + 2], pending[cut + 2 :]
                    now = time.perf_counter()
                    if first:
                        outcome.ttft_s = now - started
                        self._prefilled(replica, prefill)
                        self._learn_prefill(entry, ahead, outcome.ttft_s)
                        first, first_at = False, now
                    else:
                        itl.observe(now - last)
                        gaps += 1
                    last = now
                    if b'"usage":{' in out or b'"usage": {' in out:
                        out = _take_stream_usage(out, outcome, strip_usage)
                    elif not outcome.counted:
                        outcome.completion_tokens += out.count(b'"delta"') or out.count(b'"text"')
                        events.append(out)
                        if out.endswith(_DONE) and request[0]:
                            # The engine streamed no usage: count with it before the end
                            # (a client may hang up at [DONE]), and give the client the usage
                            # event if it asked.
                            if len(out) > len(_DONE):
                                yield out[: -len(_DONE)]
                            extra = await self._count(replica, outcome, events, request)
                            end()
                            yield _DONE if strip_usage else extra + _DONE
                            continue
                    if out.endswith(_DONE):
                        end()
                    if out:
                        yield out
                if pending:
                    end()
                    yield pending
                elif first:
                    # llama-cpp-python answers a streamed request it then refuses (a prompt
                    # beyond the context) with a 200 and no event: not a silent success.
                    outcome.status = 502
                    log.warning("engine %s ended a stream without an event", replica.id)
                    end()
                    yield sse_error(
                        upstream_failed(entry.name, "the engine ended the stream without an answer")
                    )
            except (UpstreamError, TimeoutError) as exc:
                outcome.status = 502
                metrics.upstream_errors.labels(entry.name, "stream").inc()
                failure = sse_error(upstream_failed(entry.name, _broken(replica, exc)))
                end()
                yield failure
            except (GeneratorExit, asyncio.CancelledError):
                if not ended:  # the client went away before the end
                    outcome.status = 499
                raise
            finally:
                resp.close()
                self._release(replica, entry.name, None if not first else prefill)
                end()

        return StreamingResponse(
            chunks(),
            media_type=resp.header("content-type") or "text/event-stream",
            headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
        )

    async def refused(
        self, entry: ModelEntry, replica: Replica, route: str, body: bytes, request_id: str
    ) -> Response:
        """A stream the engine ended before its first event (llama-cpp-python's answer to a
        prompt beyond the context): the engine asked again unstreamed (``ask_unstreamed``)
        says why, and the client gets that refusal as it would unstreamed; an engine that
        says nothing wrong failed, which raises (502) so another replica or model may serve."""
        log.warning("engine %s ended stream %s before its first event", replica.id, request_id)
        answer = None
        if replica.url is not None:
            answer = await ask_unstreamed(
                self._http(), replica.url, route, body, request_id, replica.auth_headers()
            )
        if answer is None or answer[0] < 400:
            self._engine_error(entry, replica, 502)
            raise upstream_failed(entry.name, "the engine ended the stream without an answer")
        status, payload = answer
        return error_response(
            self._refusal(entry, replica, route, request_id, status, payload, " asked unstreamed")
        )

    async def _count(
        self,
        replica: Replica,
        outcome: Outcome,
        events: list[bytes],
        request: tuple[str, bytes, str],
    ) -> bytes:
        """Count a stream that carried no usage with its engine (``stream_usage``); the usage
        event for the client, or nothing when the engine could not count."""
        route, body, request_id = request
        if replica.url is None or replica.served_model is not None:
            # An external endpoint has no count route, and asking it again would be a second
            # paid request (its prompt sent out twice): the row says its counts are estimated.
            return b""
        text, head = streamed_text(events)
        count = await count_stream(
            self._http(), replica.url, route, body, text, request_id, replica.auth_headers()
        )
        if count is None:
            return b""
        outcome.counted = outcome.tokenized = True
        outcome.prompt_tokens = count.prompt_tokens
        outcome.completion_tokens = count.completion_tokens
        return usage_event(head, route, count)


async def first_event(resp: Reply) -> bytes | None:
    """What the engine streamed up to its first event (an SSE comment is not one); None when
    it ended the stream without one."""
    got = b""
    async for chunk in resp.iter_chunks():
        got += chunk
        if b"\n\n" in got and any(
            not e.startswith(b":") for e in got.split(b"\n\n")[:-1] if e.strip()
        ):
            return got
    return got if any(not e.startswith(b":") for e in got.split(b"\n\n") if e.strip()) else None


async def _after(head: bytes, resp: Reply) -> AsyncIterator[bytes]:
    if head:
        yield head
    async for chunk in resp.iter_chunks():
        yield chunk


def _broken(replica: Replica, exc: BaseException) -> str:
    """What a client is told of a stream that broke (its kind); the log gets the detail, which
    names the engine's address."""
    log.warning("engine %s: stream failed: %s: %s", replica.id, type(exc).__name__, exc)
    return f"stream broke ({type(exc).__name__})"


def _take_stream_usage(out: bytes, outcome: Outcome, strip: bool) -> bytes:
    """Read the usage of a stream's usage event; drop that event if the client did not ask."""
    kept: list[bytes] = []
    for event in out.split(b"\n\n"):
        if not event:
            continue
        if b'"usage"' in event and event.startswith(b"data: "):
            try:
                data = json.loads(event[6:])
            except ValueError:
                data = None
            if isinstance(data, dict) and isinstance(data.get("usage"), dict):
                outcome.take_usage(data["usage"])
                if strip and not data.get("choices"):
                    continue
        kept.append(event + b"\n\n")
    return b"".join(kept)
