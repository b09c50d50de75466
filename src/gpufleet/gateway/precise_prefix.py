"""Precise prefix routing: what each replica's engine really holds, from its KV-cache events.

A model with ``routing.prefixIndex: precise`` runs engines that publish KV-cache events (vLLM's
``--kv-events-config``, which the runtimes add with a port per replica). Here one
``KvEventSubscriber`` per ready replica follows its stream into one ``KvBlockIndex``;
``sync`` (called on every pass of the engine scraper) starts and stops them as replicas come
and go, and a replica that leaves, or restarts on new ports, leaves the index.

**Where text meets tokens.** The engine's blocks are blocks of token ids; the gateway sees
text. ``lookup`` asks the engine itself, ``POST /tokenize`` with the request's own chat
options (messages, ``add_generation_prompt``, chat template and its arguments, tools), so the
ids are exactly those the request will put in the cache — no tokenizer or chat template in the
gateway to keep in step with the engine's. It costs a round trip on the request's path: 4.3 ms
median on vLLM's CPU build with SmolLM2 (keep-alive; 12 ms on a new connection), 0.78 ms on
the emulator (docs/benchmarks.md, "KV-cache events"); the connection is kept alive, and the
replica asked is drawn round-robin. A completion whose prompt is already token ids needs no
call. The keys (``block_keys`` at each replica's block size) and the matched prefix of four
replicas cost about 50 µs more.

**Failing open.** Every lookup is bounded (``timeout_s``); a tokenize that fails, a body this
cannot read, or a model whose replicas have no live subscription yields None, and the policy
routes on its approximate index as for any other engine. A replica without a live
subscription is left out of the view, so the policy uses its approximate index for that one
alone. What the index holds is a subset of the engine's cache (``KvBlockIndex``'s guarantee):
precise routing may miss a cached prefix, never count one the engine dropped — which is where
approximate routing goes wrong under cache pressure.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
from prometheus_client import Gauge

from gpufleet.controller import ModelEntry
from gpufleet.engines import KV_EVENTS_TOPIC
from gpufleet.gateway.kv_subscriber import KvEventSubscriber
from gpufleet.routing.kv_events import KvBlockIndex
from gpufleet.runtime import Replica

__all__ = ["CachedView", "PrecisePrefix", "tokenize_body"]

log = logging.getLogger("gpufleet.gateway.precise_prefix")

#: The chat request's fields that change the token ids its prompt becomes (vLLM's
#: ``TokenizeChatRequest`` takes them all).
_CHAT_OPTIONS = (
    "add_generation_prompt",
    "continue_final_message",
    "add_special_tokens",
    "chat_template",
    "chat_template_kwargs",
    "tools",
)


@dataclass(frozen=True, slots=True)
class CachedView:
    """A prompt as the engines see it."""

    #: The prompt's token ids, counted.
    prompt_tokens: int
    #: Leading prompt tokens each replica's engine holds, for the replicas whose events are
    #: followed now (the others are not in it).
    cached_tokens: Mapping[str, int]


def tokenize_body(route: str, served_name: str, body: Mapping[str, Any]) -> dict[str, Any] | None:
    """The ``POST /tokenize`` body that yields the token ids the request's prompt becomes, or
    None when the request has no prompt to tokenize that way."""
    if route.endswith("/chat/completions"):
        messages = body.get("messages")
        if not isinstance(messages, list):
            return None
        asked: dict[str, Any] = {"model": served_name, "messages": messages}
        for option in _CHAT_OPTIONS:
            if option in body:
                asked[option] = body[option]
        return asked
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return {"model": served_name, "prompt": prompt}
    return None


def _prompt_ids(route: str, body: Mapping[str, Any]) -> list[int] | None:
    """A completion's prompt given as token ids (no call needed)."""
    if route.endswith("/chat/completions"):
        return None
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
        return prompt
    return None


class PrecisePrefix:
    """The gateway's block index of every ``prefixIndex: precise`` replica, and the lookups."""

    def __init__(
        self,
        *,
        timeout_s: float = 0.25,
        topic: str = KV_EVENTS_TOPIC,
        blocks: Gauge | None = None,
    ) -> None:
        self.index = KvBlockIndex()
        #: Blocks indexed per (model, replica), set on every ``sync``.
        self.blocks = blocks
        self.timeout_s = timeout_s
        self.topic = topic
        #: By replica id: the endpoints followed, the model, and the subscription.
        self._subs: dict[str, tuple[tuple[str, str | None], str, KvEventSubscriber]] = {}
        self._http: aiohttp.ClientSession | None = None
        self._turn = itertools.count()
        self._warned: set[str] = set()

    def subscriber(self, replica_id: str) -> KvEventSubscriber | None:
        held = self._subs.get(replica_id)
        return held[2] if held is not None else None

    async def sync(self, entries: Iterable[ModelEntry]) -> None:
        """Follow the events of every ready replica of a precise model, and no others."""
        wanted: dict[str, tuple[tuple[str, str | None], str]] = {}
        for entry in entries:
            if entry.spec.routing.prefix_index != "precise":
                continue
            for r in entry.replicas:
                if r.routable and r.kv_events is not None:
                    wanted[r.id] = ((r.kv_events, r.kv_replay), r.model)
        gone = [rid for rid, (where, model, _) in self._subs.items()
                if wanted.get(rid) != (where, model)]  # fmt: skip
        for rid in gone:
            _, model, sub = self._subs.pop(rid)
            await sub.close()
            self.index.forget(rid)
            if self.blocks is not None:
                with contextlib.suppress(KeyError):
                    self.blocks.remove(model, rid)
        for rid, (where, model) in wanted.items():
            if rid not in self._subs:
                sub = KvEventSubscriber(
                    self.index, rid, where[0], self.topic, replay_endpoint=where[1]
                )
                await sub.start()
                self._subs[rid] = (where, model, sub)
            if self.blocks is not None:
                self.blocks.labels(model, rid).set(self.index.stats(rid).blocks)

    async def close(self) -> None:
        for _, _, sub in self._subs.values():
            await sub.close()
        self._subs.clear()
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def lookup(
        self, entry: ModelEntry, route: str, body: bytes, replicas: Sequence[Replica]
    ) -> CachedView | None:
        """The prompt's token count and each followed replica's cached prefix of it (None:
        route approximately). ``replicas``: those the request may go to."""
        followed = [
            r for r in replicas if (s := self.subscriber(r.id)) is not None and s.subscribed()
        ]
        if not followed:
            return None
        try:
            data = json.loads(body)
        except ValueError:
            return None
        if not isinstance(data, dict):
            return None
        tokens = _prompt_ids(route, data)
        if tokens is None:
            asked = tokenize_body(route, entry.name, data)
            if asked is None:
                return None
            tokens = await self._tokenize(followed[next(self._turn) % len(followed)], asked)
            if tokens is None:
                return None
        keys_by_size: dict[int, list[int]] = {}
        cached: dict[str, int] = {}
        for r in followed:
            size = self.index.block_size(r.id)
            if size is None:  # nothing stored since it was followed: it holds nothing we know
                cached[r.id] = 0
                continue
            keys = keys_by_size.get(size)
            if keys is None:
                keys = keys_by_size[size] = self.index.keys(tokens, size)
            cached[r.id] = self.index.matched(r.id, keys) * size
        return CachedView(len(tokens), cached)

    async def _tokenize(self, replica: Replica, asked: Mapping[str, Any]) -> list[int] | None:
        if self._http is None:
            self._http = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout_s),
                connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=None),
            )
        try:
            async with self._http.post(
                f"{replica.url}/tokenize", json=asked, headers=replica.auth_headers()
            ) as resp:
                if resp.status != 200:
                    self._warn(replica, f"answered {resp.status}: {(await resp.text())[:200]}")
                    return None
                answer = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            self._warn(replica, f"{type(exc).__name__}: {exc}")
            return None
        except asyncio.CancelledError:
            raise
        tokens = answer.get("tokens") if isinstance(answer, dict) else None
        if not isinstance(tokens, list) or not all(type(t) is int for t in tokens):
            self._warn(replica, "answered without a list of token ids")
            return None
        if replica.model in self._warned:
            self._warned.discard(replica.model)
            log.info("tokenizing prompts of %s works again: routing precisely", replica.model)
        return tokens

    def _warn(self, replica: Replica, what: str) -> None:
        """Once per model: its requests route approximately while tokenizing fails."""
        if replica.model not in self._warned:
            self._warned.add(replica.model)
            log.warning(
                "tokenizing a prompt on %s failed (%s): routing approximately while it fails",
                replica.id,
                what,
            )
        else:
            log.debug("tokenizing on %s failed: %s", replica.id, what)
