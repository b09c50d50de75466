"""Disaggregated serving in the engine model, in virtual time: a generation whose prompt KV is
pulled from another replica instead of prefilled, and what the pull costs on each link."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from gpufleet.emulator import kvtransfer
from gpufleet.emulator.kvcache import BLOCK_TOKENS, block_hashes
from gpufleet.emulator.kvtransfer import (
    KV_LINKS,
    BadTransferParams,
    TransferParams,
    block_ids,
    kv_link,
    remote_kv,
)
from gpufleet.emulator.main import build_replicas, parse_args
from gpufleet.emulator.model import EngineModel, Generation, RemoteKV
from gpufleet.emulator.steps import StepCost
from gpufleet.hardware import CATALOG
from gpufleet.sizing import load_architecture
from gpufleet.sizing.performance import PerfModel

LLAMA_8B = Path(__file__).parents[1] / "data" / "configs" / "llama-3-8b.json"
ARCH = load_architecture(LLAMA_8B)  # 32 layers, 8 KV heads of 128
PERF = PerfModel(ARCH, CATALOG["H100"])
KV_PER_TOKEN = 2 * 32 * 8 * 128 * 2  # K and V, layers, KV heads, head dim, bf16: 131,072 bytes
INFINIBAND = remote_kv(PERF, KV_LINKS["infiniband"])


def prompt(n: int, start: int = 0) -> list[int]:
    return list(range(start, start + n))


def run(model: EngineModel) -> None:
    while (t := model.next_event_time()) is not None:
        model.advance(t)


def token_times(model: EngineModel, gen: Generation) -> list[float]:
    """Stream ``gen`` as the HTTP shell does: wake when told, count what is out."""
    times: list[float] = []
    while gen.phase != "done":
        t = model.next_token_time(gen)
        if t is None:  # waiting or pulling: the next event changes it
            t = model.next_event_time()
            assert t is not None
        model.advance(t)
        times += [t] * (model.emitted(gen) - len(times))
    return times


def test_the_pull_costs_bytes_over_bandwidth_plus_latency() -> None:
    assert PERF.kv_bytes_per_token == KV_PER_TOKEN
    assert RemoteKV(KV_PER_TOKEN, 50e9, 25e-6) == INFINIBAND
    assert INFINIBAND.seconds(2000) == pytest.approx(2000 * 131_072 / 50e9 + 25e-6)  # 5.27 ms
    tcp = remote_kv(PERF, KV_LINKS["tcp"])
    assert tcp.seconds(2000) == pytest.approx(2000 * 131_072 / 3.125e9 + 500e-6)  # 84.4 ms


def test_a_remote_kv_generation_gets_its_first_token_a_decode_step_after_its_pull() -> None:
    model = EngineModel(PERF, 400_000)
    gen = model.submit(prompt(2000), 10, now=1.0, remote=INFINIBAND)
    assert (gen.phase, gen.admitted_at, gen.cached_tokens, gen.pulled_tokens) == (
        "transfer",
        1.0,
        0,
        2000,
    )
    pulled = 1.0 + 2000 * 131_072 / 50e9 + 25e-6
    assert gen.transfer_ended_at == pytest.approx(pulled)
    assert model.next_event_time() == gen.transfer_ended_at
    assert (model.running, model.transferring, model.next_token_time(gen)) == (1, 1, None)
    assert model.cache.usage > 0  # it holds its blocks while it pulls

    model.advance(pulled)
    assert gen.phase == "decode" and model.transferring == 0
    times = token_times(model, gen)
    assert len(times) == 10
    # Its prompt is done: the first token comes out of its first decode step, no prefill.
    assert gen.first_token_at == times[0]
    assert gen.first_token_at == pytest.approx(pulled + PERF.decode_step_s(1, 2000), rel=1e-12)
    assert gen.first_token_at - 1.0 < 0.25 * PERF.ttft_s(2000)
    assert (model.kv_pulls, model.kv_pulled_bytes) == (1, 2000 * KV_PER_TOKEN)
    assert model.prompt_tokens_total == 2000 and model.running == 0 and model.cache.usage == 0


def test_a_pull_takes_no_token_of_any_step() -> None:
    model = EngineModel(PERF, 400_000)
    model.submit(prompt(8000), 5, now=0.0, remote=INFINIBAND)
    local = model.submit(prompt(500, start=10_000), 5, now=0.0)
    run(model)
    # Its prompt alone in its step: neither behind the pull nor sharing the step with it.
    alone = PERF.request_overhead_s + StepCost.of(PERF).seconds(0, 0, 500, 500)
    assert local.first_token_at == pytest.approx(alone, rel=1e-12)


def test_blocks_cached_here_are_not_pulled() -> None:
    model = EngineModel(PERF, 400_000)
    model.submit(prompt(1024), 3, now=0.0)  # leaves 64 blocks of its prompt cached
    run(model)
    t = model.now
    gen = model.submit([*prompt(1024), *prompt(976, start=50_000)], 3, now=t, remote=INFINIBAND)
    assert (gen.cached_tokens, gen.pulled_tokens) == (1024, 976)
    assert gen.transfer_ended_at == pytest.approx(t + 976 * 131_072 / 50e9 + 25e-6)
    assert gen.transfer_ended_at is not None
    assert gen.transfer_ended_at - t < 0.5 * INFINIBAND.seconds(2000)
    assert model.prefix_hits == 1024
    run(model)
    assert model.kv_pulled_bytes == 976 * KV_PER_TOKEN


def test_pulls_queue_on_the_link_and_move_up_when_one_goes_away() -> None:
    model = EngineModel(PERF, 400_000)
    busy = INFINIBAND.busy_s(2000)
    first = model.submit(prompt(2000), 5, now=0.0, remote=INFINIBAND)
    second = model.submit(prompt(2000, start=10_000), 5, now=0.0, remote=INFINIBAND)
    assert second.transfer_ended_at == pytest.approx(2 * busy + 25e-6)
    assert model.transferring == 2
    model.abort(first, now=busy / 2)  # halfway through its pull: the link frees now
    assert first.phase == "done" and first.aborted
    assert second.transfer_ended_at == pytest.approx(busy / 2 + busy + 25e-6)
    run(model)
    assert second.phase == "done" and model.emitted(second) == 5
    assert (model.running, model.cache.usage, model.kv_pulls) == (0, 0, 1)


def test_a_pull_joining_a_running_batch_waits_for_the_step_in_flight() -> None:
    model = EngineModel(PERF, 400_000)
    other = model.submit(prompt(300), 400, now=0.0)
    model.advance(other.first_token_at or 0.0)
    gen = model.submit(prompt(3000, start=10_000), 20, now=model.now + 0.001, remote=INFINIBAND)
    times = token_times(model, gen)
    assert len(times) == 20 and gen.first_token_at == times[0]
    assert gen.transfer_ended_at is not None and gen.first_token_at > gen.transfer_ended_at
    run(model)
    assert model.emitted(other) == 400 and model.running == 0


def test_one_token_and_no_token_remote_generations_finish() -> None:
    model = EngineModel(PERF, 400_000)
    one = model.submit(prompt(100), 1, now=0.0, remote=INFINIBAND)
    none = model.submit(prompt(100, start=1000), 0, now=0.0, remote=INFINIBAND)
    run(model)
    assert one.phase == none.phase == "done"
    assert model.emitted(one) == 1 and model.emitted(none) == 0
    assert none.first_token_at is None and none.finished_at == none.transfer_ended_at
    assert model.running == 0 and model.cache.usage == 0


def test_a_slow_link_can_cost_more_than_the_prefill_it_saves() -> None:
    fast, slow = EngineModel(PERF, 400_000), EngineModel(PERF, 400_000)
    a = fast.submit(prompt(1800), 2, now=0.0, remote=INFINIBAND)
    b = slow.submit(prompt(1800), 2, now=0.0, remote=remote_kv(PERF, KV_LINKS["tcp"]))
    run(fast)
    run(slow)
    assert a.first_token_at is not None and b.first_token_at is not None
    assert a.first_token_at < PERF.ttft_s(1800) < b.first_token_at


def test_tensor_parallel_ranks_pull_their_shards_over_their_own_links() -> None:
    tp2 = dataclasses.replace(PERF, tp=2)
    ib = KV_LINKS["infiniband"]
    # Two ranks on each side: two links, 4 KV heads each.
    assert remote_kv(tp2, ib, 2) == RemoteKV(KV_PER_TOKEN, 100e9, 25e-6)
    # From a TP-1 prefill replica: its one GPU sends everything over one link.
    assert remote_kv(tp2, ib, 1) == RemoteKV(KV_PER_TOKEN, 50e9, 25e-6)
    # TP 16 over 8 KV heads: every rank holds (and pulls) one head, replicated.
    tp16 = dataclasses.replace(PERF, tp=16)
    assert remote_kv(tp16, ib, 16) == RemoteKV(16 * KV_PER_TOKEN / 8, 16 * 50e9, 25e-6)
    # TCP is one NIC per host, whatever the TP.
    tcp = remote_kv(tp2, KV_LINKS["tcp"], 2)
    assert tcp == RemoteKV(KV_PER_TOKEN, 3.125e9, 500e-6)


def test_links_and_their_overrides() -> None:
    assert {name: (link.gbytes_per_s, link.per_gpu) for name, link in KV_LINKS.items()} == {
        "nvlink": (450.0, True),
        "infiniband": (50.0, True),
        "roce": (50.0, True),
        "tcp": (3.125, False),
    }
    assert kv_link() == KV_LINKS["infiniband"]
    tuned = kv_link("roce", gbytes_per_s=25.0, latency_ms=0.1)
    assert (tuned.gbytes_per_s, tuned.latency_s, tuned.per_gpu) == (25.0, 0.0001, True)
    with pytest.raises(ValueError):
        kv_link("tcp", gbytes_per_s=0)
    with pytest.raises(ValueError, match="unknown KV link 'pcie'"):
        kv_link("pcie")


def test_the_command_line_sets_role_and_link() -> None:
    opts = parse_args(
        ["--arch", str(LLAMA_8B), "--kv-role", "kv_consumer", "--kv-link", "tcp",
         "--kv-link-gbytes-per-s", "12.5", "--kv-transfer-latency-ms", "0.2"]
    )  # fmt: skip
    assert (opts.kv_role, opts.kv_link, opts.kv_link_gbytes_per_s) == ("kv_consumer", "tcp", 12.5)
    (server,) = build_replicas(opts)
    assert server.kv_role == "kv_consumer"
    assert server.engine.kv_link == kvtransfer.KVLink("tcp", 12.5, 0.0002, per_gpu=False)
    default = parse_args(["--arch", str(LLAMA_8B)])
    assert (default.kv_role, default.kv_link) == ("kv_both", "infiniband")
    for bad in (["--kv-link", "pcie"], ["--kv-role", "both"], ["--kv-link-gbytes-per-s", "0"]):
        with pytest.raises(SystemExit):
            parse_args(["--arch", str(LLAMA_8B), *bad])


def test_exports() -> None:
    assert set(kvtransfer.__all__) == {
        "DEFAULT_KV_LINK",
        "KV_LINKS",
        "KV_ROLES",
        "BadTransferParams",
        "KVLink",
        "KVRole",
        "TransferParams",
        "block_ids",
        "kv_link",
        "offer",
        "refusal",
        "remote_kv",
    }
    assert kvtransfer.KV_ROLES == ("kv_both", "kv_producer", "kv_consumer")


def test_block_ids_survive_a_double_and_name_the_prompt() -> None:
    hashes = block_hashes(prompt(100))
    ids = block_ids(hashes)
    assert len(ids) == 100 // BLOCK_TOKENS
    assert all(0 <= i < 2**53 and float(i) == i for i in ids)
    assert ids != block_ids(block_hashes(prompt(100, start=1)))


@pytest.mark.parametrize(
    ("raw", "field", "message"),
    [
        ([1], "kv_transfer_params", "kv_transfer_params must be an object"),
        ({"remote_block_ids": "1,2"}, "kv_transfer_params.remote_block_ids", "list of integers"),
        ({"remote_block_ids": [1, "2"]}, "kv_transfer_params.remote_block_ids", "integers"),
        ({"remote_block_ids": [True]}, "kv_transfer_params.remote_block_ids", "integers"),
        ({"remote_port": "8000"}, "kv_transfer_params.remote_port", "must be an integer"),
        ({"remote_port": 70_000}, "kv_transfer_params.remote_port", "port number"),
        ({"remote_engine_id": 7}, "kv_transfer_params.remote_engine_id", "must be a string"),
        ({"remote_host": ["h"]}, "kv_transfer_params.remote_host", "must be a string"),
        ({"do_remote_prefill": "yes"}, "kv_transfer_params.do_remote_prefill", "boolean"),
        ({"tp_size": 0}, "kv_transfer_params.tp_size", "≥ 1"),
        ({"tp_size": 1.5}, "kv_transfer_params.tp_size", "must be an integer"),
        (
            {"do_remote_prefill": True, "do_remote_decode": True},
            "kv_transfer_params",
            "cannot both be true",
        ),
    ],
)
def test_malformed_params_name_their_field(raw: object, field: str, message: str) -> None:
    with pytest.raises(BadTransferParams, match=message) as caught:
        TransferParams.parse(raw)
    assert caught.value.field == field and field in str(caught.value)


def test_params_without_a_source_are_a_plain_request() -> None:
    assert TransferParams.parse(None) is None
    ask = TransferParams.parse(
        {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
         "remote_block_ids": None, "remote_host": None, "remote_port": None}
    )  # fmt: skip
    assert ask is not None and ask.prefill_call and not ask.pulls
    nowhere = TransferParams.parse({"do_remote_prefill": True, "remote_host": "h"})
    assert nowhere is not None and nowhere.decode_call and not nowhere.pulls
    full = TransferParams.parse(
        {"do_remote_prefill": True, "remote_engine_id": "e", "remote_block_ids": [],
         "remote_host": "h", "remote_port": 1, "some_future_field": {}}
    )  # fmt: skip
    assert full is not None and full.pulls and full.tp_size is None
