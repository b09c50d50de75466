"""Chunked prefill in the engine model: a long prompt shares steps with the decodes beside it,
so their inter-token latency jumps to the roofline of a prompt chunk; a prefill-only replica
computes prompts back to back; a decode replica fed remote KV never stalls."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import pytest

from gpufleet.emulator.kvcache import BLOCK_TOKENS
from gpufleet.emulator.kvtransfer import KV_LINKS, remote_kv
from gpufleet.emulator.main import build_replicas, parse_args
from gpufleet.emulator.model import EngineModel, Generation, default_max_num_batched_tokens
from gpufleet.emulator.steps import StepCost
from gpufleet.hardware import CATALOG
from gpufleet.sizing import load_architecture
from gpufleet.sizing.performance import PerfModel

LLAMA_8B = Path(__file__).parents[1] / "data" / "configs" / "llama-3-8b.json"
PERF = PerfModel(load_architecture(LLAMA_8B), CATALOG["H100"])
COST = StepCost.of(PERF)


def prompt(n: int, start: int = 0) -> list[int]:
    return list(range(start, start + n))


def run(model: EngineModel) -> None:
    while (t := model.next_event_time()) is not None:
        model.advance(t)


def stream(model: EngineModel, gen: Generation, until: float = float("inf")) -> list[float]:
    """``gen``'s token times up to ``until``, read as the HTTP shell reads them."""
    times: list[float] = []
    while (t := model.next_token_time(gen)) is not None and t <= until:
        model.advance(t)
        times += [t] * (model.emitted(gen) - len(times))
    return times


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


def decoding_alone(model: EngineModel) -> tuple[Generation, list[float]]:
    """A 100-token prompt decoding alone for a while: it, and its token times so far."""
    gen = model.submit(prompt(100), 400, now=0.0)
    return gen, stream(model, gen, until=0.5)


def test_without_prompts_a_step_is_the_performance_models_decode_step() -> None:
    for batch, context in ((1, 100), (8, 2000), (64, 4000), (256, 50)):
        assert COST.seconds(batch, batch * context) == pytest.approx(
            PERF.decode_step_s(batch, context), rel=1e-12
        )
    # With prompt tokens every scheduled token costs compute: 2,048 of them is compute-bound.
    chunk = COST.seconds(1, 500, 2047, 2047)
    assert chunk == pytest.approx(2048 / PERF.prefill_tokens_per_s() + PERF.step_overhead_s)
    assert chunk > 6 * PERF.decode_step_s(1, 500)


@pytest.mark.parametrize("budget", [2048, 8192])
def test_a_decode_stalls_while_a_long_prompt_is_chunked_beside_it(budget: int) -> None:
    model = EngineModel(PERF, 400_000, max_num_batched_tokens=budget)
    a, before = decoding_alone(model)
    base = gaps(before)[-1]
    assert base == pytest.approx(PERF.decode_step_s(1, 100 + len(before) - 1), rel=1e-9)
    long = model.submit(prompt(8000, start=10_000), 2, now=model.now)
    times = before + stream(model, a, until=model.now + 2.0)[len(before) :]
    run(model)
    assert long.first_token_at is not None
    stalled = [g for g in gaps(times) if g > 2 * base]
    # The prompt's chunks: the budget less a's one decode token per step, the last one short.
    chunks = [budget - 1] * (8000 // (budget - 1)) + [8000 % (budget - 1)]
    assert len(stalled) == len(chunks)
    for gap, chunk in zip(stalled, chunks, strict=True):
        # Each stalled gap is one step of a's decode and that chunk: compute-bound, so the
        # roofline's compute for the step's tokens (and the per-step overhead).
        assert gap == pytest.approx((1 + chunk) * COST.token_s + COST.overhead_s, rel=1e-9)
    assert max(stalled) > 6 * base
    # The prompt's first token comes out of the step that took its last chunk, which is also
    # the end of a's last stalled gap.
    assert long.first_token_at in times


def test_several_short_prompts_share_one_step() -> None:
    model = EngineModel(PERF, 400_000)
    gens = [model.submit(prompt(100, start=i * 1000), 1, now=0.0) for i in range(5)]
    run(model)
    one_step = PERF.request_overhead_s + COST.seconds(0, 0, 500, 500)
    assert [g.first_token_at for g in gens] == pytest.approx([one_step] * 5, rel=1e-12)


def test_a_fully_cached_prompt_still_computes_its_last_token() -> None:
    model = EngineModel(PERF, 400_000)
    model.submit(prompt(100 * BLOCK_TOKENS), 1, now=0.0)
    run(model)
    again = model.submit(prompt(100 * BLOCK_TOKENS), 1, now=1.0)
    run(model)
    assert again.cached_tokens == 100 * BLOCK_TOKENS
    ttft = (again.first_token_at or 0.0) - 1.0
    assert ttft == pytest.approx(PERF.request_overhead_s + COST.seconds(0, 0, 1, 1600))


def test_a_prefill_only_replica_runs_prompts_back_to_back() -> None:
    """Prefill calls (one output token each) of 6,000-token prompts, all at once: every step
    but the last carries a full budget of prompt tokens, so the replica computes them at the
    roofline's prefill rate less only the per-step overhead."""
    model = EngineModel(PERF, 4_000_000)
    budget = model.max_num_batched_tokens
    calls = [model.submit(prompt(6000, start=i * 100_000), 1, now=0.0) for i in range(12)]
    run(model)
    firsts = [c.first_token_at or 0.0 for c in calls]
    assert firsts == sorted(firsts)
    steps = -(-12 * 6000 // budget)  # 72,000 tokens in 9 steps of 8,192 (the last short)
    busy = firsts[-1] - PERF.request_overhead_s
    assert busy == pytest.approx(72_000 * COST.token_s + steps * COST.overhead_s, rel=1e-9)
    assert 72_000 / busy > 0.95 * PERF.prefill_tokens_per_s()
    assert all(c.phase == "done" and c.finished_at == c.first_token_at for c in calls)


def test_a_decode_replica_fed_remote_kv_never_stalls() -> None:
    """The same 8,000-token prompt beside a decoding stream: prefilled here it stalls the
    stream for a chunk's compute per step; its KV pulled from a prefill replica, the stream's
    steps grow only by reading the newcomer's KV."""
    link = remote_kv(PERF, KV_LINKS["infiniband"])
    stalls = {}
    for remote in (None, link):
        model = EngineModel(PERF, 400_000)
        a, before = decoding_alone(model)
        b = model.submit(prompt(8000, start=10_000), 50, now=model.now, remote=remote)
        times = before + stream(model, a, until=model.now + 1.0)[len(before) :]
        run(model)
        assert b.phase == "done" and model.emitted(b) == 50
        stalls[remote is not None] = max(gaps(times)) / gaps(before)[-1]
    assert stalls[False] > 6
    # Two sequences, ~8,100 and ~130 tokens of context: memory-bound, the KV read added.
    worst = PERF.decode_step_s(2, (8000 + 50 + 100 + 400) // 2) / PERF.decode_step_s(1, 100)
    assert 1 < stalls[True] <= worst


def test_the_default_budget_is_vllms_for_the_gpu() -> None:
    budgets = {
        name: default_max_num_batched_tokens(CATALOG[name])
        for name in ("H200", "H100", "A100-80GB", "A100-40GB", "L40S", "L4")
    }
    assert budgets == {
        "H200": 8192,
        "H100": 8192,
        "A100-80GB": 2048,  # vLLM keeps the A100 at 2,048 whatever its memory
        "A100-40GB": 2048,
        "L40S": 2048,
        "L4": 2048,
    }
    b200 = dataclasses.replace(CATALOG["H200"], name="B200", memory_bytes=192 * 10**9)
    assert default_max_num_batched_tokens(b200) == 16384  # ≥ 160 GiB
    assert EngineModel(PERF, 1000).max_num_batched_tokens == 8192
    l4 = dataclasses.replace(PERF, gpu=CATALOG["L4"])
    assert EngineModel(l4, 1000).max_num_batched_tokens == 2048
    assert EngineModel(l4, 1000, max_num_seqs=4096).max_num_batched_tokens == 4096
    with pytest.raises(ValueError, match=r"max_num_batched_tokens \(128\) must be ≥ max_num_seqs"):
        EngineModel(PERF, 1000, max_num_seqs=256, max_num_batched_tokens=128)


def test_the_command_line_sets_the_budget() -> None:
    (server,) = build_replicas(parse_args(["--arch", str(LLAMA_8B), "--gpu", "L4"]))
    assert server.engine.max_num_batched_tokens == 2048  # vLLM's for an L4
    opts = parse_args(["--arch", str(LLAMA_8B), "--max-num-batched-tokens", "512"])
    (server,) = build_replicas(opts)
    assert (opts.max_num_batched_tokens, server.engine.max_num_batched_tokens) == (512, 512)
    with pytest.raises(SystemExit):
        parse_args(["--arch", str(LLAMA_8B), "--max-num-batched-tokens", "64"])  # < 256 seqs
