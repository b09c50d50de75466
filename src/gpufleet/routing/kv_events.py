"""Engines' KV-cache events and the block index built from them: what each replica really holds.

vLLM started with ``--kv-events-config`` publishes, on a ZeroMQ PUB socket, multipart messages
``[topic, sequence (8 bytes, big-endian), payload]`` whose payload is a msgpack ``EventBatch``
of tagged events: ``BlockStored`` (full blocks that entered its prefix cache: their hashes, the
hash of the block before them, their token ids, the block size, LoRA and medium), ``BlockRemoved``
(hashes evicted, one event per copy) and ``AllBlocksCleared``. vLLM 0.32 (the CPU build, recorded
in tests/data/vllm_kv_events) sends the batch as an array ``[ts, events, data_parallel_rank]``
and each event as a map tagged ``"type"``; its subscriber example decodes older releases whose
events were arrays with the tag first. ``decode_batch`` reads both, ignores fields it does not
know, and skips (and names) events of unknown types. ``encode_batch`` writes what 0.32 sends:
the emulator publishes exactly that.

The engine's block hashes are opaque (sha256 or a builtin hash, seeded per process), so the
index never recomputes them. It keys blocks by *our* chained hash of the token ids each
``BlockStored`` carries — ``block_keys(tokens, block_size, lora)`` — resolving the event's
``parent_block_hash`` through the replica's own engine-hash → key map. The gateway computes the
same keys from the prompt's token ids (the engine's ``POST /tokenize``), so a prompt's prefix
matches a replica's blocks exactly when the engine would reuse them. Keys are Python's tuple
hash of ``(previous key, *block tokens)``: deterministic across processes (ints and tuples are
not salted), computed in C, and 64 bits wide — a collision only misroutes one request.

vLLM does not deduplicate blocks (two requests that fill the same block at once each cache a
copy, and each copy is removed on its own), so the index counts copies per engine hash and per
key; a key is held while any copy is. Blocks are counted per replica up to
``max_blocks_per_replica`` (default 262,144: 4 M tokens of 16-token blocks, more than a GPU's
KV cache holds for most models); past it the blocks stored longest ago are dropped first. With
a complete stream the engine's own evictions keep the index far below that bound; it matters
only when removals were lost. A replica's index starts empty and is *conservative*: a gap in
the stream (the subscriber's to detect) or ``AllBlocksCleared`` resets it, and a block whose
parent is unknown is not indexed, so after any loss the index holds a subset of the engine's
cache — never a block the engine has dropped. One block size per replica: a ``BlockStored`` of
another size resets the replica (vLLM's hybrid models, with a cache group per layer kind, are
out of scope). Pure: no I/O, no clock.
"""

from __future__ import annotations

import zlib
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack

from gpufleet.errors import GpufleetError

__all__ = [
    "AllBlocksCleared",
    "BlockRemoved",
    "BlockStored",
    "EngineHash",
    "EventBatch",
    "IndexStats",
    "KvBlockIndex",
    "KvEvent",
    "KvEventDecodeError",
    "block_keys",
    "decode_batch",
    "encode_batch",
]

#: A block hash as the engine sends it: an int (``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES``, the
#: low 64 bits of its digest) or the digest's bytes.
EngineHash = int | bytes


@dataclass(frozen=True, slots=True)
class BlockStored:
    """Consecutive full blocks entered the engine's prefix cache."""

    block_hashes: tuple[EngineHash, ...]
    #: The engine hash of the block before the first of these; None: they start a sequence.
    parent_block_hash: EngineHash | None
    #: ``len(block_hashes) × block_size`` token ids, block after block.
    token_ids: tuple[int, ...]
    block_size: int
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    """Blocks left the engine's cache (one entry per copy evicted)."""

    block_hashes: tuple[EngineHash, ...]
    medium: str | None = None


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    """The engine dropped its whole prefix cache (vLLM's ``reset_prefix_cache``)."""


KvEvent = BlockStored | BlockRemoved | AllBlocksCleared


@dataclass(frozen=True, slots=True)
class EventBatch:
    """One published message: the events of one engine step, in order."""

    ts: float
    events: tuple[KvEvent, ...] = ()
    data_parallel_rank: int | None = None
    #: Events not decoded, one description each ("unknown event type 'X'", "malformed
    #: BlockStored: …"): skipped, for the subscriber to count and log.
    skipped: tuple[str, ...] = ()


class KvEventDecodeError(GpufleetError):
    """A payload that is not an event batch at all; ``kind`` names the failure for counting."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind


# -- decoding -------------------------------------------------------------------------------

_TAG = "type"  # msgspec's tag field for a tagged struct encoded as a map
#: Field order of the array-like encoding, after the tag (msgspec: definition order).
_STORED_FIELDS = ("block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id",
                  "medium", "lora_name")  # fmt: skip
_REMOVED_FIELDS = ("block_hashes", "medium")


class _Malformed(Exception):
    """An event that does not decode; the batch skips it."""


def decode_batch(payload: bytes) -> EventBatch:
    """The ``EventBatch`` in a published payload; raises ``KvEventDecodeError`` if it is none.

    Reads the map and the array encodings alike; unknown fields are ignored, unknown or
    malformed events skipped and described in ``EventBatch.skipped``."""
    try:
        raw = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except (ValueError, msgpack.UnpackException) as exc:
        raise KvEventDecodeError("msgpack", f"payload is not msgpack ({exc})") from exc
    if isinstance(raw, Mapping):
        ts, events, rank = raw.get("ts"), raw.get("events"), raw.get("data_parallel_rank")
    elif isinstance(raw, list) and len(raw) >= 2:
        ts, events = raw[0], raw[1]
        rank = raw[2] if len(raw) > 2 else None
    else:
        raise KvEventDecodeError("batch", f"not an event batch: {type(raw).__name__}")
    if not isinstance(ts, int | float) or isinstance(ts, bool) or not isinstance(events, list):
        raise KvEventDecodeError("batch", "an event batch needs a number ts and a list of events")
    decoded: list[KvEvent] = []
    skipped: list[str] = []
    for item in events:
        try:
            event = _event(item)
        except _Malformed as exc:
            skipped.append(str(exc))
            continue
        if isinstance(event, str):
            skipped.append(f"unknown event type {event!r}")
        else:
            decoded.append(event)
    return EventBatch(
        float(ts), tuple(decoded), rank if isinstance(rank, int) else None, tuple(skipped)
    )


def _event(item: Any) -> KvEvent | str:
    """The event ``item`` encodes, or the name of its unknown type."""
    if isinstance(item, Mapping):
        tag = item.get(_TAG)
        fields: Mapping[str, Any] = item
    elif isinstance(item, list) and item:
        tag = item[0]
        names = {"BlockStored": _STORED_FIELDS, "BlockRemoved": _REMOVED_FIELDS}.get(tag, ())
        fields = dict(zip(names, item[1:], strict=False))
    else:
        raise _Malformed(f"malformed event: {type(item).__name__}")
    if tag == "BlockStored":
        hashes = _hashes(fields.get("block_hashes"), tag)
        parent = fields.get("parent_block_hash")
        tokens = fields.get("token_ids")
        size = fields.get("block_size")
        if parent is not None and not isinstance(parent, int | bytes):
            raise _Malformed("malformed BlockStored: parent_block_hash")
        if not isinstance(size, int) or size < 1:
            raise _Malformed("malformed BlockStored: block_size")
        if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
            raise _Malformed("malformed BlockStored: token_ids")
        if len(tokens) != len(hashes) * size:
            raise _Malformed(
                f"malformed BlockStored: {len(tokens)} token ids for {len(hashes)} blocks of {size}"
            )
        lora_id, medium, lora_name = (fields.get(k) for k in ("lora_id", "medium", "lora_name"))
        return BlockStored(
            hashes,
            parent,
            tuple(tokens),
            size,
            lora_id if isinstance(lora_id, int) else None,
            medium if isinstance(medium, str) else None,
            lora_name if isinstance(lora_name, str) else None,
        )
    if tag == "BlockRemoved":
        medium = fields.get("medium")
        return BlockRemoved(
            _hashes(fields.get("block_hashes"), tag), medium if isinstance(medium, str) else None
        )
    if tag == "AllBlocksCleared":
        return AllBlocksCleared()
    return str(tag)


def _hashes(value: Any, tag: str) -> tuple[EngineHash, ...]:
    if not isinstance(value, list) or not all(isinstance(h, int | bytes) for h in value):
        raise _Malformed(f"malformed {tag}: block_hashes")
    return tuple(value)


# -- encoding (the emulator's publisher) ----------------------------------------------------


def encode_batch(batch: EventBatch) -> bytes:
    """``batch`` exactly as vLLM 0.32 was recorded sending it: an array ``[ts, events,
    data_parallel_rank]`` (the rank left out when None), each event a map tagged ``"type"``
    with its fields in vLLM's order. ``BlockStored`` and ``BlockRemoved`` also carry what a
    model with one full-attention cache group sends: ``group_idx`` 0 and, on stores,
    ``extra_keys`` (one None per block) and ``kv_cache_spec_kind`` ``"full_attention"``."""
    events: list[dict[str, Any]] = []
    for e in batch.events:
        if isinstance(e, BlockStored):
            events.append({
                _TAG: "BlockStored", "block_hashes": list(e.block_hashes),
                "parent_block_hash": e.parent_block_hash, "token_ids": list(e.token_ids),
                "block_size": e.block_size, "lora_id": e.lora_id, "medium": e.medium,
                "lora_name": e.lora_name, "extra_keys": [None] * len(e.block_hashes),
                "group_idx": 0, "kv_cache_spec_kind": "full_attention",
            })  # fmt: skip
        elif isinstance(e, BlockRemoved):
            events.append({_TAG: "BlockRemoved", "block_hashes": list(e.block_hashes),
                           "medium": e.medium, "group_idx": 0})  # fmt: skip
        else:
            events.append({_TAG: "AllBlocksCleared"})
    fields: list[Any] = [batch.ts, events]
    if batch.data_parallel_rank is not None:
        fields.append(batch.data_parallel_rank)
    packed: bytes = msgpack.packb(fields)
    return packed


# -- our block keys -------------------------------------------------------------------------


def _seed(lora: str | int | None) -> int:
    """The chain's start: 0 for the base model, else derived from the LoRA adapter's name."""
    if lora is None:
        return 0
    # Only ints in the tuple: a str's hash is salted per process (PYTHONHASHSEED).
    if isinstance(lora, int):  # an event with only vLLM's deprecated lora_id
        return hash((2, lora))
    return hash((1, zlib.crc32(lora.encode())))


def block_keys(token_ids: Sequence[int], block_size: int, lora: str | None = None) -> list[int]:
    """Our chained keys of the whole ``block_size`` blocks of ``token_ids`` (a trailing partial
    block has none, as an engine caches only full blocks). ``lora``: the adapter's name, as the
    engine reports it in ``lora_name``; None for the base model."""
    if block_size < 1:
        raise ValueError(f"block_size must be ≥ 1 (got {block_size})")
    tokens = tuple(token_ids)
    key = _seed(lora)
    out: list[int] = []
    append = out.append
    for start in range(0, len(tokens) - block_size + 1, block_size):
        key = hash((key, *tokens[start : start + block_size]))
        append(key)
    return out


# -- the index ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IndexStats:
    """One replica's index, for metrics and tests."""

    blocks: int  # distinct keys held now
    block_size: int | None
    stored: int  # blocks indexed from BlockStored
    removed: int  # copies removed by BlockRemoved
    orphaned: int  # blocks not indexed: their parent was unknown
    unknown_removed: int  # BlockRemoved of hashes the index did not hold
    dropped: int  # blocks dropped at the memory bound
    resets: int


class _Entry:
    __slots__ = ("copies", "key")

    def __init__(self, key: int) -> None:
        self.key = key
        self.copies = 0


@dataclass(eq=False, slots=True)
class _Replica:
    block_size: int | None = None
    #: Engine hash → our key and its copies, oldest store first (the bound drops from the front).
    entries: OrderedDict[EngineHash, _Entry] = field(default_factory=OrderedDict)
    #: Our key → copies held under any engine hash.
    held: dict[int, int] = field(default_factory=dict)
    stored: int = 0
    removed: int = 0
    orphaned: int = 0
    unknown_removed: int = 0
    dropped: int = 0
    resets: int = 0


class KvBlockIndex:
    """Per replica, the blocks its engine reported cached, keyed by ``block_keys``."""

    def __init__(self, *, max_blocks_per_replica: int = 1 << 18) -> None:
        if max_blocks_per_replica < 1:
            raise ValueError("max_blocks_per_replica must be ≥ 1")
        self.max_blocks = max_blocks_per_replica
        self._replicas: dict[str, _Replica] = {}

    keys = staticmethod(block_keys)

    def replicas(self) -> list[str]:
        return sorted(self._replicas)

    def block_size(self, replica_id: str) -> int | None:
        """The block size the replica's events carry; None until its first ``BlockStored``."""
        replica = self._replicas.get(replica_id)
        return replica.block_size if replica is not None else None

    def matched(self, replica_id: str, keys: Sequence[int]) -> int:
        """How many leading blocks of ``keys`` the replica holds (0 for an unknown replica)."""
        replica = self._replicas.get(replica_id)
        if replica is None:
            return 0
        held = replica.held
        n = 0
        for k in keys:
            if k not in held:
                break
            n += 1
        return n

    def apply(self, replica_id: str, batch: EventBatch | Iterable[KvEvent]) -> None:
        """Apply a batch's events (or any events) of ``replica_id``, in order."""
        replica = self._replicas.get(replica_id)
        if replica is None:
            replica = self._replicas[replica_id] = _Replica()
        for event in batch.events if isinstance(batch, EventBatch) else batch:
            if isinstance(event, BlockStored):
                self._store(replica, event)
            elif isinstance(event, BlockRemoved):
                self._remove(replica, event.block_hashes)
            else:
                self._clear(replica)

    def reset(self, replica_id: str) -> None:
        """Forget what the replica holds but keep it known (``AllBlocksCleared``, a gap in its
        stream, a reconnect): from here on only new events count."""
        replica = self._replicas.setdefault(replica_id, _Replica())
        self._clear(replica)

    def forget(self, replica_id: str) -> None:
        """Drop the replica altogether (it is gone)."""
        self._replicas.pop(replica_id, None)

    def stats(self, replica_id: str) -> IndexStats:
        r = self._replicas.get(replica_id) or _Replica()
        return IndexStats(len(r.held), r.block_size, r.stored, r.removed, r.orphaned,
                          r.unknown_removed, r.dropped, r.resets)  # fmt: skip

    # -- events -----------------------------------------------------------------------------

    def _clear(self, replica: _Replica) -> None:
        replica.entries.clear()
        replica.held.clear()
        replica.resets += 1

    def _store(self, replica: _Replica, event: BlockStored) -> None:
        size = event.block_size
        if replica.block_size != size:
            if replica.block_size is not None:
                self._clear(replica)
            replica.block_size = size
        entries, held = replica.entries, replica.held
        if event.parent_block_hash is None:
            key = _seed(event.lora_name if event.lora_name is not None else event.lora_id)
        else:
            parent = entries.get(event.parent_block_hash)
            if parent is None:
                replica.orphaned += len(event.block_hashes)
                return
            key = parent.key
        tokens = event.token_ids
        for i, engine_hash in enumerate(event.block_hashes):
            entry = entries.get(engine_hash)
            if entry is None:
                key = hash((key, *tokens[i * size : (i + 1) * size]))
                entry = entries[engine_hash] = _Entry(key)
            else:
                key = entry.key
                entries.move_to_end(engine_hash)
            entry.copies += 1
            held[key] = held.get(key, 0) + 1
            replica.stored += 1
        while len(entries) > self.max_blocks:
            _, oldest = entries.popitem(last=False)
            self._release(held, oldest.key, oldest.copies)
            replica.dropped += 1

    def _remove(self, replica: _Replica, hashes: Iterable[EngineHash]) -> None:
        entries, held = replica.entries, replica.held
        for engine_hash in hashes:
            entry = entries.get(engine_hash)
            if entry is None:
                replica.unknown_removed += 1
                continue
            entry.copies -= 1
            if entry.copies == 0:
                del entries[engine_hash]
            self._release(held, entry.key, 1)
            replica.removed += 1

    @staticmethod
    def _release(held: dict[int, int], key: int, copies: int) -> None:
        left = held.get(key, 0) - copies
        if left > 0:
            held[key] = left
        else:
            held.pop(key, None)
