"""Forwarding requests to engine replicas, streams chunk by chunk.

The body is forwarded as the client sent it (no re-serialisation). The model's routing policy
(``gpufleet.routing``, ``spec.routing.policy``) chooses among ready replicas from the gateway's
own counts — requests in flight and prompt tokens still to prefill, the freshest signals there
are — and the engines' scraped metrics. A request that fails before any byte reached the client
(connection refused or reset, engine 502/503, an answer cut short) is retried on another ready
replica; a stream that breaks after its first byte ends with an OpenAI-shaped error event and a
clean close (the stream path is ``streaming``). A replica failing three times in a row sits out
5 s (outlier ejection); the next request routed to it afterwards is its probe.

A replica that refuses a connection has no engine listening: it crashed, and the runtime has
not seen it yet (~2 s for a local engine). So does one whose connection broke with a request
on it (its engine died under the request: ``Broken`` while it computed). It
sits out at once, until the runtime reports it again (a restarted engine is a new ``Replica``
value) or, every second, a probe connects; when every replica of a model sits out or broke,
``forward`` raises ``Unreachable`` and the dispatcher holds the request as it holds one for a
model with none ready — nothing has reached the client, so the crash is a wait, not a 502.
A refused connection is not an engine error for a canary's analysis (the engine never had the
request); a connection that broke under a request is.

A disaggregated model's request is first prefilled on one of its prefill replicas, then sent
to the decode replica chosen with the prefill's ``kv_transfer_params`` (``disagg`` has the
contract and when it is skipped); the prefill replica's time is the request's too.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import json
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol

from starlette.responses import Response

from gpufleet.controller import ModelEntry
from gpufleet.engines import EngineLoad
from gpufleet.gateway.disagg import (
    HANDSHAKE_FREE,
    PREFILL_TIMEOUT_S,
    PrefillDemand,
    decode_body,
    local_reason,
    prefill_body,
    transfer_params,
)
from gpufleet.gateway.engine_errors import engine_error
from gpufleet.gateway.errors import (
    ApiError,
    error_response,
    no_replica,
    unreachable,
    upstream_failed,
)
from gpufleet.gateway.metrics import GatewayMetrics
from gpufleet.gateway.precise_prefix import PrecisePrefix
from gpufleet.gateway.prefix_hints import RedisPrefixHints
from gpufleet.gateway.request import renamed
from gpufleet.gateway.streaming import Streams, first_event
from gpufleet.gateway.upstream_http import (
    Broken,
    ConnectTimeout,
    CutShort,
    Reply,
    Unconnected,
    UpstreamClient,
    UpstreamError,
)
from gpufleet.policies.busy_meter import BusyMeter, MeterTicket
from gpufleet.routing import Choice, Endpoint, RequestFeatures, RoutingPolicy, make_policy
from gpufleet.routing.prefill import PrefillFit
from gpufleet.routing.prefix import BLOCK_TOKENS as PREFIX_BLOCK_TOKENS
from gpufleet.runtime import Replica

__all__ = ["Outcome", "Upstream", "estimated_completion"]

#: How long an idle connection to an engine is kept (under the engines' own 5 s).
IDLE_CONNECTION_S = 4.0

log = logging.getLogger("gpufleet.gateway.proxy")

_RETRYABLE_STATUS = frozenset({502, 503})
EJECT_AFTER = 3
EJECT_FOR_S = 5.0
#: How often a replica that refused a connection gets a probe while the runtime has not
#: reported it again.
REFUSED_PROBE_S = 1.0
_HOP_HEADERS = ("content-type",)
#: How much of an engine's error body the log keeps (a traceback fits).
_LOGGED_BODY = 16 * 1024
_GONE_ERRNOS = frozenset({errno.ECONNREFUSED, errno.ECONNRESET, errno.EPIPE})


def estimated_completion(payload: bytes) -> int:
    """An answer's completion tokens, estimated from its text (characters / 4, rounded up):
    the choices' message content, reasoning and tool calls' arguments (chat), or text."""
    try:
        body = json.loads(payload)
    except ValueError:
        return 0
    choices = body.get("choices") if isinstance(body, dict) else None
    chars = 0
    for choice in choices if isinstance(choices, list) else []:
        if not isinstance(choice, dict):
            continue
        message = choice.get("message") or {}
        parts: list[Any] = [choice.get("text")]
        if isinstance(message, dict):
            parts += [message.get("content"), message.get("reasoning_content")]
            for call in message.get("tool_calls") or []:
                if isinstance(call, dict) and isinstance(call.get("function"), dict):
                    parts += [call["function"].get("name"), call["function"].get("arguments")]
        chars += sum(len(p) for p in parts if isinstance(p, str))
    return -(-chars // 4)


@dataclass(slots=True)
class Outcome:
    """What one forwarded request came to: the ledger row, the quota settlement and metrics."""

    replica: str = ""
    status: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    #: True when the tokens are counted, not estimated: the engine reported usage, or (a stream
    #: without usage) the gateway counted with the engine's tokenizer (``stream_usage``).
    counted: bool = False
    #: True when the gateway, not the engine's usage, counted (see ``stream_usage``).
    tokenized: bool = False
    ttft_s: float | None = None
    #: A stream's mean time between events after the first (None: not a stream, or one event).
    itl_s: float | None = None
    duration_s: float = 0.0
    replica_seconds: float = 0.0
    #: The pool of a disaggregated model the replica is in ("prefill"; "" otherwise).
    pool: str = ""
    #: Replica-seconds a prefill replica spent on the answer's prompt (disaggregated models).
    prefill_seconds: float = 0.0
    #: The answer came from an endpoint outside the company (``location: external``).
    external: bool = False

    def take_usage(self, usage: Any) -> None:
        if not isinstance(usage, dict):
            return
        self.counted = True
        self.prompt_tokens = _int(usage.get("prompt_tokens"))
        self.completion_tokens = _int(usage.get("completion_tokens"))
        details = usage.get("prompt_tokens_details")
        if isinstance(details, dict):
            self.cached_tokens = _int(details.get("cached_tokens"))


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


class Done(Protocol):
    """Told how a forwarded request went: once with its answer, when that is complete (its
    stream ended, or its body was read); before that, once for each replica that had the
    request and gave no answer (it failed, its connection broke, or the caller went away:
    499), with the replica-seconds it held — GPU time the request's row accounts for."""

    def __call__(self, outcome: Outcome) -> None: ...

    def spent(self, attempt: Outcome) -> None: ...


class Upstream:
    def __init__(
        self,
        metrics: GatewayMetrics,
        *,
        connect_timeout_s: float = 5.0,
        max_attempts: int = 3,
        hints: RedisPrefixHints | None = None,
    ) -> None:
        self.hints = hints
        self._metrics = metrics
        self._client: UpstreamClient | None = None
        self._connect_timeout = connect_timeout_s
        self._max_attempts = max_attempts
        self._in_flight: dict[str, int] = {}
        self._backlog: dict[str, int] = {}
        self._prefilling: dict[str, int] = {}
        #: Outlier ejection: consecutive failures per replica, and until when it is left out.
        self._failures: dict[str, int] = {}
        self._ejected_until: dict[str, float] = {}
        #: Replicas that refused a connection: the value that refused, and when a probe may go.
        self._refused: dict[str, tuple[Replica, float]] = {}
        self._policies: dict[tuple[str, str], RoutingPolicy] = {}
        self.meter = BusyMeter()
        #: Told of every engine failure (model, replica id, HTTP status; 502 for a connection
        #: that failed): the canary analysis counts them per generation.
        self.on_engine_error: Callable[[str, str, int], None] | None = None
        #: Draws that split a model's requests between a canary and the stable generation.
        self._draw = random.Random().random
        #: Prefill rate per model, learnt from streamed requests' time to first token.
        self.prefill: dict[str, PrefillFit] = {}
        #: Disaggregated models' prefill demand, for the prefill pools' autoscaling.
        self.prefill_demand = PrefillDemand()
        #: Engine load by replica id, kept fresh by the metrics scraper.
        self.loads: dict[str, EngineLoad] = {}
        #: What precise models' engines hold, from their KV-cache events (the scraper syncs it).
        self.precise = PrecisePrefix(blocks=metrics.prefix_index_blocks)
        #: The stream path (``streaming``), keeping these books.
        self._streams = Streams(
            metrics,
            self._http,
            prefilled=self._prefilled,
            learn_prefill=self._learn_prefill,
            release=self._release,
            engine_error=self._engine_error,
            refusal=self._refusal,
        )

    async def close(self) -> None:
        await self.precise.close()
        if self.hints is not None:
            await self.hints.close()
        if self._client is not None:
            await self._client.close()
            self._client = None

    def _http(self) -> UpstreamClient:
        if self._client is None:
            # Idle connections are dropped before the engines drop them: vLLM, SGLang and
            # llama.cpp's server (uvicorn) close a connection idle for 5 s, and a request sent
            # on one as it closes breaks under the request — which sits a healthy replica out.
            self._client = UpstreamClient(
                connect_timeout_s=self._connect_timeout, keepalive_s=IDLE_CONNECTION_S
            )
        return self._client

    def policy(self, entry: ModelEntry) -> RoutingPolicy:
        key = (entry.name, entry.spec.routing.policy)
        policy = self._policies.get(key)
        if policy is None:
            policy = self._policies[key] = make_policy(entry.spec.routing.policy)
        return policy

    def forget(self, replica_id: str) -> None:
        """A replica is gone: drop what routing learnt about it."""
        self.loads.pop(replica_id, None)
        self._failures.pop(replica_id, None)
        self._ejected_until.pop(replica_id, None)
        self._refused.pop(replica_id, None)
        for policy in self._policies.values():
            policy.forget(replica_id)

    def in_flight(self, replica_id: str) -> int:
        return self._in_flight.get(replica_id, 0)

    def routable(self, entry: ModelEntry) -> bool:
        """A ready replica of ``entry`` may take a request now (none sits out for refusing)."""
        now = time.monotonic()
        return any(self._answers(r, now) for r in entry.endpoints)

    def _answers(self, replica: Replica, now: float) -> bool:
        refused = self._refused.get(replica.id)
        if refused is None:
            return True
        seen, probe_at = refused
        if replica != seen:  # the runtime reported it again: restarted, or moved
            self._refused.pop(replica.id, None)
            self._failures.pop(replica.id, None)
            self._ejected_until.pop(replica.id, None)
            return True
        return probe_at <= now

    def _refuse(self, replica: Replica) -> None:
        self._refused[replica.id] = (replica, time.monotonic() + REFUSED_PROBE_S)

    def pick(
        self,
        entry: ModelEntry,
        features: RequestFeatures,
        exclude: set[str],
        hints: Mapping[str, int] | None = None,
        cached: Mapping[str, int] | None = None,
        *,
        external: bool = True,
    ) -> tuple[Replica, Choice] | None:
        """A replica of ``entry`` for the request, leaving out ``exclude`` and, unless
        ``external`` (the tenant opted in), endpoints outside the company."""
        pool = entry.pool(self._draw()) if entry.canary is not None else entry.endpoints
        now = time.monotonic()
        candidates = {
            r.id: r
            for r in pool
            if r.id not in exclude and self._answers(r, now) and (external or not r.external)
        }
        if not candidates:  # the canary's side has nothing left to try: the other side may
            candidates = {
                r.id: r
                for r in entry.endpoints
                if r.id not in exclude and self._answers(r, now) and (external or not r.external)
            }
        healthy = {
            rid: r for rid, r in candidates.items() if self._ejected_until.get(rid, 0.0) <= now
        }
        candidates = healthy or candidates  # all ejected: trying one beats refusing
        if not candidates:
            return None
        choice = self._choose(self.policy(entry), features, candidates, hints, cached)
        if choice is None:
            return None
        if choice.endpoint in self._refused:  # this request is its probe: one at a time
            self._refuse(candidates[choice.endpoint])
        if self.hints is not None:
            self.hints.record(entry.name, features.blocks, choice.endpoint)
        return candidates[choice.endpoint], choice

    async def forward(
        self,
        entry: ModelEntry,
        route: str,
        body: bytes,
        *,
        stream: bool,
        request_id: str,
        features: RequestFeatures | None = None,
        tenant: str = "",
        external: bool = False,
        weight: float = 1.0,
        strip_usage: bool = False,
        done: Done | None = None,
    ) -> Response:
        """Send the request to a replica (retrying others before the first byte) and answer.

        ``request_id`` is the gateway's own id (a UUID), sent as the engine's ``x-request-id``;
        never the client's, which engines may refuse (see ``ids``). ``done`` receives the
        outcome once the response is complete — at the end of a stream — and, before that,
        what each replica that had the request and gave no answer spent (``Done.spent``).
        When this raises, nothing reached the client and ``done`` got no answer.
        """
        features = features or RequestFeatures()
        #: A disaggregated model's prompt goes to a prefill replica once, after the first
        #: decode replica is chosen (whose cache decides whether it is worth it).
        remote: _Prefilled | None = None
        prefill_asked = entry.spec.disaggregation is None
        shared = None
        cached: Mapping[str, int] | None = None
        if entry.spec.routing.prefix_index == "precise":
            view = await self.precise.lookup(
                entry, route, body, (*entry.endpoints, *entry.prefill_endpoints)
            )
            self._metrics.prefix_lookups.labels(
                entry.name, "approximate" if view is None else "precise"
            ).inc()
            if view is not None:
                features = replace(features, prompt_tokens=view.prompt_tokens)
                cached = view.cached_tokens
        if (
            cached is None
            and self.hints is not None
            and entry.spec.routing.policy
            in (
                "prefix",
                "session",
            )
        ):
            shared = await self.hints.lookup(entry.name, features.blocks)
        started = time.perf_counter()
        tried: set[str] = set()
        last_error = ""
        refusals = 0
        headers = {"content-type": "application/json", "x-request-id": request_id}
        for _ in range(self._max_attempts):
            picked = self.pick(entry, features, tried, shared, cached, external=external)
            if picked is None:
                break
            replica, choice = picked
            tried.add(replica.id)
            prefill = max(0, features.prompt_tokens - choice.cached_blocks * PREFIX_BLOCK_TOKENS)
            if not prefill_asked:
                prefill_asked = True
                held = features.prompt_tokens - prefill
                remote = await self._prefill_remotely(
                    entry, route, body, features, held, request_id, weight, done, cached
                )
            send = body
            if remote is not None:
                send, prefill = remote.body, 0  # the decode replica prefills nothing
            if replica.served_model is not None and replica.served_model != entry.name:
                send = renamed(send, replica.served_model)
            ahead = self._backlog.get(replica.id, 0) + prefill
            self._acquire(replica, entry.name, prefill)
            metered = self.meter.start(replica.id, weight, time.monotonic())
            resp: Reply | None = None
            #: How the attempt ended when it gave no answer (499: the caller went away).
            failure = 502
            handed = False  # the answer (or its stream) releases what the attempt holds
            connected = True  # the engine had the request (unless no connection was made)
            try:
                try:
                    resp = await self._http().request(
                        "POST",
                        replica.url or "",
                        route,
                        send,
                        {**headers, **replica.auth_headers()},
                    )
                except Unconnected as exc:
                    # No connection: the engine never had the request. Not an engine error
                    # (a canary is judged by its answers); a refusal (any failure to connect
                    # but the connect timeout) sits the replica out.
                    connected = False
                    if not isinstance(exc, ConnectTimeout):
                        self._refuse(replica)
                        refusals += 1
                    last_error = _failure("connect", replica, exc)
                    self._metrics.upstream_errors.labels(entry.name, "connect").inc()
                    self._failed(replica.id)
                    continue
                self._refused.pop(replica.id, None)
                if resp.status in _RETRYABLE_STATUS:
                    failure = resp.status
                    self._engine_error(entry, replica, resp.status)
                    last_error = f"engine answered {resp.status}"
                    self._metrics.upstream_errors.labels(entry.name, f"http_{resp.status}").inc()
                    self._failed(replica.id)
                    continue
                outcome = Outcome(replica=replica.id, status=resp.status, external=replica.external)
                if remote is not None:
                    outcome.prefill_seconds = remote.seconds
                if stream and resp.status == 200:
                    # The status is committed with the first event, not before: an engine
                    # that refuses a stream before its first event is answered as unstreamed.
                    head = await first_event(resp)
                    if head is not None:
                        handed = True  # the stream releases when it ends
                        self._failures.pop(replica.id, None)
                        return self._streams.relay(
                            entry,
                            replica,
                            resp,
                            started,
                            prefill,
                            tenant,
                            outcome,
                            strip_usage,
                            functools.partial(self._stop_meter, metered),
                            done,
                            ahead,
                            (route, send, request_id),
                            head,
                        )
                    response = await self._streams.refused(entry, replica, route, send, request_id)
                    outcome.status = response.status_code
                else:
                    payload = await resp.read()
                    self._failures.pop(replica.id, None)
                    response = self._finish(
                        entry, replica, route, request_id, resp, payload, outcome
                    )
                outcome.duration_s = time.perf_counter() - started
                outcome.replica_seconds = self._stop_meter(metered)
                handed = True
                resp.close()
                self._release(replica, entry.name, prefill)
                if done is not None:
                    done(outcome)
                return response
            except (UpstreamError, TimeoutError) as exc:
                # The engine had the request and its connection failed before the client got
                # a byte: another replica may still answer. A connection that broke (the
                # engine died under it) sits the replica out, as a refusal does, so a request
                # with nowhere else to go is held for the engine's restart, not failed.
                self._engine_error(entry, replica, 502)
                if _broke(exc):
                    self._refuse(replica)
                    refusals += 1
                last_error = _failure("read", replica, exc)
                self._metrics.upstream_errors.labels(entry.name, "read").inc()
                self._failed(replica.id)
                continue
            except asyncio.CancelledError:
                failure = 499
                raise
            finally:
                if not handed:
                    if resp is not None:
                        resp.close()
                    spent = self._stop_meter(metered)
                    self._release(replica, entry.name, prefill)
                    if connected and done is not None:
                        done.spent(
                            Outcome(
                                replica=replica.id,
                                status=failure,
                                replica_seconds=spent,
                                external=replica.external,  # the prompt went out
                            )
                        )
        if remote is not None and done is not None:  # prefilled, but no decode replica answered
            done.spent(
                Outcome(
                    replica=remote.replica,
                    status=502,
                    replica_seconds=remote.seconds,
                    pool="prefill",
                )
            )
        if refusals == len(tried) and not entry.problem:
            sat_out = any(r.id in self._refused for r in entry.endpoints)
            if refusals or (sat_out and not self.routable(entry)):
                raise unreachable(entry.name)
        if last_error:
            raise upstream_failed(entry.name, f"{last_error} (tried {len(tried)} replica(s))")
        detail = entry.problem or (
            "replicas are starting" if entry.replicas else "no replica is running"
        )
        raise no_replica(entry.name, detail, retry_after=30 if entry.problem else 2)

    async def _prefill_remotely(
        self,
        entry: ModelEntry,
        route: str,
        body: bytes,
        features: RequestFeatures,
        cached_tokens: int,
        request_id: str,
        weight: float,
        done: Done | None,
        cached: Mapping[str, int] | None = None,
    ) -> _Prefilled | None:
        """Prefill the prompt on a prefill replica: the decode call's body and what the
        prefill held, or None when the decode replica should prefill it itself (``disagg``).
        A prefill call that fails reports its time through ``done.spent``. ``cached``: the
        engines' cached prefixes, when the model routes precisely."""
        path = local_reason(entry.spec, features.prompt_tokens, cached_tokens)
        if path is None:
            self.prefill_demand.wanted(entry.name)
        replica = None if path is not None else self._pick_prefill(entry, features, cached)
        if path is None and replica is None:
            path = "local_no_prefill_replica"
        if path is not None or replica is None:
            self._metrics.disaggregation.labels(
                entry.name, path or "local_no_prefill_replica"
            ).inc()
            return None
        asked = json.loads(body)
        uncached = features.prompt_tokens - cached_tokens
        # A connector without vLLM's handshake finds the prompt's KV cache by the prompt.
        handshake = entry.spec.disaggregation.connector not in HANDSHAKE_FREE  # type: ignore[union-attr]
        headers = {"content-type": "application/json", "x-request-id": request_id}
        self._acquire(replica, entry.name, uncached)
        self.prefill_demand.started(entry.name)
        begun = time.perf_counter()
        metered = self.meter.start(replica.id, weight, time.monotonic())
        params: dict[str, Any] | None = None
        status = 502
        try:
            async with asyncio.timeout(PREFILL_TIMEOUT_S):
                resp = await self._http().request(
                    "POST",
                    replica.url or "",
                    route,
                    prefill_body(asked, handshake=handshake),
                    {**headers, **replica.auth_headers()},
                )
                try:
                    payload = await resp.read()
                finally:
                    resp.close()
            self._refused.pop(replica.id, None)
            if resp.status == 200:
                params = transfer_params(payload) if handshake else {}
                if params is not None:
                    self._failures.pop(replica.id, None)
                    status = 200
                else:
                    log.warning(
                        "prefill replica %s answered without kv_transfer_params", replica.id
                    )
            else:
                log.warning(
                    "prefill replica %s answered %d: %s",
                    replica.id,
                    resp.status,
                    payload[:_LOGGED_BODY].decode("utf-8", "replace"),
                )
                if resp.status >= 500:
                    self._failed(replica.id)
        except (Unconnected, UpstreamError, TimeoutError) as exc:
            if isinstance(exc, Unconnected) and not isinstance(exc, ConnectTimeout):
                self._refuse(replica)
            log.warning("prefill replica %s: %s: %s", replica.id, type(exc).__name__, exc)
            self._failed(replica.id)
        except asyncio.CancelledError:
            status = 499
            raise
        finally:
            seconds = self._stop_meter(metered)
            self._release(replica, entry.name, uncached)
            took = time.perf_counter() - begun
            self.prefill_demand.ended(entry.name, took if status == 200 else None)
            if status != 200 and done is not None:
                done.spent(
                    Outcome(
                        replica=replica.id, status=status, replica_seconds=seconds, pool="prefill"
                    )
                )
        if params is None:
            self._metrics.disaggregation.labels(entry.name, "local_prefill_failed").inc()
            return None
        self._metrics.disaggregation.labels(entry.name, "remote").inc()
        send = decode_body(asked, params) if handshake else body
        return _Prefilled(send, replica.id, seconds)

    def _pick_prefill(
        self,
        entry: ModelEntry,
        features: RequestFeatures,
        cached: Mapping[str, int] | None = None,
    ) -> Replica | None:
        """A prefill replica for the prompt: the prefix policy over the prefill pool (its
        cache, its backlog of prompt tokens), leaving out those sitting out."""
        now = time.monotonic()
        candidates = {
            r.id: r
            for r in entry.prefill_endpoints
            if self._answers(r, now) and self._ejected_until.get(r.id, 0.0) <= now
        }
        if not candidates:
            return None
        key = (entry.name, "#prefill")
        policy = self._policies.get(key)
        if policy is None:
            policy = self._policies[key] = make_policy("prefix")
        choice = self._choose(policy, features, candidates, cached=cached)
        return None if choice is None else candidates[choice.endpoint]

    def _choose(
        self,
        policy: RoutingPolicy,
        features: RequestFeatures,
        candidates: Mapping[str, Replica],
        hints: Mapping[str, int] | None = None,
        cached: Mapping[str, int] | None = None,
    ) -> Choice | None:
        """``policy``'s pick among ``candidates``, each seen through the gateway's own counts
        and its engine's scraped load, recorded with the policy; None when it picks none.
        ``cached``: leading prompt tokens each engine holds (precise routing), where known."""
        idle = EngineLoad()
        states = []
        for rid in candidates:
            load = self.loads.get(rid, idle)
            states.append(
                Endpoint(
                    rid,
                    in_flight=self._in_flight.get(rid, 0),
                    backlog_tokens=self._backlog.get(rid, 0),
                    prefilling=self._prefilling.get(rid, 0),
                    waiting=load.waiting,
                    running=load.running,
                    kv_usage=load.kv_usage or 0.0,  # unpublished: not a full cache
                    hinted_blocks=hints.get(rid, 0) if hints else 0,
                    cached_blocks=(
                        cached[rid] // PREFIX_BLOCK_TOKENS
                        if cached is not None and rid in cached
                        else None
                    ),
                )
            )
        choice = policy.pick(features, states, time.monotonic())
        if choice is None or choice.endpoint not in candidates:
            return None
        policy.record(features, choice)
        return choice

    def _stop_meter(self, ticket: MeterTicket) -> float:
        """The replica-seconds of a request that ends now."""
        return self.meter.stop(ticket, time.monotonic())

    def _engine_error(self, entry: ModelEntry, replica: Replica, status: int) -> None:
        if self.on_engine_error is not None:
            self.on_engine_error(entry.name, replica.id, status)

    def _finish(
        self,
        entry: ModelEntry,
        replica: Replica,
        route: str,
        request_id: str,
        resp: Reply,
        payload: bytes,
        outcome: Outcome,
    ) -> Response:
        """The client's response to a complete engine answer. An engine's error body is
        logged whole for operators and never sent: ``engine_errors`` words what the client
        sees; a failure of the engine itself raises, so the dispatcher may fall back."""
        status = resp.status
        if status >= 400:
            error = self._refusal(entry, replica, route, request_id, status, payload)
            outcome.status = error.status
            return error_response(error)
        if b'"usage"' in payload:
            with contextlib.suppress(ValueError, AttributeError):
                outcome.take_usage(json.loads(payload).get("usage"))
        if not outcome.counted:
            # An answer without usage (some servers gpufleet does not run send none): its
            # completion as characters / 4, as prompts are estimated; the row says estimated.
            outcome.completion_tokens = estimated_completion(payload)
        return Response(payload, status_code=status, media_type=resp.header("content-type"))

    def _refusal(
        self,
        entry: ModelEntry,
        replica: Replica,
        route: str,
        request_id: str,
        status: int,
        payload: bytes,
        asked: str = "",
    ) -> ApiError:
        """An engine's error answer, logged whole for the operator, as the client's error (no
        engine internals); a server-side one (5xx) counts against the replica and raises."""
        log.warning(
            "engine %s answered %d to %s %s%s: %s",
            replica.id,
            status,
            route,
            request_id,
            asked,
            payload[:_LOGGED_BODY].decode("utf-8", "replace"),
        )
        error = engine_error(entry.name, status, payload, route)
        if error.status >= 500:
            self._engine_error(entry, replica, status)
            raise error
        return error

    def _learn_prefill(self, entry: ModelEntry, tokens_ahead: int, ttft_s: float) -> None:
        fit = self.prefill.get(entry.name)
        if fit is None:
            fit = self.prefill[entry.name] = PrefillFit()
        fit.observe(tokens_ahead, ttft_s)
        estimate = fit.estimate()
        calibrate = getattr(self.policy(entry), "calibrate", None)
        if estimate is not None and calibrate is not None:
            calibrate(*estimate)

    def _failed(self, replica_id: str) -> None:
        """Count a failure; after ``EJECT_AFTER`` in a row the replica sits out ``EJECT_FOR_S``,
        then the next request routed there is its probe."""
        count = self._failures.get(replica_id, 0) + 1
        self._failures[replica_id] = count
        if count >= EJECT_AFTER:
            self._ejected_until[replica_id] = time.monotonic() + EJECT_FOR_S
            self._failures[replica_id] = (
                EJECT_AFTER - 1
            )  # one more failure after the probe re-ejects

    def _acquire(self, replica: Replica, model: str, prefill: int) -> None:
        self._in_flight[replica.id] = self._in_flight.get(replica.id, 0) + 1
        self._backlog[replica.id] = self._backlog.get(replica.id, 0) + prefill
        self._prefilling[replica.id] = self._prefilling.get(replica.id, 0) + 1
        self._metrics.in_flight.labels(model).inc()

    def _prefilled(self, replica: Replica, prefill: int) -> None:
        """The request's first token arrived: it no longer waits on prefill."""
        left = self._backlog.get(replica.id, 0) - prefill
        if left > 0:
            self._backlog[replica.id] = left
        else:
            self._backlog.pop(replica.id, None)
        waiting = self._prefilling.get(replica.id, 0) - 1
        if waiting > 0:
            self._prefilling[replica.id] = waiting
        else:
            self._prefilling.pop(replica.id, None)

    def _release(self, replica: Replica, model: str, prefill: int | None) -> None:
        """A request is done; ``prefill`` is what it still counted in the backlog (None: nothing)."""
        if prefill is not None:
            self._prefilled(replica, prefill)
        left = self._in_flight.get(replica.id, 1) - 1
        if left:
            self._in_flight[replica.id] = left
        else:
            self._in_flight.pop(replica.id, None)
        self._metrics.in_flight.labels(model).dec()


@dataclass(frozen=True, slots=True)
class _Prefilled:
    """A prompt prefilled remotely: the decode call's body, the prefill replica, its time."""

    body: bytes
    replica: str
    seconds: float


def _broke(exc: BaseException) -> bool:
    """The engine's connection broke with the request on it, as when its process dies (seen
    on llama.cpp SIGKILLed: closed while it computes an answer, reset (ECONNRESET) as the
    request is sent); or a body was cut before its end (a stream before its first event).
    A connection that failed otherwise (another errno) is a failure, not a broken engine."""
    if isinstance(exc, CutShort):
        return True
    return isinstance(exc, Broken) and (exc.errno is None or exc.errno in _GONE_ERRNOS)


def _failure(stage: str, replica: Replica, exc: BaseException) -> str:
    """What a client is told of a failed connection (its kind); the log gets the detail, which
    names the engine's address."""
    log.warning("engine %s: %s failed: %s: %s", replica.id, stage, type(exc).__name__, exc)
    kind = {"connect": "could not connect", "read": "answer cut short"}
    return f"{kind[stage]} ({type(exc).__name__})"
