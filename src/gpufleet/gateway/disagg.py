"""Disaggregated serving: a prompt prefilled on one replica, its answer decoded on another.

A model with ``spec.disaggregation`` runs two pools (``controller``): prefill replicas and its
own replicas, which decode. Its engines are vLLM with a KV connector (``kv_both``) or the
emulator standing in for it, and the gateway drives them with vLLM's contract, the one llm-d,
NVIDIA Dynamo and AIBrix use (vLLM's ``toy_proxy_server.py`` and ``NixlConnector``):

1. **Prefill call** to a prefill replica: the client's body with ``max_tokens: 1`` (and
   ``max_completion_tokens: 1`` when given), ``stream: false``, no ``stream_options``, no
   ``min_tokens``/``min_completion_tokens``, and ``kv_transfer_params: {do_remote_decode: true,
   do_remote_prefill: false, remote_engine_id: null, remote_block_ids: null, remote_host: null,
   remote_port: null}``.
2. Its answer carries ``kv_transfer_params`` (``do_remote_prefill: true``, the engine's id, the
   prompt's block ids, its host and port, its TP size).
3. **Decode call** to the decode replica the routing policy chose: the client's own body with
   those ``kv_transfer_params``; the engine pulls the KV cache and decodes without prefilling,
   and its answer (or stream) goes to the client as any answer does.

With a connector that has no handshake (``HANDSHAKE_FREE``: vLLM's debug ExampleConnector,
``shared-storage``) the prefill call asks nothing and the decode call is the client's body: the
decode engine finds the KV cache the prefill wrote by the prompt itself.

A remote prefill is skipped — the decode replica prefills itself — when the prompt's uncached
part is below ``minRemotePrefillTokens`` or under ``MIN_UNCACHED_SHARE`` of the prompt (the
decode replica already holds most of it: Dynamo's defaults are 2,048 tokens and 0.7), when no
prefill replica is ready, and when the prefill call fails, answers without ``kv_transfer_params``
(an engine without a connector) or takes longer than ``PREFILL_TIMEOUT_S``. Each of these
decisions is counted in ``gpufleet_disaggregation_requests{model,path}``.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from gpufleet.spec import ModelSpec

__all__ = [
    "HANDSHAKE_FREE",
    "MIN_UNCACHED_SHARE",
    "PREFILL_TIMEOUT_S",
    "Path",
    "PrefillDemand",
    "decode_body",
    "local_reason",
    "prefill_body",
    "transfer_params",
]

#: A remote prefill only for prompts at least this share uncached on the decode replica
#: (NVIDIA Dynamo's default: below it, the decode replica holds most of the prompt already).
MIN_UNCACHED_SHARE = 0.7
#: A prefill call that has not answered by then is given up: the decode replica prefills.
PREFILL_TIMEOUT_S = 10.0

#: Connectors without vLLM's ``kv_transfer_params`` handshake: vLLM's ExampleConnector
#: (``shared-storage``) writes a prompt's KV cache to files keyed by the prompt's tokens, and
#: the decode replica finds them by the same prompt — the decode call is the client's body.
HANDSHAKE_FREE = frozenset({"shared-storage"})

#: How a request of a disaggregated model was prefilled: remotely, or where it decodes and why.
Path = Literal[
    "remote",
    "local_short",
    "local_cached",
    "local_no_prefill_replica",
    "local_prefill_failed",
]

_ASK = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}


def local_reason(spec: ModelSpec, prompt_tokens: int, cached_tokens: int) -> Path | None:
    """Why a request should be prefilled where it decodes; None: prefill it remotely."""
    pool = spec.disaggregation
    if pool is None:
        raise ValueError("not a disaggregated model")
    uncached = max(0, prompt_tokens - cached_tokens)
    if uncached < max(1, pool.min_remote_prefill_tokens):
        return "local_short"
    if uncached < MIN_UNCACHED_SHARE * prompt_tokens:
        return "local_cached"
    return None


def prefill_body(body: dict[str, Any], *, handshake: bool = True) -> bytes:
    """The prefill call's body: the client's, cut to one unstreamed token, asking for a
    remote decode (without ``handshake``: not asking; see ``HANDSHAKE_FREE``)."""
    ask = {k: v for k, v in body.items() if k not in ("stream_options", "min_tokens")}
    ask.pop("min_completion_tokens", None)
    ask["max_tokens"] = 1
    if "max_completion_tokens" in ask:
        ask["max_completion_tokens"] = 1
    ask["stream"] = False
    if handshake:
        ask["kv_transfer_params"] = dict(_ASK)
    return json.dumps(ask, separators=(",", ":")).encode()


def transfer_params(payload: bytes) -> dict[str, Any] | None:
    """The ``kv_transfer_params`` of a prefill answer, when it offers its KV cache for a
    remote decode; None otherwise (no connector, or not JSON)."""
    try:
        answer = json.loads(payload)
    except ValueError:
        return None
    params = answer.get("kv_transfer_params") if isinstance(answer, dict) else None
    if not isinstance(params, dict) or params.get("do_remote_prefill") is not True:
        return None
    return params


def decode_body(body: dict[str, Any], params: dict[str, Any]) -> bytes:
    """The decode call's body: the client's own, with the prefill's ``kv_transfer_params``."""
    return json.dumps({**body, "kv_transfer_params": params}, separators=(",", ":")).encode()


class PrefillDemand:
    """The prefill pools' demand as the gateway sees it, per model, for the autoscaler.

    A prompt counts once it qualifies for a remote prefill (long enough, not cached where it
    decodes) — whether or not a prefill replica is there to take it, so a pool at zero still
    sees demand and wakes. Calls in flight are the pool's concurrency; the time a prefill call
    took (prompt prefilled and its KV cache ready to move) is the pool's share of TTFT.
    O(1) a request; read (and reset) once a second."""

    __slots__ = ("_arrivals", "_calls", "_seconds")

    #: Prefill times kept per model between two samples (enough for a p90).
    KEEP = 512

    def __init__(self) -> None:
        self._arrivals: dict[str, int] = {}
        self._calls: dict[str, int] = {}
        self._seconds: dict[str, list[float]] = {}

    def wanted(self, model: str) -> None:
        """A prompt of ``model`` qualified for a remote prefill."""
        self._arrivals[model] = self._arrivals.get(model, 0) + 1

    def started(self, model: str) -> None:
        self._calls[model] = self._calls.get(model, 0) + 1

    def ended(self, model: str, seconds: float | None) -> None:
        """A prefill call ended; ``seconds`` it took when it answered (None: it failed)."""
        left = self._calls.get(model, 1) - 1
        if left > 0:
            self._calls[model] = left
        else:
            self._calls.pop(model, None)
        if seconds is not None:
            kept = self._seconds.setdefault(model, [])
            if len(kept) < self.KEEP:
                kept.append(seconds)

    def in_flight(self, model: str) -> int:
        return self._calls.get(model, 0)

    def take(self, model: str) -> tuple[int, list[float]]:
        """Prompts that qualified and prefill times since the last call."""
        return self._arrivals.pop(model, 0), self._seconds.pop(model, [])
