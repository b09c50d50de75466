"""The emulator's KV cache: prefix reuse across requests, pinning, LRU eviction."""

from __future__ import annotations

from gpufleet.emulator.kvcache import BLOCK_TOKENS, KVCache, block_hashes, tokenize


def test_hashes_chain_so_only_a_shared_prefix_matches() -> None:
    a = block_hashes(list(range(64)))
    b = block_hashes([*range(32), 999, *range(33, 64)])
    assert len(a) == 4
    assert a[:2] == b[:2] and a[2] != b[2] and a[3] != b[3]
    assert block_hashes(list(range(BLOCK_TOKENS - 1))) == []  # partial blocks are never cached


def test_tokenizer_is_deterministic_and_about_four_characters_a_token() -> None:
    text = "The quick brown fox jumps over the lazy dog. " * 20
    tokens = tokenize(text)
    assert tokens == tokenize(text)
    assert 0.15 < len(tokens) / len(text) < 0.35


def test_second_request_reuses_the_cached_prefix() -> None:
    cache = KVCache(100)
    hashes = block_hashes(list(range(160)))  # 10 blocks
    first = cache.allocate(hashes, extra_blocks=2)
    assert first is not None and first.cached_blocks == 0
    cache.release(first)
    assert cache.usage == 0 and cache.cached_idle_blocks == 10
    second = cache.allocate(hashes[:6] + block_hashes([*range(96), *range(500, 564)])[6:], 1)
    assert second is not None and second.cached_blocks == 6


def test_usage_counts_pinned_blocks_and_shared_blocks_once() -> None:
    cache = KVCache(20)
    hashes = block_hashes(list(range(80)))  # 5 blocks
    a = cache.allocate(hashes, 1)
    b = cache.allocate(hashes, 1)
    assert a is not None and b is not None and b.cached_blocks == 5
    assert cache.pinned_blocks == 5 + 2
    assert cache.usage == 7 / 20
    cache.release(a)
    assert cache.pinned_blocks == 5 + 1  # b still pins the shared prefix
    cache.release(b)
    assert cache.pinned_blocks == 0


def test_full_cache_refuses_then_evicts_least_recently_used() -> None:
    cache = KVCache(10)
    old = block_hashes(list(range(0, 64)))  # 4 blocks
    new = block_hashes(list(range(1000, 1064)))
    a = cache.allocate(old, 0)
    b = cache.allocate(new, 0)
    assert a is not None and b is not None
    assert cache.allocate(block_hashes(list(range(2000, 2064))), 0) is None  # 8 pinned + 4 > 10
    cache.release(a)
    cache.release(b)  # `new` is the most recently used
    c = cache.allocate(block_hashes(list(range(3000, 3096))), 0)  # 6 blocks: evicts 2 of `old`
    assert c is not None
    assert cache.cached_prefix(new) == 4
    assert cache.cached_prefix(old) == 0  # its first block went first
