"""KV-cache events: decoding real vLLM's recorded stream, and the block index built from it.

tests/data/vllm_kv_events/stream.json is vLLM 0.32 (CPU build) publishing while it served five
chat requests (README.md there): the index, fed that stream and keyed from ``/tokenize``'s token
ids for the same messages, must predict exactly the prefix vLLM then reused (its usage's
``cached_tokens``) — the claim precise prefix routing rests on.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import msgpack
import pytest

from gpufleet.routing.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventBatch,
    KvBlockIndex,
    KvEventDecodeError,
    block_keys,
    decode_batch,
    encode_batch,
)

RECORDING = Path(__file__).parents[1] / "data" / "vllm_kv_events" / "stream.json"
STREAM: dict[str, Any] = json.loads(RECORDING.read_text())
FRAMES: list[list[bytes]] = [[base64.b64decode(f) for f in frames] for frames in STREAM["frames"]]
REQUESTS: list[dict[str, Any]] = STREAM["requests"]
BLOCK = 128  # vLLM's block size on CPU


def tokens(name: str) -> list[int]:
    (request,) = [r for r in REQUESTS if r["name"] == name]
    ids: list[int] = request["tokenize"]["tokens"]
    return ids


def replay(index: KvBlockIndex, replica: str, frames: list[list[bytes]]) -> None:
    for _topic, _seq, payload in frames:
        index.apply(replica, decode_batch(payload))


# -- the recording ------------------------------------------------------------------------


def test_the_recorded_wire_format() -> None:
    assert STREAM["version"] == "0.32.0"
    assert [f[0] for f in FRAMES] == [b"kv-events"] * len(FRAMES)
    assert [int.from_bytes(f[1], "big") for f in FRAMES] == list(range(len(FRAMES)))
    assert all(len(f[1]) == 8 for f in FRAMES)
    raw = msgpack.unpackb(FRAMES[0][2])
    assert isinstance(raw, list) and len(raw) == 3 and raw[2] == 0  # [ts, events, dp rank]
    (stored,) = raw[1]
    assert stored["type"] == "BlockStored"
    assert set(stored) == {"type", "block_hashes", "parent_block_hash", "token_ids",
                           "block_size", "lora_id", "medium", "lora_name", "extra_keys",
                           "group_idx", "kv_cache_spec_kind"}  # fmt: skip
    sources = STREAM["kv_event_sources"]
    assert list(sources) == ["0"] and sources["0"]["topic"] == "kv-events"
    assert sources["0"]["endpoint"].startswith("tcp://*:")


def test_every_recorded_batch_decodes_into_typed_events() -> None:
    batches = [decode_batch(f[2]) for f in FRAMES]
    assert all(b.skipped == () and b.data_parallel_rank == 0 for b in batches)
    kinds = [[type(e).__name__ for e in b.events] for b in batches]
    assert kinds == [
        ["BlockStored"],
        ["BlockStored"],
        ["BlockStored"],
        ["BlockRemoved"] * 5 + ["BlockStored"],
        ["BlockRemoved", "BlockStored"],
        ["AllBlocksCleared"],
    ]
    first = batches[0].events[0]
    assert isinstance(first, BlockStored)
    assert first.block_size == BLOCK and first.medium == "GPU" and first.parent_block_hash is None
    assert len(first.token_ids) == len(first.block_hashes) * BLOCK
    assert list(first.token_ids) == tokens("shared-1")[: 3 * BLOCK]
    # The second request's blocks hang off the first's third block.
    second = batches[1].events[0]
    assert isinstance(second, BlockStored)
    assert second.parent_block_hash == first.block_hashes[2]


def test_our_encoding_is_vllms_byte_for_byte() -> None:
    """What the emulator publishes: each recorded payload, decoded and encoded again, is the
    same bytes."""
    for _topic, _seq, payload in FRAMES:
        assert encode_batch(decode_batch(payload)) == payload


def test_the_index_predicts_what_vllm_reused() -> None:
    """Before each request, the index (fed the stream so far) and keys from ``/tokenize`` for
    the request's messages give vLLM's own ``cached_tokens`` for it; after it, the prompt's
    every full block."""
    index = KvBlockIndex()
    seen = 0
    predicted, reused = [], []
    for request in REQUESTS:
        keys = index.keys(request["tokenize"]["tokens"], BLOCK)
        predicted.append(index.matched("vllm", keys) * BLOCK)
        reused.append(request["usage"]["prompt_tokens_details"]["cached_tokens"])
        replay(index, "vllm", FRAMES[seen : request["after_frame"]])
        seen = request["after_frame"]
        assert index.matched("vllm", keys) == len(keys), request["name"]
    assert predicted == reused == [0, 384, 0, 0, 256]  # the last found 2 of its 3 blocks left
    replay(index, "vllm", FRAMES[seen:])
    assert index.stats("vllm").blocks == 0  # AllBlocksCleared


def test_the_index_says_which_replica_holds_a_prefix() -> None:
    """Replica a saw the two shared-prefix requests, replica b the first long one."""
    index = KvBlockIndex()
    replay(index, "a", FRAMES[0:2])
    replay(index, "b", FRAMES[2:3])
    shared, long_a = index.keys(tokens("shared-2"), BLOCK), index.keys(tokens("long-a"), BLOCK)
    assert (index.matched("a", shared), index.matched("b", shared)) == (7, 0)
    assert (index.matched("a", long_a), index.matched("b", long_a)) == (0, 9)
    first = index.keys(tokens("shared-1"), BLOCK)
    assert index.matched("a", first) == 3 and index.block_size("a") == BLOCK


def test_evictions_move_the_index() -> None:
    index = KvBlockIndex()
    replay(index, "vllm", FRAMES[:4])  # long-b's arrival evicted shared-2's tail
    assert index.matched("vllm", index.keys(tokens("shared-2"), BLOCK)) == 2
    assert index.stats("vllm").removed == 5


# -- decoding what else engines send --------------------------------------------------------


def test_array_like_events_of_older_vllm_decode() -> None:
    payload = msgpack.packb([
        1.5,
        [["BlockStored", [11, 12], None, list(range(32)), 16, None, "GPU"],
         ["BlockRemoved", [11], "GPU"], ["AllBlocksCleared"]],
    ])  # fmt: skip
    batch = decode_batch(payload)
    assert batch.ts == 1.5 and batch.data_parallel_rank is None
    assert batch.events == (
        BlockStored((11, 12), None, tuple(range(32)), 16, None, "GPU"),
        BlockRemoved((11,), "GPU"),
        AllBlocksCleared(),
    )


def test_a_map_batch_with_extra_fields_and_unknown_events_decodes() -> None:
    payload = msgpack.packb({
        "ts": 2, "data_parallel_rank": 1, "future": True,
        "events": [
            {"type": "BlockStored", "block_hashes": [b"\x01" * 32], "parent_block_hash": None,
             "token_ids": [1, 2], "block_size": 2, "lora_id": None, "medium": None,
             "lora_name": "sql", "locality": "local", "session_id": "s"},
            {"type": "BlockMoved", "block_hashes": [1]},
            {"type": "BlockRemoved", "block_hashes": "not a list"},
        ],
    })  # fmt: skip
    batch = decode_batch(payload)
    assert batch.data_parallel_rank == 1
    assert batch.events == (BlockStored((b"\x01" * 32,), None, (1, 2), 2, None, None, "sql"),)
    assert batch.skipped == (
        "unknown event type 'BlockMoved'",
        "malformed BlockRemoved: block_hashes",
    )


@pytest.mark.parametrize(
    ("payload", "kind"),
    [
        (b"\xc1", "msgpack"),
        (msgpack.packb("events"), "batch"),
        (msgpack.packb([1.0]), "batch"),
        (msgpack.packb(["now", []]), "batch"),
    ],
)
def test_what_is_no_batch_raises_with_its_kind(payload: bytes, kind: str) -> None:
    with pytest.raises(KvEventDecodeError) as caught:
        decode_batch(payload)
    assert caught.value.kind == kind


def test_a_stored_event_whose_tokens_do_not_fill_its_blocks_is_skipped() -> None:
    payload = msgpack.packb([0.0, [{"type": "BlockStored", "block_hashes": [1, 2],
        "parent_block_hash": None, "token_ids": [1, 2, 3], "block_size": 2}]])  # fmt: skip
    batch = decode_batch(payload)
    assert batch.events == () and "3 token ids for 2 blocks of 2" in batch.skipped[0]


# -- the index ------------------------------------------------------------------------------


def stored(hashes: list[int], parent: int | None, toks: list[int], size: int = 4,
           lora: str | None = None) -> BlockStored:  # fmt: skip
    return BlockStored(tuple(hashes), parent, tuple(toks), size, None, "GPU", lora)


def test_keys_chain_whole_blocks_and_ignore_a_partial_tail() -> None:
    a = block_keys(range(10), 4)
    assert len(a) == 2
    assert block_keys(range(8), 4) == a
    assert block_keys([0, 1, 2, 3, 9, 9, 9, 9], 4)[0] == a[0]
    assert block_keys([9, 1, 2, 3, 4, 5, 6, 7], 4)[1] != a[1]  # a block's key covers its prefix
    assert block_keys(range(8), 4, lora="sql") != a
    with pytest.raises(ValueError, match="block_size"):
        block_keys([1], 0)


def test_stores_resolve_parents_through_the_replica_map() -> None:
    index = KvBlockIndex()
    toks = list(range(12))
    index.apply("r", [stored([901], None, toks[:4])])
    index.apply("r", [stored([902, 903], 901, toks[4:12])])
    assert index.matched("r", block_keys(toks, 4)) == 3
    # Another replica whose engine hashed the same tokens differently holds the same keys.
    index.apply("s", [stored([5, 6, 7], None, toks)])
    assert index.matched("s", block_keys(toks, 4)) == 3
    assert index.matched("nobody", block_keys(toks, 4)) == 0


def test_a_block_with_an_unknown_parent_is_not_indexed() -> None:
    index = KvBlockIndex()
    index.apply("r", [stored([2], 1, list(range(4, 8)))])
    assert index.stats("r").orphaned == 1 and index.stats("r").blocks == 0


def test_copies_of_a_block_are_held_until_the_last_goes() -> None:
    index = KvBlockIndex()
    toks = list(range(4))
    keys = block_keys(toks, 4)
    index.apply("r", [stored([7], None, toks), stored([7], None, toks)])
    index.apply("r", [BlockRemoved((7,))])
    assert index.matched("r", keys) == 1
    index.apply("r", [BlockRemoved((7,))])
    assert index.matched("r", keys) == 0
    index.apply("r", [BlockRemoved((7,))])
    assert index.stats("r").unknown_removed == 1


def test_lora_blocks_match_only_that_adapters_keys() -> None:
    index = KvBlockIndex()
    toks = list(range(8))
    index.apply("r", [stored([1, 2], None, toks, lora="sql")])
    assert index.matched("r", block_keys(toks, 4)) == 0
    assert index.matched("r", block_keys(toks, 4, lora="sql")) == 2


def test_clear_reset_and_forget() -> None:
    index = KvBlockIndex()
    toks = list(range(8))
    index.apply("r", [stored([1, 2], None, toks)])
    index.apply("r", EventBatch(0.0, (AllBlocksCleared(),)))
    assert index.matched("r", block_keys(toks, 4)) == 0
    index.apply("r", [stored([1, 2], None, toks)])
    index.reset("r")
    assert index.stats("r").blocks == 0 and index.block_size("r") == 4
    index.forget("r")
    assert index.replicas() == [] and index.block_size("r") is None


def test_another_block_size_starts_the_replica_again() -> None:
    index = KvBlockIndex()
    index.apply("r", [stored([1], None, list(range(4)))])
    index.apply("r", [stored([9], None, list(range(8)), size=8)])
    assert index.block_size("r") == 8 and index.stats("r").blocks == 1
    assert index.matched("r", block_keys(range(4), 4)) == 0


def test_the_memory_bound_drops_the_oldest_stores() -> None:
    index = KvBlockIndex(max_blocks_per_replica=3)
    for i in range(5):
        index.apply("r", [stored([100 + i], None, [i] * 4)])
    stats = index.stats("r")
    assert (stats.blocks, stats.dropped) == (3, 2)
    assert [index.matched("r", block_keys([i] * 4, 4)) for i in range(5)] == [0, 0, 1, 1, 1]
