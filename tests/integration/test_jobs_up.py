"""GPU jobs under `gpufleet up`: a real CPU training job (tests/data/jobs/sgd.py, numpy SGD) on a
declared inventory of one emulated GPU, which an interactive model (the engine emulator,
standing in for a GPU engine) also needs.

The preemption is the planner's: the model is scaled to zero, so the job gets the GPU; a chat
request wakes the model, the plan gives the model the GPU (jobs rank below every model), and
the scheduler stops the job with SIGTERM — it writes its checkpoint — and queues it. gpufleet is
restarted while the job waits: the job is neither lost nor started twice. Once the model has
scaled back to zero the job resumes from its checkpoint and finishes with exactly the weights of
an uninterrupted run; its attempts are in the ledger and every transition in the events.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from openai import OpenAI

from tests.integration.fleet import ADMIN_KEY, Fleet, gpufleet, start_fleet, wait_until

DATA = Path(__file__).parents[1] / "data"
SGD = DATA / "jobs" / "sgd.py"
STEPS, HOLD, EVERY = 3000, 1000, 500

INVENTORY = """\
apiVersion: gpufleet.io/v1alpha1
kind: Inventory
metadata: {name: one-gpu}
spec:
  nodes:
  - name: box
    gpus: [{type: H100, count: 1}]
"""


def _models(tmp: Path) -> Path:
    path = tmp / "models.yaml"
    path.write_text(
        f"""\
apiVersion: gpufleet.io/v1alpha1
kind: Model
metadata: {{name: chat}}
spec:
  source: file:{DATA / "configs" / "llama-3-8b.json"}
  engine: emulator
  resources: {{gpus: 1, gpuTypes: [H100]}}
  replicas: {{min: 0, max: 1}}
  autoscaling: {{scaleToZeroAfter: 3s, scaleDownDelay: 0s}}
"""
    )
    (tmp / "inventory.yaml").write_text(INVENTORY)
    return path


def _job(tmp: Path, name: str, out: Path, *extra: str) -> Path:
    path = tmp / f"{name}.yaml"
    command = [sys.executable, str(SGD), "--out", str(out), "--steps", str(STEPS),
               "--checkpoint-every", str(EVERY), *extra]  # fmt: skip
    path.write_text(
        f"""\
apiVersion: gpufleet.io/v1alpha1
kind: GpuJob
metadata: {{name: {name}}}
spec:
  command: {json.dumps(command)}
  resources: {{gpus: 1}}
  checkpoint: {{path: {tmp / name / "ckpt"}, graceSeconds: 60}}
  maxRuntime: 10m
  retries: 1
"""
    )
    return path


def _reference(tmp: Path) -> Any:
    """The weights of an uninterrupted run of the same job, outside gpufleet."""
    out = tmp / "reference.json"
    env = {**os.environ, "GPUFLEET_CHECKPOINT_DIR": str(tmp / "reference-ckpt")}
    env.pop("GPUFLEET_RESUMED", None)
    done = subprocess.run(
        [sys.executable, str(SGD), "--out", str(out), "--steps", str(STEPS)],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(out.read_text())


def _up(tmp: Path, models: Path) -> Fleet:
    return start_fleet(tmp / "data", models, options=("--inventory", str(tmp / "inventory.yaml")))


def _job_row(fleet: Fleet, name: str) -> dict[str, Any]:
    row: dict[str, Any] = fleet.admin(f"/admin/v1/jobs/{name}")
    return row


def _held(ckpt: Path) -> bool:
    try:
        progress = json.loads((ckpt / "progress.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(progress.get("holding"))


def _events(fleet: Fleet, name: str) -> list[str]:
    return [e["reason"] for e in fleet.admin(f"/admin/v1/events?model={name}")["events"]]


def test_a_job_is_preempted_for_an_interactive_model_and_resumes_to_the_same_result(
    tmp_path: Path,
) -> None:
    models = _models(tmp_path)
    reference = _reference(tmp_path)
    out, ckpt = tmp_path / "train.json", tmp_path / "train" / "ckpt"
    spec = _job(tmp_path, "train", out, "--hold-at-step", str(HOLD))
    fleet = _up(tmp_path, models)
    env = {"GPUFLEET_SERVER": fleet.server}
    try:
        submitted = gpufleet("jobs", "submit", "-f", str(spec), env=env)
        assert submitted.returncode == 0, submitted.stderr
        assert "gpujob/train queued" in submitted.stdout
        # Nothing else needs the GPU: the job runs, and holds at step 1000 mid-run.
        wait_until(lambda: _job_row(fleet, "train")["phase"] == "Running", timeout=60)
        wait_until(lambda: _held(ckpt), timeout=120)
        assert _job_row(fleet, "train")["placement"]["gpus"] == [0]

        # Interactive demand: the model wakes; the plan gives it the job's GPU.
        client = OpenAI(base_url=fleet.base_url, api_key=ADMIN_KEY, max_retries=0, timeout=120)
        answers: list[Any] = []
        chat = threading.Thread(
            target=lambda: answers.append(
                client.chat.completions.create(
                    model="chat", messages=[{"role": "user", "content": "hi"}], max_tokens=4
                )
            )
        )
        chat.start()
        preempted = wait_until(
            lambda: (j := _job_row(fleet, "train"))["preemptions"] == 1 and j, timeout=120
        )
        assert preempted["phase"] == "Queued"
        events = fleet.admin("/admin/v1/events?model=train")["events"]
        (preempting,) = [e for e in events if e["reason"] == "Preempting"]
        assert "its GPUs are needed: given to chat#0" in preempting["message"]
        chat.join(timeout=120)
        assert answers and answers[0].choices, "the interactive request was served"
        progress = json.loads((ckpt / "progress.json").read_text())
        assert progress["step"] == HOLD  # its checkpoint on SIGTERM, at the step it held
        listed = gpufleet("jobs", "list", env=env)
        assert listed.returncode == 0 and "train" in listed.stdout, listed.stderr

        # gpufleet restarts while the job waits: still one job, still queued, not re-run yet.
        assert fleet.stop() == 0
        fleet = _up(tmp_path, models)
        env = {"GPUFLEET_SERVER": fleet.server}
        row = _job_row(fleet, "train")
        assert (row["attempt"], row["preemptions"]) == (1, 1)

        # The model idles back to zero: the job resumes from its checkpoint and finishes.
        done = wait_until(
            lambda: (j := _job_row(fleet, "train"))["phase"] in ("Succeeded", "Failed") and j,
            timeout=180,
        )
        assert done["phase"] == "Succeeded", done["reason"]
        assert done["attempt"] == 2
        assert json.loads(out.read_text()) == reference  # bit-identical to the uninterrupted run
        reasons = _events(fleet, "train")
        for reason in ("Submitted", "Started", "Preempting", "Preempted", "Resumed", "Succeeded"):
            assert reason in reasons, (reason, reasons)
        logs = gpufleet("jobs", "logs", "train", "--attempt", "2", env=env)
        assert "resumed from step 1000" in logs.stdout, logs.stdout
        # Both attempts' GPU time is in the ledger, for the job's tenant.
        rows = fleet.admin("/admin/v1/usage/requests?since=1d")["requests"]
        attempts = [r for r in rows if r["route"] == "jobs" and r["model"] == "train"]
        assert len(attempts) == 2 and all(r["gpu_seconds"] > 0 for r in attempts)
        assert done["cost_usd"] > 0
        # The cost report counts its GPUs as placed and used, under the job's name.
        report = fleet.admin("/admin/v1/report?by=model&since=1d")
        (line,) = [ln for ln in report["lines"] if ln["model"] == "train"]
        assert line["gpu_hours_placed"] > 0 and line["requests"] == 2
        assert line["idle_cost"] <= 0.05 * line["placed_cost"]  # a job is busy while it holds
    finally:
        assert fleet.stop() == 0


def test_a_crashing_job_is_retried_then_failed_with_its_last_lines(tmp_path: Path) -> None:
    models = _models(tmp_path)
    spec = _job(tmp_path, "crashy", tmp_path / "crashy.json", "--crash-at-step", "700")
    fleet = _up(tmp_path, models)
    try:
        submitted = gpufleet(
            "jobs", "submit", "-f", str(spec), env={"GPUFLEET_SERVER": fleet.server}
        )
        assert submitted.returncode == 0, submitted.stderr
        failed = wait_until(
            lambda: (j := _job_row(fleet, "crashy"))["phase"] == "Failed" and j, timeout=120
        )
        assert (failed["attempt"], failed["failures"]) == (2, 2)  # retries: 1
        events = fleet.admin("/admin/v1/events?model=crashy")["events"]
        (retry,) = [e for e in events if e["reason"] == "Retrying"]
        (final,) = [e for e in events if e["reason"] == "Failed"]
        assert "crash" in final["message"].lower() and "Last lines" in final["message"]
        assert "retry 1 of 1" in retry["message"]
    finally:
        assert fleet.stop() == 0


def test_a_job_running_when_gpufleet_is_killed_resumes_once_after_the_restart(
    tmp_path: Path,
) -> None:
    """gpufleet dies outright (SIGKILL) while the job runs: the kernel takes the job with it;
    the restarted gpufleet queues it again and it resumes from its last periodic checkpoint —
    one job, one attempt at a time, the same result."""
    models = _models(tmp_path)
    reference = _reference(tmp_path)
    out, ckpt = tmp_path / "train.json", tmp_path / "train" / "ckpt"
    spec = _job(tmp_path, "train", out, "--hold-at-step", str(HOLD))
    fleet = _up(tmp_path, models)
    try:
        submitted = gpufleet(
            "jobs", "submit", "-f", str(spec), env={"GPUFLEET_SERVER": fleet.server}
        )
        assert submitted.returncode == 0, submitted.stderr
        wait_until(lambda: _held(ckpt), timeout=120)
        holder = _holders(out)
        assert len(holder) == 1
        assert fleet.stop(signal.SIGKILL) == -signal.SIGKILL
        wait_until(lambda: not _holders(out), timeout=30)  # the job went with gpufleet

        fleet = _up(tmp_path, models)
        done = wait_until(
            lambda: (j := _job_row(fleet, "train"))["phase"] in ("Succeeded", "Failed") and j,
            timeout=180,
        )
        assert done["phase"] == "Succeeded", done["reason"]
        assert (done["attempt"], done["preemptions"]) == (2, 0)
        assert json.loads(out.read_text()) == reference
        assert "Requeued" in _events(fleet, "train")
    finally:
        assert fleet.stop() == 0


def _holders(out: Path) -> list[int]:
    """The processes running this job's command (its ``--out`` path is unique to the test)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if str(out).encode() in cmdline and state != "Z":
            found.append(int(proc.name))
    return found
