"""The simulator's traces: synthetic generators, synthetic KV block hashes, file replay."""

from __future__ import annotations

import json
import logging
import math
from collections import Counter, defaultdict
from itertools import pairwise
from pathlib import Path

import pytest

import gpufleet.sim as sim
from gpufleet.emulator.kvcache import KVCache
from gpufleet.errors import SpecError
from gpufleet.sim import (
    BLOCK_TOKENS,
    Bursts,
    Lengths,
    SharedPrefix,
    TraceError,
    TraceRequest,
    batch_night,
    block_hashes,
    chats,
    diurnal,
    diurnal_rate,
    merge,
    poisson,
    read_trace,
    write_trace,
)


def test_public_names_exist() -> None:
    assert [name for name in sim.__all__ if not hasattr(sim, name)] == []


# --- generators -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda seed: poisson(5, 200, seed=seed, models={"a": 1, "b": 2}, tenants={"x": 1, "y": 1}),
        lambda seed: diurnal(0.05, bursts=Bursts(count=2), seed=seed),
        lambda seed: chats(0.5, 300, seed=seed),
        lambda seed: batch_night(2, requests_per_job=100, seed=seed),
    ],
    ids=["poisson", "diurnal", "chats", "batch_night"],
)
def test_same_seed_same_trace_other_seed_other_trace(make) -> None:  # type: ignore[no-untyped-def]
    first = list(make(1))
    assert first and first == list(make(1))
    assert first != list(make(2))
    assert all(a.at <= b.at for a, b in pairwise(first))


def test_poisson_count_within_four_sigma_and_inside_the_duration() -> None:
    rate, duration = 50.0, 400.0
    trace = list(poisson(rate, duration, seed=7, prompt=100, output=Lengths(50, sigma=0.5)))
    expected = rate * duration
    assert abs(len(trace) - expected) < 4 * math.sqrt(expected)
    assert trace[0].at >= 0 and trace[-1].at < duration
    assert {r.prompt_tokens for r in trace} == {100}
    mean_output = sum(r.output_tokens for r in trace) / len(trace)
    assert 48 < mean_output < 52


def test_lengths_are_lognormal_with_the_given_mean_and_clipped() -> None:
    import random

    rng = random.Random(3)
    wide = Lengths(mean=500, sigma=1.0, low=10, high=100_000)
    draws = [wide.sample(rng) for _ in range(20_000)]
    assert min(draws) >= 10
    assert 470 < sum(draws) / len(draws) < 530
    clipped = Lengths(mean=500, sigma=2.0, low=100, high=800)
    assert {100, 800} <= {clipped.sample(rng) for _ in range(2_000)} <= set(range(100, 801))
    with pytest.raises(ValueError, match="low <= high"):
        Lengths(mean=10, low=5, high=4)


def test_model_and_tenant_mixes_follow_their_weights() -> None:
    trace = list(poisson(100, 100, seed=4, models={"big": 1, "small": 3}, tenants={"t": 1}))
    models = Counter(r.model for r in trace)
    assert abs(models["small"] / len(trace) - 0.75) < 0.02
    assert {r.tenant for r in trace} == {"t"}
    with pytest.raises(ValueError, match="positive"):
        poisson(1, 1, models={"a": 0})


def test_shared_prefix_is_part_of_the_prompt_for_its_share_of_requests() -> None:
    trace = list(poisson(100, 50, seed=5, prefix=SharedPrefix(groups=3, tokens=256, share=0.5)))
    grouped = [r for r in trace if r.prefix_group]
    assert abs(len(grouped) / len(trace) - 0.5) < 0.05
    assert {r.prefix_group for r in grouped} == {"prefix-0", "prefix-1", "prefix-2"}
    assert all(r.prefix_tokens == 256 < r.prompt_tokens for r in grouped)


def _count_between(trace: list[TraceRequest], start_h: float, end_h: float) -> int:
    return sum(start_h * 3600 <= r.at < end_h * 3600 for r in trace)


def _expected_between(start_h: float, end_h: float, peak: float, factor: float = 1.0) -> float:
    steps = 600
    width = (end_h - start_h) * 3600 / steps
    mid = (start_h * 3600 + (i + 0.5) * width for i in range(steps))
    return factor * sum(diurnal_rate(t, peak, 0.2, 14.0) * width for t in mid)


def test_diurnal_peaks_at_the_peak_hour_and_troughs_twelve_hours_away() -> None:
    peak = 0.5
    trace = list(diurnal(peak, trough_ratio=0.2, peak_hour=14, seed=11, prompt=10, output=10))
    at_peak, at_trough = _count_between(trace, 13.5, 14.5), _count_between(trace, 1.5, 2.5)
    for observed, expected in (
        (at_peak, _expected_between(13.5, 14.5, peak)),
        (at_trough, _expected_between(1.5, 2.5, peak)),
        (len(trace), _expected_between(0, 24, peak)),
    ):
        assert abs(observed - expected) < 4 * math.sqrt(expected)
    assert 4.0 < at_peak / at_trough < 6.0  # the curve's own ratio is 1 / 0.2
    assert diurnal_rate(14 * 3600, peak, 0.2, 14) == pytest.approx(peak)
    assert diurnal_rate(2 * 3600, peak, 0.2, 14) == pytest.approx(0.2 * peak)


def test_a_burst_multiplies_the_rate_inside_its_window_only() -> None:
    burst = Bursts(multiplier=4.0, length_s=1800, starts=(10 * 3600,))
    trace = list(diurnal(0.5, 16 * 3600, bursts=burst, seed=12, prompt=10, output=10))
    inside = _count_between(trace, 10, 10.5)
    expected = _expected_between(10, 10.5, 0.5, factor=4.0)
    assert abs(inside - expected) < 4 * math.sqrt(expected)
    after, after_expected = _count_between(trace, 10.5, 11), _expected_between(10.5, 11, 0.5)
    assert abs(after - after_expected) < 4 * math.sqrt(after_expected)
    quiet = list(diurnal(0.05, seed=3, prompt=10, output=10))
    bursty = list(diurnal(0.05, bursts=Bursts(count=3, multiplier=5), seed=3, prompt=10, output=10))
    assert len(bursty) > len(quiet)


def test_chat_turns_grow_from_the_previous_prompt_and_answer() -> None:
    trace = list(chats(2, 600, seed=8, system_prompt_tokens=300, prefix_groups=2))
    sessions: defaultdict[str, list[TraceRequest]] = defaultdict(list)
    for r in trace:
        assert r.session is not None
        sessions[r.session].append(r)
    multi = [turns for turns in sessions.values() if len(turns) > 1]
    assert len(multi) > 100
    for turns in multi:
        assert len({(t.prefix_group, t.prefix_tokens, t.model, t.tenant) for t in turns}) == 1
        for before, after in pairwise(turns):
            assert after.prompt_tokens > before.prompt_tokens + before.output_tokens
            assert after.at >= before.at + before.output_tokens * 0.02
            earlier = block_hashes(before)
            assert block_hashes(after)[: len(earlier)] == earlier
    assert {r.prefix_group for r in trace} == {"chat-system-0", "chat-system-1"}
    assert all(r.prefix_tokens == 300 for r in trace)


def test_chat_sessions_of_one_system_prompt_share_exactly_its_blocks() -> None:
    firsts: dict[str, TraceRequest] = {}
    for r in chats(1, 200, seed=9, system_prompt_tokens=200, prefix_groups=2):
        firsts.setdefault(r.session or "", r)
    by_group: defaultdict[str | None, list[TraceRequest]] = defaultdict(list)
    for r in firsts.values():
        by_group[r.prefix_group].append(r)
    (a, b, *_), (c, *_) = by_group.values()
    ha, hb, hc = block_hashes(a), block_hashes(b), block_hashes(c)
    assert set(ha) & set(hb) == set(ha[: 200 // BLOCK_TOKENS]) == set(hb[: 200 // BLOCK_TOKENS])
    assert not set(ha) & set(hc)


def test_merged_chat_traces_of_two_seeds_keep_their_sessions_apart() -> None:
    merged = list(merge(chats(1, 100, seed=1), chats(1, 100, seed=2)))
    assert all(a.at <= b.at for a, b in pairwise(merged))
    assert {r.session.split("-")[1] for r in merged if r.session} == {"1", "2"}


def test_batch_jobs_run_at_night_for_the_batch_tenant() -> None:
    trace = list(
        batch_night(3, window=(23, 3), requests_per_job=200, duration_s=2 * 86_400,
                    prefix_tokens=64, models={"m": 1}, seed=6)
    )  # fmt: skip
    jobs = Counter(r.prefix_group for r in trace)
    assert len(jobs) == 2 * 3 and set(jobs.values()) == {200}
    assert all(r.at / 3600 % 24 >= 23 or r.at / 3600 % 24 < 3.1 for r in trace)  # ~10 s a job
    assert {r.tenant for r in trace} == {"batch"} and {r.model for r in trace} == {"m"}
    assert all(r.prefix_tokens == 64 < r.prompt_tokens for r in trace)
    assert all(a.at <= b.at for a, b in pairwise(trace))
    first_day = Counter(r.at < 86_400 for r in trace)
    assert first_day[True] == 3 * 200  # a wrapping window: a day holds its own night's jobs


# --- block hashes ---------------------------------------------------------------------------------


def test_block_hashes_known_answer_so_they_never_depend_on_the_process() -> None:
    # blake2b of the group name, not Python's salted hash(): equal in every process and run
    hashes = block_hashes(TraceRequest(0.0, 48, 1, prefix_group="g", prefix_tokens=32))
    assert hashes == [843199778671794442, 843199778671794443, 2056083795346819835]
    assert block_hashes(TraceRequest(1.5, 40, 3)) == [3526778655117013325, 3526778655117013326]


def test_one_prefix_group_shares_exactly_its_whole_prefix_blocks() -> None:
    a = TraceRequest(0.0, 300, 10, prefix_group="sys", prefix_tokens=100)
    b = TraceRequest(1.0, 500, 10, prefix_group="sys", prefix_tokens=100)
    ha, hb = block_hashes(a), block_hashes(b)
    assert (len(ha), len(hb)) == (300 // BLOCK_TOKENS, 500 // BLOCK_TOKENS)
    shared = 100 // BLOCK_TOKENS
    assert ha[:shared] == hb[:shared] and set(ha) & set(hb) == set(ha[:shared])
    longer = block_hashes(TraceRequest(2.0, 500, 10, prefix_group="sys", prefix_tokens=480))
    assert set(longer) & set(ha) == set(ha[:shared])  # a longer share of one stream
    assert set(longer) & set(hb) == set(hb[:shared])
    other = block_hashes(TraceRequest(0.0, 300, 10, prefix_group="other", prefix_tokens=100))
    assert not set(other) & set(ha)
    alone = block_hashes(TraceRequest(0.0, 300, 10, prefix_tokens=100))  # no group: no sharing
    assert not set(alone) & set(ha)
    whole = TraceRequest(3.0, 64, 1, prefix_group="sys", prefix_tokens=64)
    assert block_hashes(whole) == hb[:4]
    assert block_hashes(TraceRequest(0.0, BLOCK_TOKENS - 1, 1)) == []
    assert max(hb) < 2**63


def test_a_later_turn_shares_the_earlier_prompt_and_answer() -> None:
    def turn(prompt: int, output: int, session: str = "s1") -> TraceRequest:
        return TraceRequest(0.0, prompt, output, session=session, prefix_group="sys",
                            prefix_tokens=64)  # fmt: skip

    first, second, third = turn(100, 50), turn(100 + 50 + 30, 40), turn(180 + 40 + 20, 5)
    h1, h2, h3 = block_hashes(first), block_hashes(second), block_hashes(third)
    assert h2[: len(h1)] == h1 and h3[: len(h2)] == h2
    assert h3[: (100 + 50) // BLOCK_TOKENS] == h2[: (100 + 50) // BLOCK_TOKENS]
    stranger = block_hashes(turn(180, 40, session="s2"))
    assert set(stranger) & set(h2) == set(h2[:4])


def test_the_emulator_cache_reuses_a_prefix_group() -> None:
    cache = KVCache(1000)
    a = cache.allocate(block_hashes(TraceRequest(0.0, 640, 1, None, None, None, "g", 320)), 1)
    assert a is not None
    cache.release(a)
    b = cache.allocate(block_hashes(TraceRequest(1.0, 800, 1, None, None, None, "g", 320)), 1)
    assert b is not None and b.cached_blocks == 320 // BLOCK_TOKENS


# --- replay from files ----------------------------------------------------------------------------


def test_azure_style_csv_with_only_the_three_required_columns(tmp_path: Path) -> None:
    path = tmp_path / "azure.csv"
    path.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:15:46.6805900,4808,10\n"
        "2023-11-16 18:15:50.9951690,3180,8\n"
        "2023-11-16 18:16:48.4061220,110,27\n"
    )
    trace = read_trace(path)
    assert [r.at for r in trace] == pytest.approx([0.0, 4.314579, 61.725532])
    assert [(r.prompt_tokens, r.output_tokens) for r in trace] == [(4808, 10), (3180, 8), (110, 27)]
    assert trace[0] == TraceRequest(0.0, 4808, 10)


def test_absolute_seconds_and_milliseconds_start_at_zero(tmp_path: Path) -> None:
    path = tmp_path / "epoch.csv"
    path.write_text("arrival_time,input_tokens,output_tokens\n1700000000.5,10,2\n1700000002,5,1\n")
    assert [r.at for r in read_trace(path)] == [0.0, 1.5]
    path = tmp_path / "ms.jsonl"
    path.write_text('{"timestamp": 27482, "input_length": 10, "output_length": 2}\n'
                    '{"timestamp": 30000, "input_length": 10, "output_length": 2}\n')  # fmt: skip
    assert [r.at for r in read_trace(path, timestamp_unit_s=0.001)] == pytest.approx([0, 2.518])


def test_jsonl_with_iso_timestamps_and_only_the_required_keys(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    rows = [
        {"timestamp": "2024-05-10T14:00:00Z", "prompt_tokens": 12, "output_tokens": 3},
        {"timestamp": "2024-05-10T16:00:01.5+02:00", "prompt_tokens": "7", "output_tokens": 1.0},
        {"timestamp": "2024-05-10T14:00:02.25", "prompt_tokens": 7, "output_tokens": 2},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    trace = read_trace(path)
    assert [r.at for r in trace] == [0.0, 1.5, 2.25]  # +02:00 and naive-as-UTC both normalised
    assert [r.prompt_tokens for r in trace] == [12, 7, 7] and trace[1].output_tokens == 1


def test_all_columns_in_csv_and_jsonl(tmp_path: Path) -> None:
    expected = [
        TraceRequest(0.0, 100, 20, "llama", "acme", "s1", "sys", 64),
        TraceRequest(0.5, 200, 30, None, "acme", None, None, 0),
    ]
    csv_path = tmp_path / "all.csv"
    csv_path.write_text(
        "at,prompt_tokens,output_tokens,model,tenant,session,prefix_group,prefix_tokens,extra\n"
        "10,100,20,llama,acme,s1,sys,64,ignored\n"
        "10.5,200,30,,acme,,,,\n"
    )
    assert read_trace(csv_path) == expected
    jsonl_path = tmp_path / "all.data"
    jsonl_path.write_text(
        '{"at": 10, "prompt_tokens": 100, "output_tokens": 20, "model": "llama", "tenant": "acme",'
        ' "session": "s1", "prefix_group": "sys", "prefix_tokens": 64, "text": "ignored"}\n'
        '{"at": 10.5, "Prompt Tokens": 200, "output_tokens": 30, "tenant": "acme"}\n'
    )
    assert read_trace(jsonl_path, format="jsonl") == expected


@pytest.mark.parametrize("name", ["trace.csv", "trace.jsonl", "trace.csv.gz"])
def test_write_then_read_gives_the_trace_back(tmp_path: Path, name: str) -> None:
    original = list(
        merge(
            poisson(2, 60, seed=1, models={"a": 1, "b": 1}, prefix=SharedPrefix(2, 128, 0.5)),
            chats(0.2, 60, seed=1, tenants={"t": 1}),
            batch_night(1, window=(0, 1), requests_per_job=20, duration_s=3600, prefix_tokens=32),
        )
    )
    assert write_trace(tmp_path / name, original) == len(original)
    back = read_trace(tmp_path / name)
    first = original[0].at
    assert [r.at for r in back] == pytest.approx([r.at - first for r in original], abs=1e-9)
    assert [(r.prompt_tokens, r.output_tokens, r.model, r.tenant, r.session, r.prefix_group,
             r.prefix_tokens) for r in back] == [
        (r.prompt_tokens, r.output_tokens, r.model, r.tenant, r.session, r.prefix_group,
         r.prefix_tokens) for r in original
    ]  # fmt: skip


def test_rows_out_of_order_are_sorted_stably_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "shuffled.csv"
    path.write_text("at,prompt_tokens,output_tokens\n5,1,1\n2,2,1\n5,3,1\n3,4,1\n")
    with caplog.at_level(logging.INFO, logger="gpufleet.sim.trace_files"):
        trace = read_trace(path)
    assert [(r.at, r.prompt_tokens) for r in trace] == [(0, 2), (1, 4), (3, 1), (3, 3)]
    assert "2 rows out of time order" in caplog.text


def test_bad_rows_are_all_reported_with_their_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(
        "timestamp,prompt_tokens,output_tokens,prefix_group,prefix_tokens\n"  # line 1
        "0,10,5,,\n"  # 2: fine
        "1,-3,5,,\n"  # 3: negative
        "2,10,2.5,,\n"  # 4: not whole
        "yesterday,10,5,,\n"  # 5: no time
        "4,10,0,,\n"  # 6: zero output
        "5,10,5,,8\n"  # 7: prefix without a group
        "6,10,5,sys,11\n"  # 8: prefix longer than the prompt
        "7,10\n"  # 9: too few fields
        "8,,5,,\n"  # 10: missing prompt tokens
        "2024-01-01T00:00:00,10,5,,\n"  # 11: a datetime among seconds
        "9,12.0,5,sys,12\n"  # 12: fine (12.0 is whole)
    )
    with pytest.raises(TraceError) as caught:
        read_trace(path)
    error = caught.value
    assert isinstance(error, ValueError) and isinstance(error, SpecError)
    lines = [int(p.split(":")[0].removeprefix("line ")) for p in error.problems]
    assert lines == [3, 4, 5, 6, 7, 8, 9, 10, 11]
    message = str(error)
    assert message.startswith(f"{path}: 9 problems:")
    for fragment in (
        "line 3: prompt_tokens '-3' is negative: token counts are whole numbers >= 1",
        "line 4: output_tokens '2.5' is not a whole number",
        "line 5: timestamp 'yesterday' is neither seconds nor an ISO-8601 datetime",
        "line 6: output_tokens '0' is zero",
        "line 7: prefix_tokens 8 without a prefix_group",
        "line 8: prefix_tokens 11 exceeds prompt_tokens 10",
        "line 9: 2 fields but the header has 5",
        "line 10: missing prompt_tokens",
        "line 11: timestamp '2024-01-01T00:00:00' mixes kinds",
    ):
        assert fragment in message


def test_a_long_list_of_problems_is_capped(tmp_path: Path) -> None:
    path = tmp_path / "many.jsonl"
    bad = '{"at": 1, "prompt_tokens": -1, "output_tokens": 1}\n'
    path.write_text(bad * 25 + "not json\n[1]\n")
    with pytest.raises(TraceError) as caught:
        read_trace(path)
    assert len(caught.value.problems) == 27
    message = str(caught.value)
    assert "line 20:" in message and "line 21:" not in message and "and 7 more" in message
    assert caught.value.problems[-2:] == [
        "line 26: not JSON (Expecting value): each line is one JSON object",
        'line 27: a JSON list, not an object: write one {"timestamp": …, "prompt_tokens": …, '
        '"output_tokens": …} per line',
    ]


def test_a_header_without_the_required_columns_names_the_accepted_ones(tmp_path: Path) -> None:
    path = tmp_path / "h.csv"
    path.write_text("time,tokens_in,GeneratedTokens\n1,2,3\n")
    with pytest.raises(TraceError, match=r"line 1: the header .* lacks at: one of at, timestamp"):
        read_trace(path)
    dup = tmp_path / "dup.csv"
    dup.write_text("at,timestamp,prompt_tokens,output_tokens\n1,1,2,3\n")
    with pytest.raises(TraceError, match=r"line 1: two columns for at \('timestamp'"):
        read_trace(dup)
    with pytest.raises(TraceError, match=r"cannot tell the format of x.txt"):
        read_trace(tmp_path / "x.txt")
