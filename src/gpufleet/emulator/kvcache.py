"""The emulator's KV cache: 16-token blocks, chained block hashes, prefix reuse, LRU eviction.

Shaped like vLLM's block manager: a prompt is cut into full 16-token blocks whose hashes chain
(each covers its block and everything before it), so a block can be reused only behind the same
prefix. Blocks of running sequences are pinned; when a sequence ends its prompt blocks stay
cached, unpinned, and are evicted least-recently-used first when space is needed. Usage, as
vLLM reports it, is the pinned share of all blocks. Pure: no clock, no I/O.

KV events (vLLM's ``--kv-events-config``): a cache with a ``listener`` tells it, after each
allocation that changed what is cached, which blocks it evicted and which it stored, and when
``reset`` dropped every cached block. ``BlockEventLog`` is that listener for the emulator's
publisher: it turns those changes into vLLM's events — ``BlockRemoved`` first, then
``BlockStored`` per run of consecutive new blocks, as vLLM evicts while it allocates and reports
the blocks it filled afterwards — with the token ids each block holds, which the cache itself
never sees: the server ``describe``s a prompt (its blocks, each with its parent and tokens)
before submitting it. Descriptions are kept for the ``max_described`` blocks described most
recently (default 65,536 — a million tokens of prompts waiting at once); a block stored without
one is counted in ``undescribed`` and published as nothing, which leaves a subscriber's index
short of a block, never wrong.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from gpufleet.routing.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KvEvent
from gpufleet.sizing.memory import engine_overhead_bytes
from gpufleet.sizing.performance import PerfModel

__all__ = [
    "BLOCK_TOKENS",
    "Allocation",
    "BlockEventLog",
    "CacheListener",
    "KVCache",
    "block_hashes",
    "kv_capacity_tokens",
    "tokenize",
]

BLOCK_TOKENS = 16
_PIECE = re.compile(r"\s*\S{1,4}|\s+")


def tokenize(text: str) -> list[int]:
    """A deterministic stand-in tokenizer: about one token per four characters, like BPE on English."""
    return [zlib.crc32(piece.encode()) for piece in _PIECE.findall(text)]


def block_hashes(tokens: Sequence[int]) -> list[int]:
    hashes: list[int] = []
    previous = b""
    for start in range(0, len(tokens) - len(tokens) % BLOCK_TOKENS, BLOCK_TOKENS):
        block = ",".join(map(str, tokens[start : start + BLOCK_TOKENS])).encode()
        digest = hashlib.blake2b(previous + block, digest_size=8).digest()
        hashes.append(int.from_bytes(digest, "big"))
        previous = digest
    return hashes


@dataclass(eq=False, slots=True)
class Allocation:
    hashes: list[int]  # prompt blocks, pinned
    anonymous: int  # blocks for the rest of the prompt and the output
    cached_blocks: int  # leading prompt blocks that were already in the cache


class CacheListener(Protocol):
    def blocks_changed(self, stored: Sequence[int], removed: Sequence[int]) -> None:
        """One allocation evicted ``removed`` and then cached ``stored`` (prompt order)."""

    def cleared(self) -> None:
        """Every cached block was dropped."""


class KVCache:
    def __init__(self, capacity_blocks: int) -> None:
        if capacity_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.capacity = capacity_blocks
        self._pins: dict[int, int] = {}  # hash -> running sequences using it
        self._idle: OrderedDict[int, None] = OrderedDict()  # cached, unpinned; oldest first
        self._anonymous = 0
        #: Told what each allocation stored and evicted (KV events); None: nobody asks.
        self.listener: CacheListener | None = None

    @property
    def pinned_blocks(self) -> int:
        return len(self._pins) + self._anonymous

    @property
    def usage(self) -> float:
        return (len(self._pins) + self._anonymous) / self.capacity

    @property
    def cached_idle_blocks(self) -> int:
        return len(self._idle)

    def cached_prefix(self, hashes: Sequence[int]) -> int:
        """How many leading blocks of ``hashes`` are in the cache now."""
        n = 0
        for h in hashes:
            if h not in self._pins and h not in self._idle:
                break
            n += 1
        return n

    def allocate(self, hashes: Sequence[int], extra_blocks: int) -> Allocation | None:
        """Pin a prompt's blocks (reusing its cached prefix) plus ``extra_blocks``; None if full.

        A full engine retries its waiting requests at each change of its batch, and the simulator
        makes this its hot path: the blocks past the cached prefix are counted and pinned in C
        when none of them is cached (the usual case), one by one only when some are.
        """
        pins, idle = self._pins, self._idle
        free = self.capacity - len(pins) - len(idle) - self._anonymous
        room = free + len(idle)  # no allocation can get more than this
        needed = extra_blocks
        if needed > room:
            return None
        cached = reuse_idle = 0
        for h in hashes:
            if h in pins:
                cached += 1
            elif h in idle:
                cached += 1
                reuse_idle += 1
            else:
                break
        rest = hashes[cached:]
        listener = self.listener
        new: list[int] | None = None  # blocks this allocation caches, for the listener
        fresh: dict[int, int] | None = None  # ``rest``, when every block of it is new
        if pins.keys().isdisjoint(rest) and idle.keys().isdisjoint(rest):
            # Past a shared prefix a prompt's blocks are mostly its own, new to the cache:
            # checked (and pinned below) in C rather than block by block.
            needed += len(rest)
            fresh = dict.fromkeys(rest, 1)
            if len(fresh) != len(rest):
                fresh = None  # a block repeats: pinned one by one
            if listener is not None:
                new = list(rest)
        else:
            new = [] if listener is not None else None
            for h in rest:
                if h in pins:
                    continue
                if h in idle:
                    reuse_idle += 1
                else:
                    needed += 1
                    if new is not None:
                        new.append(h)
        if needed > room - reuse_idle:
            return None
        get, drop = pins.get, idle.pop
        for h in hashes if fresh is None else hashes[:cached]:
            drop(h, None)
            pins[h] = get(h, 0) + 1
        if fresh is not None:
            pins.update(fresh)
        evict = idle.popitem
        if listener is None:
            for _ in range(needed - free):
                evict(last=False)
        else:
            removed = [evict(last=False)[0] for _ in range(needed - free)]
            if new or removed:
                listener.blocks_changed(new or (), removed)
        self._anonymous += extra_blocks
        return Allocation(list(hashes), extra_blocks, cached)

    def release(self, allocation: Allocation) -> None:
        pins, idle = self._pins, self._idle
        for h in allocation.hashes:
            left = pins[h] - 1
            if left:
                pins[h] = left
            else:
                del pins[h]
                idle[h] = None  # most recently used goes last
        self._anonymous -= allocation.anonymous
        allocation.hashes = []
        allocation.anonymous = 0

    def reset(self) -> bool:
        """Drop every cached block, as vLLM's ``reset_prefix_cache`` does; like it, refuse (False)
        while any block is pinned by a running sequence."""
        if self._pins or self._anonymous:
            return False
        self._idle.clear()
        if self.listener is not None:
            self.listener.cleared()
        return True


class BlockEventLog:
    """A ``CacheListener`` that keeps the cache's changes as vLLM's KV events until drained."""

    def __init__(self, *, max_described: int = 1 << 16) -> None:
        if max_described < 1:
            raise ValueError("max_described must be ≥ 1")
        self.max_described = max_described
        #: Block hash → (the hash of the block before it, its tokens); most recent last.
        self._described: OrderedDict[int, tuple[int | None, tuple[int, ...]]] = OrderedDict()
        self._events: list[KvEvent] = []
        self.undescribed = 0
        #: Called once events are pending after none were (the publisher wakes on it).
        self.on_pending: Callable[[], None] | None = None

    def describe(self, tokens: Sequence[int]) -> list[int]:
        """Remember the full blocks of ``tokens`` (a prompt about to be submitted): their hashes,
        parents and token ids, which events of their storing will carry. Returns the hashes."""
        hashes = block_hashes(tokens)
        described = self._described
        parent: int | None = None
        for i, h in enumerate(hashes):
            described[h] = (parent, tuple(tokens[i * BLOCK_TOKENS : (i + 1) * BLOCK_TOKENS]))
            described.move_to_end(h)
            parent = h
        while len(described) > self.max_described:
            described.popitem(last=False)
        return hashes

    def blocks_changed(self, stored: Sequence[int], removed: Sequence[int]) -> None:
        events = self._events
        before = len(events)
        if removed:
            events.append(BlockRemoved(tuple(removed), "GPU"))
        run: list[int] = []
        run_parent: int | None = None
        tokens: list[int] = []
        for h in stored:
            entry = self._described.get(h)
            if entry is None:
                self.undescribed += 1
                continue
            parent, block = entry
            if run and parent != run[-1]:
                events.append(self._stored(run, run_parent, tokens))
                run, tokens = [], []
            if not run:
                run_parent = parent
            run.append(h)
            tokens.extend(block)
        if run:
            events.append(self._stored(run, run_parent, tokens))
        if before == 0 and events and self.on_pending is not None:
            self.on_pending()

    def cleared(self) -> None:
        self._events.append(AllBlocksCleared())
        if len(self._events) == 1 and self.on_pending is not None:
            self.on_pending()

    def drain(self) -> list[KvEvent]:
        """The events since the last drain, oldest first."""
        events, self._events = self._events, []
        return events

    @staticmethod
    def _stored(run: list[int], parent: int | None, tokens: list[int]) -> BlockStored:
        return BlockStored(tuple(run), parent, tuple(tokens), BLOCK_TOKENS, None, "GPU", None)


def kv_capacity_tokens(perf: PerfModel, budget_bytes: int, engine: str) -> int:
    """KV cache tokens a replica of ``engine`` keeps in ``budget_bytes`` of each of its GPUs.

    The emulator stands in for vLLM, so its engine model keeps vLLM's overhead back — the
    emulator server and the simulator alike — although the planner counts an emulated replica
    as holding no GPU memory of its own (it holds none)."""
    modelled = "vllm" if engine == "emulator" else engine
    return perf.kv_capacity_tokens(budget_bytes, engine_overhead_bytes(modelled, perf.tp))
