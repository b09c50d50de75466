"""The emulator's engine model as a pure core: time passed in, no event loop, one event per
change of the batch; prompts computed in chunks within each step's token budget."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from gpufleet.emulator import model as engine_model
from gpufleet.emulator.kvcache import BLOCK_TOKENS, Allocation, block_hashes
from gpufleet.emulator.model import EngineModel, Generation, RequestTooLarge
from gpufleet.emulator.steps import StepCost, StepGrid
from gpufleet.hardware import CATALOG
from gpufleet.sizing import load_architecture
from gpufleet.sizing.performance import PerfModel

LLAMA_8B = Path(__file__).parents[1] / "data" / "configs" / "llama-3-8b.json"
PERF = PerfModel(load_architecture(LLAMA_8B), CATALOG["H100"])
COST = StepCost.of(PERF)
BUDGET = 8192  # vLLM's default token budget per step for ``vllm serve`` on an H100


def prompt(n: int, start: int = 0) -> list[int]:
    return list(range(start, start + n))


def run(model: EngineModel, until: float = float("inf")) -> int:
    """Advance event by event, as the simulator would; the number of events."""
    events = 0
    while (t := model.next_event_time()) is not None and t <= until:
        model.advance(t)
        events += 1
    return events


def token_times(model: EngineModel, gen: Generation) -> list[float]:
    """Stream ``gen`` as the HTTP shell does: wake at each next token, count what is out."""
    times: list[float] = []
    while (t := model.next_token_time(gen)) is not None:
        model.advance(t)
        times += [t] * (model.emitted(gen) - len(times))
    return times


def ttft_alone(prompt_tokens: int, cached: int = 0, budget: int = BUDGET) -> float:
    """A prompt alone on the replica: its request overhead, then steps of ``budget`` prompt
    tokens each, each the roofline of its chunk (compute) and the KV its attention reads."""
    t, done = PERF.request_overhead_s, cached
    while done < prompt_tokens:
        chunk = min(budget, prompt_tokens - done)
        done += chunk
        t += COST.seconds(0, 0, chunk, done)
    return t


def alone(prompt_tokens: int, max_tokens: int) -> float:
    """A request alone on the replica, step by step, straight from the performance model."""
    steps = sum(PERF.decode_step_s(1, prompt_tokens + i) for i in range(1, max_tokens))
    return ttft_alone(prompt_tokens) + steps


def test_runs_without_an_event_loop() -> None:
    with pytest.raises(RuntimeError):
        asyncio.get_running_loop()
    model = EngineModel(PERF, 400_000)
    gen = model.submit(prompt(100), 20, now=5.0)
    assert (gen.phase, gen.admitted_at, model.running) == ("prefill", 5.0, 1)
    assert model.next_event_time() == 5.0 + PERF.request_overhead_s  # its prompt schedulable
    run(model)
    assert gen.phase == "done" and model.emitted(gen) == 20


def test_exports() -> None:
    assert sorted(engine_model.__all__) == [
        "EngineModel",
        "Generation",
        "Phase",
        "RemoteKV",
        "RequestTooLarge",
        "default_max_num_batched_tokens",
    ]


def test_a_long_request_alone_takes_a_handful_of_events_and_the_modelled_time() -> None:
    model = EngineModel(PERF, 400_000)
    gen = model.submit(prompt(100), 1000, now=0.0)
    assert run(model) == 3  # its prompt schedulable, its prefill ends, it finishes
    assert model.batch_changes == 4  # and its admission: not 1,000 decode steps
    assert gen.first_token_at == pytest.approx(ttft_alone(100), rel=1e-12)
    assert gen.finished_at == pytest.approx(alone(100, 1000), rel=1e-9)
    assert model.generated_tokens == 1000 and model.running == 0


def test_streaming_reads_each_token_time_without_events() -> None:
    model = EngineModel(PERF, 400_000)
    gen = model.submit(prompt(100), 300, now=0.0)
    times = token_times(model, gen)
    assert len(times) == 300 and model.batch_changes == 4
    expected = [ttft_alone(100)]
    for i in range(1, 300):
        expected.append(expected[-1] + PERF.decode_step_s(1, 100 + i))
    assert times == pytest.approx(expected, rel=1e-9)


def test_two_requests_share_decode_steps_and_each_is_slower_than_alone() -> None:
    model = EngineModel(PERF, 400_000)
    a = model.submit(prompt(500), 200, now=0.0)
    run(model, until=ttft_alone(500))
    b = model.submit(prompt(500, start=10_000), 200, now=model.now + 0.001)
    run(model, until=b.arrived_at + 0.1)
    assert b.first_token_at is not None  # from a step that a decoded in too
    joined = model.next_token_time(a) or 0.0
    assert model.next_token_time(b) == joined  # from then on, one step each
    model.advance(joined)
    left = 200 - model.emitted(a)
    run(model)
    assert a.finished_at is not None and b.finished_at is not None
    assert a.finished_at > alone(500, 200) and b.finished_at > alone(500, 200)
    # While both decode, a step is one step of a batch of two, as the performance model says:
    # a's last ``left`` tokens, at a mean context of about 500 + 100 tokens each.
    assert (a.finished_at - joined) / left == pytest.approx(PERF.decode_step_s(2, 600), rel=0.01)
    assert PERF.decode_step_s(2, 600) > PERF.decode_step_s(1, 600)


def test_prompts_are_computed_in_budget_sized_steps_so_ttft_grows_with_load() -> None:
    model = EngineModel(PERF, 400_000, max_num_batched_tokens=2048)
    gens = [model.submit(prompt(2000, start=i * 10_000), 1, now=0.0) for i in range(5)]
    assert model.running == 5 and model.waiting == 0
    run(model)
    firsts = [g.first_token_at or 0.0 for g in gens]
    assert firsts == sorted(firsts) and len(set(firsts)) == 5  # one prompt ends per step
    # 10,000 prompt tokens in five compute-bound steps (2,048 × 4 + 1,808): the last prompt's
    # first token after all of them, whatever share each step gave to whom.
    expected = PERF.request_overhead_s + 10_000 * COST.token_s + 5 * PERF.step_overhead_s
    assert firsts[-1] == pytest.approx(expected, rel=1e-9)
    # The first step took all of the first prompt and the second's first 48 tokens.
    first_step = COST.seconds(0, 0, 2048, 2000 + 48)
    assert firsts[0] == pytest.approx(PERF.request_overhead_s + first_step, rel=1e-9)


def test_a_full_batch_queues_and_admits_when_a_sequence_ends() -> None:
    model = EngineModel(PERF, 400_000, max_num_seqs=2)
    gens = [model.submit(prompt(100, start=i * 1000), 50, now=0.0) for i in range(3)]
    assert [g.phase for g in gens] == ["prefill", "prefill", "waiting"]
    assert (model.running, model.waiting) == (2, 1)
    run(model)
    assert gens[2].admitted_at == min(gens[0].finished_at or 0, gens[1].finished_at or 0)


def test_kv_exhaustion_queues_requests_until_blocks_free() -> None:
    model = EngineModel(PERF, kv_capacity_tokens=20 * BLOCK_TOKENS)
    first = model.submit(prompt(200), 100, now=0.0)  # 19 blocks of 20
    second = model.submit(prompt(64, start=5000), 10, now=0.1)
    assert second.phase == "waiting" and model.waiting == 1
    assert model.cache.usage == pytest.approx(19 / 20)
    run(model)
    assert second.admitted_at == first.finished_at
    assert second.first_token_at == pytest.approx((first.finished_at or 0) + ttft_alone(64))


def test_a_prompt_that_can_never_fit_is_refused_at_once() -> None:
    model = EngineModel(PERF, kv_capacity_tokens=64)
    with pytest.raises(RequestTooLarge, match="exceed the KV cache"):
        model.submit(prompt(400), 1, now=0.0)
    assert (model.running, model.waiting) == (0, 0)


def test_a_prefix_cache_hit_shortens_the_prefill() -> None:
    model = EngineModel(PERF, 400_000)
    system = prompt(1800)
    cold = model.submit([*system, 1, 2, 3], 4, now=0.0)
    run(model)
    warm = model.submit([*system, 7, 8, 9], 4, now=1.0)
    run(model)
    assert cold.cached_tokens == 0 and warm.cached_tokens == 1792  # 112 whole blocks
    cold_ttft = (cold.first_token_at or 0) - cold.arrived_at
    warm_ttft = (warm.first_token_at or 0) - warm.arrived_at
    assert warm_ttft == pytest.approx(ttft_alone(1803, 1792)) and warm_ttft < 0.6 * cold_ttft
    assert (model.prefix_queries, model.prefix_hits) == (2 * 1803, 1792)


def test_events_count_changes_of_the_batch_not_decode_steps() -> None:
    model = EngineModel(PERF, 400_000)
    a = model.submit(prompt(100), 1000, now=0.0)
    b = model.submit(prompt(100, start=5000), 1000, now=1.0)
    run(model)
    # a: admitted, prompt schedulable, prefill ends, finishes; b the same: eight changes for
    # 2,000 tokens.
    assert model.batch_changes == 8 and model.generated_tokens == 2000
    assert b.finished_at is not None and a.finished_at is not None
    assert b.finished_at - a.finished_at > 0.9


def test_a_sequence_ending_mid_step_leaves_the_step_in_flight_alone() -> None:
    model = EngineModel(PERF, 400_000)
    a = model.submit(prompt(100), 100, now=0.0)
    run(model, until=0.05)
    model.advance(0.3)
    due = model.next_token_time(a)
    before = model.emitted(a)
    model.submit(prompt(3000, start=9000), 10, now=0.3)  # joins the batch mid-step
    assert model.next_token_time(a) == due
    model.advance(due or 0)
    assert model.emitted(a) == before + 1


def test_aborts_free_the_slot_and_move_the_prompts_behind_up() -> None:
    model = EngineModel(PERF, 400_000, max_num_seqs=2, max_num_batched_tokens=2048)
    a = model.submit(prompt(6000), 50, now=0.0)
    b = model.submit(prompt(2000, start=10_000), 50, now=0.0)
    c = model.submit(prompt(100, start=20_000), 5, now=0.0)
    assert (c.phase, model.waiting) == ("waiting", 1)
    model.advance(0.1)  # a's first chunk is in flight
    b_first = model.next_token_time(b) or 0.0
    changed = model.abort(a, now=0.1)  # mid-prefill: b's chunks start with the next step
    assert a.aborted and a.phase == "done" and a.finished_at == 0.1
    assert b in changed and c in changed and c.phase == "prefill"
    sooner = model.next_token_time(b) or 0.0
    assert sooner < b_first
    run(model)
    assert b.first_token_at == pytest.approx(sooner, rel=1e-9)
    assert model.emitted(b) == 50 and model.emitted(c) == 5 and model.cache.usage == 0


def test_time_runs_forward_only() -> None:
    model = EngineModel(PERF, 400_000)
    model.advance(2.0)
    with pytest.raises(ValueError, match="forward"):
        model.advance(1.0)


def test_random_load_keeps_the_books_straight() -> None:
    rng = random.Random(7)
    model = EngineModel(PERF, kv_capacity_tokens=4000, max_num_seqs=8)
    gens = []
    now = 0.0
    for i in range(200):
        now += rng.expovariate(20)
        gens.append(model.submit(prompt(rng.randint(1, 600), i * 1000), rng.randint(0, 80), now))
        if rng.random() < 0.05:
            model.abort(rng.choice(gens), now)
    run(model)
    assert all(g.phase == "done" for g in gens)
    assert (model.running, model.waiting, model.cache.usage) == (0, 0, 0)
    served = [g for g in gens if not g.aborted]
    assert model.generated_tokens >= sum(g.max_tokens for g in served)
    for g in served:
        assert g.arrived_at <= (g.admitted_at or 0) <= (g.first_token_at or 0)
        assert (g.first_token_at or 0) <= (g.finished_at or 0)


def test_the_step_grid_counts_exactly_the_boundaries_it_plans() -> None:
    rng = random.Random(3)
    for _ in range(200):
        grid = StepGrid(origin=rng.uniform(0, 1e4))
        grid.plan(rng.uniform(1e-4, 0.1), rng.choice([0.0, rng.uniform(0, 1e-3)]))
        j = rng.randint(0, 5000)
        assert grid.count(grid.time(j)) == j + 1
        assert grid.count(grid.time(j + 1) - 1e-9) == j + 1


class StepByStep:
    """The same scheduler, one step at a time: what the model must equal in closed form.

    A step starts whenever the engine is idle and something can run: it carries every decoding
    sequence (one token each) and the next prompt tokens, first come first served, up to the
    budget; it lasts ``StepCost.seconds`` of that, and what it carries is fixed when it starts.
    A prompt is schedulable ``request_overhead_s`` after its admission; its first token comes
    out when the step computing its last chunk ends, and it decodes from the next step.
    """

    def __init__(self, kv_tokens: int, max_num_seqs: int, budget: int) -> None:
        self.shadow = EngineModel(PERF, kv_tokens, max_num_seqs, budget)  # its KV cache
        self.max_num_seqs, self.budget = max_num_seqs, budget

    def run(self, arrivals: list[tuple[float, list[int], int]]) -> list[tuple[float, float]]:
        cache = self.shadow.cache
        pending = list(enumerate(arrivals))
        waiting: list[int] = []
        preparing: dict[int, float] = {}  # id -> when its prompt is schedulable
        lane: list[int] = []
        left: dict[int, int] = {}
        decoding: dict[int, int] = {}  # id -> tokens out
        context: dict[int, int] = {}  # id -> tokens held, while decoding
        allocations: dict[int, Allocation] = {}
        first: dict[int, float] = {}
        out: dict[int, tuple[float, float]] = {}
        step: tuple[list[int], list[tuple[int, int]]] | None = None
        step_end = 0.0

        def admit(i: int, t: float) -> bool:
            tokens = arrivals[i][1]
            if len(preparing) + len(lane) + len(decoding) >= self.max_num_seqs:
                return False
            hashes = block_hashes(tokens)
            extra = -(-(len(tokens) + arrivals[i][2]) // BLOCK_TOKENS) - len(hashes)
            allocation = cache.allocate(hashes, extra)
            if allocation is None:
                return False
            allocations[i] = allocation
            left[i] = max(1, len(tokens) - allocation.cached_blocks * BLOCK_TOKENS)
            preparing[i] = t + PERF.request_overhead_s
            return True

        def start(t: float) -> None:
            nonlocal step, step_end
            budget, chunk, prefix = self.budget - len(decoding), [], 0
            for i in lane:
                n = min(left[i], budget)
                if n <= 0:
                    break
                chunk.append((i, n))
                prefix += len(arrivals[i][1]) - left[i] + n
                budget -= n
            if not decoding and not chunk:
                step = None
                return
            step = (list(decoding), chunk)
            tokens = sum(n for _, n in chunk)
            context_now = sum(context.values())
            step_end = t + COST.seconds(len(decoding), context_now, tokens, prefix)

        while pending or preparing or step is not None:
            times = [(step_end, 0)] if step is not None else []
            times += [(min(preparing.values()), 1)] if preparing else []
            times += [(pending[0][1][0], 2)] if pending else []
            t, kind = min(times)
            if kind == 0:
                assert step is not None
                stepped, chunk = step
                done = []
                for i in stepped:
                    decoding[i] += 1
                    context[i] += 1
                    if decoding[i] == arrivals[i][2]:
                        done.append(i)
                for i, n in chunk:
                    left[i] -= n
                    if left[i] == 0:
                        lane.remove(i)
                        first[i] = t
                        if arrivals[i][2] <= 1:
                            done.append(i)
                        else:
                            decoding[i] = 1
                            context[i] = len(arrivals[i][1]) + 1
                for i in done:
                    decoding.pop(i, None)
                    context.pop(i, None)
                    cache.release(allocations.pop(i))
                    out[i] = (first[i], t)
                for w in list(waiting):
                    if done and admit(w, t):
                        waiting.remove(w)
                for i, ready in list(preparing.items()):
                    if ready <= t:
                        del preparing[i]
                        lane.append(i)
                start(t)
            elif kind == 1:
                for i, ready in list(preparing.items()):
                    if ready <= t:
                        del preparing[i]
                        lane.append(i)
                if step is None:
                    start(t)
            else:
                i, _ = pending.pop(0)
                if not admit(i, t):
                    waiting.append(i)
        return [out[i] for i in range(len(arrivals))]


@pytest.mark.parametrize(("seed", "budget"), [(1, 256), (2, 512), (3, 320)])
def test_the_closed_form_equals_stepping_one_step_at_a_time(seed: int, budget: int) -> None:
    rng = random.Random(seed)
    arrivals, now = [], 0.0
    for i in range(60):
        now += rng.expovariate(10)
        arrivals.append((now, prompt(rng.randint(1, 900), i * 1000), rng.randint(1, 150)))
    model = EngineModel(
        PERF, kv_capacity_tokens=6000, max_num_seqs=6, max_num_batched_tokens=budget
    )
    gens = []
    for at, tokens, max_tokens in arrivals:
        model.advance(at)
        gens.append(model.submit(tokens, max_tokens, at))
    steps = run(model)
    expected = StepByStep(6000, 6, budget).run(arrivals)
    got = [(g.first_token_at, g.finished_at) for g in gens]
    assert got == [pytest.approx(e, rel=1e-4) for e in expected]
    decode_steps = sum(g.max_tokens - 1 for g in gens)
    assert model.batch_changes <= 4 * len(gens) and steps < decode_steps / 10
