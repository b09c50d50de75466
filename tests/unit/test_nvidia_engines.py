"""TensorRT-LLM (trtllm-serve) and Triton (its OpenAI front end): what each is launched with for
a placement, what says it cannot run on this CPU machine, and their Prometheus text — written
from their own documentation and code — read into the common EngineLoad. Nothing here starts
either engine: neither runs without NVIDIA GPUs."""

from __future__ import annotations

import importlib.util
import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from gpufleet.controller import Directory
from gpufleet.engines import (
    ADAPTERS,
    EngineLoad,
    Placement,
    adapter_for,
    parse_triton,
    parse_trtllm,
)
from gpufleet.engines.triton import FRONTEND_ENV, TritonEngine
from gpufleet.engines.trtllm import TRTLLM_SERVE, TrtllmEngine
from gpufleet.errors import EngineUnavailableError
from gpufleet.gateway.demand import DemandMeter
from gpufleet.gateway.fairqueue import AdmissionQueues
from gpufleet.gateway.metrics import GatewayMetrics
from gpufleet.gateway.proxy import Upstream
from gpufleet.runtime import Phase, Replica
from gpufleet.spec import ModelSpec

WEIGHTS = Path("/models/hf/Qwen/Qwen2.5-7B-Instruct")


def spec(engine: str, **kw: object) -> ModelSpec:
    return ModelSpec.model_validate(
        {"source": "hf://Qwen/Qwen2.5-7B-Instruct", "engine": engine, **kw}
    )


def value(argv: tuple[str, ...], flag: str) -> str:
    return argv[argv.index(flag) + 1]


# -- TensorRT-LLM ------------------------------------------------------------------------------


def test_trtllm_takes_tp_memory_share_and_batch_from_the_placement_and_the_spec() -> None:
    placed = Placement(node="n", gpu_type="H100", gpu_indices=(2, 3), memory_fraction=0.45)
    s = spec("trtllm", contextLength=8192, routing={"maxInFlightPerReplica": 48})
    launch = TrtllmEngine().launch(
        s, weights=WEIGHTS, served_name="qwen", host="0.0.0.0", port=8123, placement=placed
    )
    argv = launch.argv
    assert argv[:2] == ("sh", "-c") and argv[3:5] == (TRTLLM_SERVE, str(WEIGHTS))
    assert value(argv, "--port") == "8123" and value(argv, "--host") == "0.0.0.0"
    assert value(argv, "--backend") == "pytorch"  # TensorRT-LLM's default: no engine build
    assert value(argv, "--tp_size") == "2"  # the placement's two GPUs
    assert value(argv, "--kv_cache_free_gpu_memory_fraction") == "0.450"
    assert value(argv, "--max_batch_size") == "48"  # what the gateway lets through at once
    assert value(argv, "--max_seq_len") == "8192"
    assert launch.env == {"CUDA_VISIBLE_DEVICES": "2,3"}
    assert launch.metrics_path == "/prometheus/metrics" == TrtllmEngine.metrics_path
    probe = launch.readiness
    assert (probe.method, probe.path) == ("POST", "/v1/completions")
    assert json.loads(probe.body or b"") == {
        "model": "qwen", "prompt": "Are you ready?", "max_tokens": 1
    }  # fmt: skip


def test_trtllm_on_one_whole_gpu_leaves_tp_and_share_to_the_engine() -> None:
    argv = (
        TrtllmEngine()
        .launch(spec("trtllm"), weights=WEIGHTS, served_name="q", host="h", port=1)
        .argv
    )
    for flag in ("--tp_size", "--kv_cache_free_gpu_memory_fraction", "--max_batch_size"):
        assert flag not in argv
    tp4 = TrtllmEngine().launch(
        spec("trtllm", resources={"gpus": 4}), weights=WEIGHTS, served_name="q", host="h", port=1
    )
    assert value(tp4.argv, "--tp_size") == "4"


def test_trtllm_checks_no_key_so_none_is_passed() -> None:
    launch = TrtllmEngine().launch(
        spec("trtllm"), weights=WEIGHTS, served_name="q", host="h", port=1, api_key="sekrit"
    )
    assert "sekrit" not in " ".join(launch.argv) and "sekrit" not in str(launch.env)


def fake_program(folder: Path, name: str) -> Path:
    """A stand-in ``name`` that prints its arguments and the options file it was given."""
    program = folder / name
    program.write_text(
        '#!/bin/sh\nfor a in "$@"; do echo "arg:$a"; done\n'
        'while [ "$1" != "--extra_llm_api_options" ]; do shift; done\necho "options:$(cat "$2")"\n'
    )
    program.chmod(program.stat().st_mode | stat.S_IXUSR)
    return program


@pytest.mark.parametrize(
    "backend,options",
    [
        ("pytorch", {"return_perf_metrics": True, "enable_iter_perf_stats": True}),
        ("tensorrt", {"return_perf_metrics": True}),  # its LLM arguments have no such field
    ],
)
def test_trtllm_starts_with_the_options_that_publish_its_prometheus_metrics(
    tmp_path: Path, backend: str, options: dict[str, bool]
) -> None:
    s = spec(
        "trtllm",
        trtllm={"backend": backend},
        resources={"gpus": 1, "gpuTypes": ["H100"]},
        engineArgs=["--config", "mine.yaml"],
    )
    launch = TrtllmEngine().launch(s, weights=WEIGHTS, served_name="q", host="h", port=7)
    fake_program(tmp_path, TRTLLM_SERVE)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "TMPDIR": str(tmp_path)}
    done = subprocess.run(launch.argv, env=env, capture_output=True, text=True, check=True)
    lines = done.stdout.splitlines()
    given = [line.removeprefix("arg:") for line in lines if line.startswith("arg:")]
    assert given[:2] == ["--extra_llm_api_options", str(tmp_path / "gpufleet-trtllm-7.yaml")]
    assert given[2] == str(WEIGHTS) and value(tuple(given), "--backend") == backend
    # A TensorRT engine's sequence length was fixed when it was built.
    assert ("--max_seq_len" in given) == (backend == "pytorch")
    # The user's own file comes after gpufleet's: trtllm-serve takes the last one.
    assert given[-2:] == ["--config", "mine.yaml"]
    (shown,) = [line.removeprefix("options:") for line in lines if line.startswith("options:")]
    assert json.loads(shown) == options


def test_trtllm_says_it_cannot_run_without_trtllm_serve(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    reason = TrtllmEngine().unavailable_reason()
    assert reason is not None and "trtllm-serve is not on PATH" in reason and "NVIDIA" in reason
    with pytest.raises(EngineUnavailableError, match="engine 'trtllm' cannot run here"):
        adapter_for("trtllm")
    fake_program(tmp_path, TRTLLM_SERVE)
    assert TrtllmEngine().unavailable_reason() is None


# -- Triton ------------------------------------------------------------------------------------


def test_triton_runs_its_openai_front_end_on_the_repository_with_the_key() -> None:
    s = spec("triton", triton={"backend": "tensorrtllm"}, engineArgs=["--tokenizer", "/t"])
    placed = Placement(node="n", gpu_indices=(1,))
    launch = TritonEngine().launch(
        s, weights=Path("/repo"), served_name="m", host="h", port=9, api_key="k", placement=placed
    )
    argv = launch.argv
    assert argv[1].endswith("openai_frontend/main.py")
    assert value(argv, "--model-repository") == "/repo"
    assert value(argv, "--backend") == "tensorrtllm"
    assert value(argv, "--openai-port") == "9" and value(argv, "--host") == "h"
    restricted = argv.index("--openai-restricted-api")
    assert argv[restricted + 1 : restricted + 4] == (
        "inference,model-repository", "Authorization", "Bearer k"
    )  # fmt: skip
    assert argv[-2:] == ("--tokenizer", "/t")
    assert launch.env["TRTLLM_ORCHESTRATOR"] == "1" and launch.env["CUDA_VISIBLE_DEVICES"] == "1"
    assert launch.liveness_path == "/health/ready"  # the front end has no /health
    assert launch.metrics_path == "/metrics"
    assert json.loads(launch.readiness.body or b"")["model"] == "m"


def test_triton_without_a_key_restricts_nothing_and_vllm_needs_no_orchestrator() -> None:
    launch = TritonEngine().launch(
        spec("triton"), weights=Path("/r"), served_name="m", host="h", port=9
    )
    assert "--openai-restricted-api" not in launch.argv
    assert value(launch.argv, "--backend") == "vllm"
    assert "TRTLLM_ORCHESTRATOR" not in launch.env


def test_triton_says_it_cannot_run_without_its_front_end_or_bindings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(FRONTEND_ENV, str(tmp_path / "main.py"))
    reason = TritonEngine().unavailable_reason()
    assert reason is not None and "OpenAI front end is not here" in reason
    with pytest.raises(EngineUnavailableError, match="engine 'triton' cannot run here"):
        adapter_for("triton")
    (tmp_path / "main.py").write_text("")
    reason = TritonEngine().unavailable_reason()
    if importlib.util.find_spec("tritonserver") is None:  # no Triton wheel on this machine
        assert reason is not None and "'tritonserver'" in reason
    else:
        assert reason is None


# -- Prometheus text ---------------------------------------------------------------------------

# trtllm-serve's /prometheus/metrics, names and labels as tensorrt_llm/metrics/collector.py makes
# them (1.3.0 pre-releases): iteration gauges, and per-request counters.
TRTLLM = """\
# HELP trtllm_num_requests_running Number of active requests
# TYPE trtllm_num_requests_running gauge
trtllm_num_requests_running{engine_type="trtllm",model_name="qwen"} 6.0
# TYPE trtllm_num_requests_waiting gauge
trtllm_num_requests_waiting{engine_type="trtllm",model_name="qwen"} 2.0
# TYPE trtllm_kv_cache_utilization gauge
trtllm_kv_cache_utilization{engine_type="trtllm",model_name="qwen"} 0.4375
# TYPE trtllm_kv_cache_hit_rate gauge
trtllm_kv_cache_hit_rate{engine_type="trtllm",model_name="qwen"} 0.3
# TYPE trtllm_prompt_tokens_total counter
trtllm_prompt_tokens_total{engine_type="trtllm",model_name="qwen"} 2000.0
# TYPE trtllm_prompt_cached_tokens_total counter
trtllm_prompt_cached_tokens_total{engine_type="trtllm",model_name="qwen"} 512.0
trtllm_time_to_first_token_seconds_bucket{engine_type="trtllm",le="0.1",model_name="qwen"} 4.0
"""

# Before the 1.3 gauges (1.2 and older): request histograms only.
TRTLLM_1_2 = """\
trtllm_request_success_total{finished_reason="stop",model_name="undefined"} 9.0
trtllm_e2e_request_latency_seconds_sum{model_name="undefined"} 4.5
"""

# Triton's TensorRT-LLM backend: the sample in the tensorrtllm_backend README ("Triton
# Metrics"), and Triton's own pending count for two models of the ensemble.
TRITON_TRTLLM = """\
# HELP nv_trt_llm_request_metrics TRT LLM request metrics
# TYPE nv_trt_llm_request_metrics gauge
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="waiting",version="1"} 1
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="context",version="1"} 1
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="scheduled",version="1"} 1
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="max",version="1"} 512
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="active",version="1"} 3
# HELP nv_trt_llm_kv_cache_block_metrics TRT LLM KV cache block metrics
# TYPE nv_trt_llm_kv_cache_block_metrics gauge
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="fraction",model="tensorrt_llm",version="1"} 0.4875
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="tokens_per",model="tensorrt_llm",version="1"} 64
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="used",model="tensorrt_llm",version="1"} 3120
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="free",model="tensorrt_llm",version="1"} 3119
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="max",model="tensorrt_llm",version="1"} 6239
# HELP nv_inference_pending_request_count Instantaneous number of pending requests awaiting execution per-model.
# TYPE nv_inference_pending_request_count gauge
nv_inference_pending_request_count{model="tensorrt_llm",version="1"} 7
nv_inference_pending_request_count{model="ensemble",version="1"} 5
"""

# Triton's vLLM backend: its README's sample (counters and histograms only) and Triton's own
# pending count for the model.
TRITON_VLLM = """\
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{model="vllm_model",version="1"} 10
vllm:generation_tokens_total{model="vllm_model",version="1"} 16
vllm:time_to_first_token_seconds_count{model="vllm_model",version="1"} 1
nv_inference_pending_request_count{model="vllm_model",version="1"} 4
nv_gpu_utilization{gpu_uuid="GPU-abc123"} 0.78
"""


def test_trtllm_serve_metrics() -> None:
    assert parse_trtllm(TRTLLM) == EngineLoad(
        running=6, waiting=2, kv_usage=0.4375, prefix_hits=512, prefix_queries=2000
    )
    assert ADAPTERS["trtllm"].parse_metrics(TRTLLM) == parse_trtllm(TRTLLM)


def test_trtllm_serve_without_the_gauges_leaves_kv_use_unknown() -> None:
    assert parse_trtllm(TRTLLM_1_2) == EngineLoad(kv_usage=None)


def test_triton_tensorrt_llm_backend_metrics() -> None:
    load = parse_triton(TRITON_TRTLLM)
    # The backend's own queue, not Triton's pending counts; KV use from blocks used / max.
    assert (load.running, load.waiting) == (3, 1)
    assert load.kv_usage == pytest.approx(3120 / 6239)
    fraction_only = "\n".join(
        line for line in TRITON_TRTLLM.splitlines() if '"used"' not in line and '"max"' not in line
    )
    assert parse_triton(fraction_only).kv_usage == pytest.approx(0.4875)


def test_triton_vllm_backend_publishes_a_queue_but_no_running_count_or_kv_use() -> None:
    assert parse_triton(TRITON_VLLM) == EngineLoad(running=0, waiting=4, kv_usage=None)
    assert ADAPTERS["triton"].parse_metrics(TRITON_VLLM) == parse_triton(TRITON_VLLM)


def test_an_engine_without_kv_use_does_not_read_as_an_empty_cache_to_the_autoscaler() -> None:
    upstream = Upstream(GatewayMetrics())
    meter = DemandMeter(Directory(), AdmissionQueues(lambda _: 1), upstream)
    upstream.loads["triton"] = parse_triton(TRITON_VLLM)
    upstream.loads["trt"] = parse_trtllm(TRTLLM)
    replicas = [Replica(rid, "m", 1, Phase.READY) for rid in ("triton", "trt")]
    assert meter._engines(replicas) == (0.4375, 6)  # KV: trt's alone; waiting: both
    assert meter._engines(replicas[:1]) == (None, 4)
