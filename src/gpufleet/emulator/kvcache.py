"""The emulator's KV cache: 16-token blocks, chained block hashes, prefix reuse, LRU eviction.

Shaped like vLLM's block manager: a prompt is cut into full 16-token blocks whose hashes chain
(each covers its block and everything before it), so a block can be reused only behind the same
prefix. Blocks of running sequences are pinned; when a sequence ends its prompt blocks stay
cached, unpinned, and are evicted least-recently-used first when space is needed. Usage, as
vLLM reports it, is the pinned share of all blocks. Pure: no clock, no I/O.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["BLOCK_TOKENS", "Allocation", "KVCache", "block_hashes", "tokenize"]

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


class KVCache:
    def __init__(self, capacity_blocks: int) -> None:
        if capacity_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.capacity = capacity_blocks
        self._pins: dict[int, int] = {}  # hash -> running sequences using it
        self._idle: OrderedDict[int, None] = OrderedDict()  # cached, unpinned; oldest first
        self._anonymous = 0

    @property
    def pinned_blocks(self) -> int:
        return len(self._pins) + self._anonymous

    @property
    def usage(self) -> float:
        return self.pinned_blocks / self.capacity

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

        One pass over the hashes, given up as soon as the blocks needed exceed every block not
        pinned: a full engine retries its waiting requests at each change of its batch, and the
        simulator makes that its hot path.
        """
        pins, idle = self._pins, self._idle
        free = self.capacity - len(pins) - len(idle) - self._anonymous
        room = free + len(idle)  # no allocation can get more than this
        needed = extra_blocks
        if needed > room:
            return None
        cached, reuse_idle, prefix = 0, 0, True
        for h in hashes:
            if h in pins:
                cached += prefix
            elif h in idle:
                cached += prefix
                reuse_idle += 1
            else:
                prefix = False
                needed += 1
                if needed > room:
                    return None
        if needed > room - reuse_idle:
            return None
        for h in hashes:
            if h in self._idle:
                del self._idle[h]
            self._pins[h] = self._pins.get(h, 0) + 1
        shortfall = needed - free
        while shortfall > 0:
            self._idle.popitem(last=False)
            shortfall -= 1
        self._anonymous += extra_blocks
        return Allocation(list(hashes), extra_blocks, cached)

    def release(self, allocation: Allocation) -> None:
        for h in allocation.hashes:
            left = self._pins[h] - 1
            if left:
                self._pins[h] = left
            else:
                del self._pins[h]
                self._idle[h] = None  # most recently used goes last
        self._anonymous -= allocation.anonymous
        allocation.hashes = []
        allocation.anonymous = 0
