"""One attempt of a GPU job as a child process (``runtime/jobs.py``), on a real training job.

The job is ``tests/data/jobs/sgd.py``: linear regression by SGD with numpy, deterministic,
checkpointing every 500 steps and on SIGTERM. Its ``--hold-at-step`` keeps a fresh attempt at a
known step until it is signalled, so a test preempts it mid-run without racing its end; the tests
wait on its progress file and on the processes themselves, never on a sleep.
"""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gpufleet.runtime.jobs import (
    AttemptResult,
    JobAttempt,
    LocalJobRunner,
    Outcome,
    RunningAttempt,
    attempt_env,
)
from tests.conftest import eventually

SGD = Path(__file__).parents[1] / "data" / "jobs" / "sgd.py"
STEPS = 3000


@pytest.fixture
async def runner(tmp_path: Path) -> AsyncIterator[LocalJobRunner]:
    r = LocalJobRunner(tmp_path / "logs")
    yield r
    await r.close()


def sgd(
    tmp_path: Path,
    *args: str,
    job: str = "train",
    attempt: int = 1,
    resumed: bool = False,
    **kw: Any,
) -> JobAttempt:
    out = tmp_path / f"{job}.json"
    return JobAttempt(
        job=job,
        attempt=attempt,
        command=[sys.executable, str(SGD), "--out", str(out), "--steps", str(STEPS), *args],
        checkpoint_dir=tmp_path / "checkpoints" / job,
        resumed=resumed,
        **kw,
    )


def progress(attempt: JobAttempt) -> dict[str, Any] | None:
    path = attempt.checkpoint_dir / "progress.json"
    return json.loads(path.read_text()) if path.exists() else None


def checkpoint_step(attempt: JobAttempt) -> int:
    with np.load(attempt.checkpoint_dir / "checkpoint.npz") as z:
        return int(z["step"])


async def holding(running: RunningAttempt) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        p = progress(running.attempt)
        return p if p is not None and p["holding"] else None

    return await eventually(check, "the job holds at its step")


def alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie has ended: only its exit status is left)."""
    try:
        return _state(Path(f"/proc/{pid}/stat").read_text()) not in {"Z", "X"}
    except (FileNotFoundError, ProcessLookupError):
        return False


def live_in_group(pgid: int) -> list[int]:
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        fields = text.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] not in {"Z", "X"}:
            pids.append(int(stat.parent.name))
    return pids


def _state(stat: str) -> str:
    return stat.rsplit(")", 1)[1].split()[0]


async def gone(pgid: int) -> None:
    await eventually(lambda: not live_in_group(pgid), f"process group {pgid} is empty")


async def reference(tmp_path: Path, runner: LocalJobRunner) -> bytes:
    """The final weights of an uninterrupted run."""
    attempt = sgd(tmp_path, job="reference")
    result = await (await runner.start(attempt)).wait()
    assert result.outcome is Outcome.SUCCEEDED, result
    return (tmp_path / "reference.json").read_bytes()


async def test_an_uninterrupted_run_succeeds(tmp_path: Path, runner: LocalJobRunner) -> None:
    attempt = sgd(tmp_path)
    running = await runner.start(attempt)
    assert running.pid is not None
    result = await running.wait()

    assert result == AttemptResult(
        job="train",
        attempt=1,
        outcome=Outcome.SUCCEEDED,
        exit_code=0,
        killed=False,
        reason="exited with code 0",
        duration_s=result.duration_s,
        last_log_lines=result.last_log_lines,
    )
    assert result.duration_s > 0
    assert result.last_log_lines[-1].startswith(f"sgd: done after {STEPS} steps")
    weights = json.loads((tmp_path / "train.json").read_text())
    assert weights["steps"] == STEPS and len(weights["weights"]) == 8
    assert checkpoint_step(attempt) == STEPS
    await gone(running.pid)
    assert runner.running("train") is None


async def test_preempted_then_resumed_ends_exactly_as_an_uninterrupted_run(
    tmp_path: Path, runner: LocalJobRunner
) -> None:
    expected = await reference(tmp_path, runner)

    first = sgd(tmp_path, "--hold-at-step", "750", grace_s=30.0)
    running = await runner.start(first)
    assert runner.running("train") is running
    assert (await holding(running))["checkpoint_step"] == 500  # past the first checkpoint
    running.preempt("interactive demand for llama")
    result = await running.wait()

    assert result.outcome is Outcome.PREEMPTED
    assert result.reason == "interactive demand for llama"
    assert not result.killed and result.exit_code == 143
    assert checkpoint_step(first) == 750  # saved on SIGTERM, between periodic checkpoints
    assert "sgd: SIGTERM at step 750: checkpoint saved, stopping" in result.last_log_lines
    assert not (tmp_path / "train.json").exists()
    assert running.pid is not None
    await gone(running.pid)

    second = sgd(tmp_path, "--hold-at-step", "750", attempt=2, resumed=True)
    resumed = await (await runner.start(second)).wait()
    assert resumed.outcome is Outcome.SUCCEEDED, resumed
    assert (tmp_path / "train.json").read_bytes() == expected

    first_log = (await runner.logs("train", 1))[1:]
    second_log = await runner.logs("train", 2)
    assert "sgd: training steps 0..3000" in first_log
    assert "sgd: resumed from step 750" in second_log
    assert not any("resumed" in line for line in first_log)
    assert second_log[0].startswith("--- gpufleet: job train attempt 2 (resumed): ")
    assert second_log[-1].startswith("--- gpufleet: attempt 2 succeeded: exited with code 0")


async def test_a_job_ignoring_sigterm_is_killed_after_its_grace_and_resumes_from_its_last_checkpoint(
    tmp_path: Path, runner: LocalJobRunner
) -> None:
    expected = await reference(tmp_path, runner)

    first = sgd(tmp_path, "--hold-at-step", "750", "--ignore-sigterm", grace_s=0.2)
    running = await runner.start(first)
    await holding(running)
    running.preempt("interactive demand for llama")
    result = await running.wait()

    assert result.outcome is Outcome.PREEMPTED
    assert result.killed and result.exit_code == -signal.SIGKILL
    assert result.reason == (
        "interactive demand for llama; still running 0.2 s after SIGTERM: killed"
    )
    assert result.duration_s >= 0.2
    assert checkpoint_step(first) == 500  # nothing saved on the ignored SIGTERM
    assert running.pid is not None
    await gone(running.pid)

    second = sgd(tmp_path, "--hold-at-step", "750", "--ignore-sigterm", attempt=2, resumed=True)
    resumed = await (await runner.start(second)).wait()
    assert resumed.outcome is Outcome.SUCCEEDED, resumed
    assert "sgd: resumed from step 500" in await runner.logs("train", 2)
    assert (tmp_path / "train.json").read_bytes() == expected


async def test_a_crash_fails_with_its_last_log_lines(
    tmp_path: Path, runner: LocalJobRunner
) -> None:
    running = await runner.start(sgd(tmp_path, "--crash-at-step", "700"))
    result = await running.wait()

    assert result.outcome is Outcome.FAILED
    assert result.exit_code == 3 and not result.killed
    assert result.reason == "exited with code 3"
    assert result.last_log_lines[-1] == "sgd: simulated crash at step 700"
    assert result.last_log_lines[-2].startswith("sgd: step 500 loss ")
    [closing] = await running.tail(1)
    assert closing.startswith("--- gpufleet: attempt 1 failed: exited with code 3 (")


async def test_a_process_killed_by_a_signal_not_ours_failed(
    tmp_path: Path, runner: LocalJobRunner
) -> None:
    running = await runner.start(sgd(tmp_path, "--hold-at-step", "10"))
    await holding(running)
    assert running.pid is not None
    os.kill(running.pid, signal.SIGUSR1)
    result = await running.wait()
    assert result.outcome is Outcome.FAILED
    assert result.exit_code == -signal.SIGUSR1
    assert result.reason == "killed by SIGUSR1"


async def test_the_environment_of_an_attempt(
    tmp_path: Path, runner: LocalJobRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GPUFLEET_RESUMED", "1")  # inherited, yet a fresh attempt must not see it
    monkeypatch.setenv("FROM_GPUFLEET", "inherited")
    names = [
        "GPUFLEET_JOB",
        "GPUFLEET_ATTEMPT",
        "GPUFLEET_CHECKPOINT_DIR",
        "GPUFLEET_RESUMED",
        "CUDA_VISIBLE_DEVICES",
        "FROM_GPUFLEET",
        "FROM_JOB",
    ]
    script = f"import json, os; print(json.dumps([os.getcwd(), {{k: os.environ.get(k) for k in {names}}}]))"
    work = tmp_path / "work"
    work.mkdir()

    async def run(attempt: int, resumed: bool, gpus: list[int]) -> tuple[str, dict[str, str]]:
        spec = JobAttempt(
            job="env",
            attempt=attempt,
            command=[sys.executable, "-c", script],
            env={"FROM_JOB": "job", "CUDA_VISIBLE_DEVICES": "7", "GPUFLEET_JOB": "other"},
            cwd=work,
            checkpoint_dir=tmp_path / "ckpt",
            resumed=resumed,
            gpus=gpus,
        )
        result = await (await runner.start(spec)).wait()
        assert result.outcome is Outcome.SUCCEEDED, result
        cwd, env = json.loads(result.last_log_lines[-1])
        return cwd, env

    cwd, env = await run(1, resumed=False, gpus=[])
    assert cwd == str(work)
    assert env == {
        "GPUFLEET_JOB": "env",
        "GPUFLEET_ATTEMPT": "1",
        "GPUFLEET_CHECKPOINT_DIR": str(tmp_path / "ckpt"),
        "GPUFLEET_RESUMED": None,
        "CUDA_VISIBLE_DEVICES": "",
        "FROM_GPUFLEET": "inherited",
        "FROM_JOB": "job",
    }
    assert (tmp_path / "ckpt").is_dir()

    _, env = await run(2, resumed=True, gpus=[0, 2])
    assert env["GPUFLEET_ATTEMPT"] == "2"
    assert env["GPUFLEET_RESUMED"] == "1"
    assert env["CUDA_VISIBLE_DEVICES"] == "0,2"


def test_the_checkpoint_directory_is_absolute(monkeypatch: pytest.MonkeyPatch) -> None:
    attempt = JobAttempt(job="j", attempt=1, command=["true"], checkpoint_dir=Path("ckpt"))
    env = attempt_env(attempt, {"PATH": "/bin"})
    assert env["GPUFLEET_CHECKPOINT_DIR"] == str(Path.cwd() / "ckpt")
    assert env["PATH"] == "/bin"


async def test_nothing_of_a_preempted_job_is_left_behind(
    tmp_path: Path, runner: LocalJobRunner
) -> None:
    # The job's own child ignores SIGTERM and would outlive it: the group's SIGKILL ends it.
    stubborn = "sh -c 'trap \"\" TERM; echo grandchild $$; exec sleep 600' & wait"
    attempt = JobAttempt(
        job="tree", attempt=1, command=["sh", "-c", stubborn], checkpoint_dir=tmp_path / "c"
    )
    running = await runner.start(attempt)
    line = await eventually(
        lambda: [
            x for x in running.log_path.read_text().splitlines() if x.startswith("grandchild")
        ],
        "the grandchild is running",
    )
    grandchild = int(line[0].split()[1])
    assert running.pid is not None and grandchild in live_in_group(running.pid)

    running.preempt("demand")
    result = await running.wait()
    assert result.outcome is Outcome.PREEMPTED and not result.killed
    await gone(running.pid)
    assert not alive(grandchild)


async def test_nothing_is_left_behind_by_a_job_that_exits(
    tmp_path: Path, runner: LocalJobRunner
) -> None:
    attempt = JobAttempt(
        job="tree",
        attempt=1,
        command=["sh", "-c", "sleep 600 & echo grandchild $!"],
        checkpoint_dir=tmp_path / "c",
    )
    running = await runner.start(attempt)
    result = await running.wait()
    assert result.outcome is Outcome.SUCCEEDED
    grandchild = int(result.last_log_lines[-1].split()[1])
    assert running.pid is not None
    await gone(running.pid)
    await eventually(lambda: not alive(grandchild), "the grandchild is gone")


async def test_a_job_dies_with_gpufleet(tmp_path: Path) -> None:
    """Killed outright, gpufleet cannot stop its jobs: the kernel does (PR_SET_PDEATHSIG)."""
    attempt = sgd(tmp_path, "--hold-at-step", "10")
    script = (
        "import asyncio, pickle, sys\n"
        "from gpufleet.runtime.jobs import LocalJobRunner\n"
        "async def main():\n"
        "    runner = LocalJobRunner(__import__('pathlib').Path(sys.argv[1]))\n"
        "    running = await runner.start(pickle.loads(bytes.fromhex(sys.argv[2])))\n"
        "    print(running.pid, flush=True)\n"
        "    await asyncio.Event().wait()\n"
        "asyncio.run(main())\n"
    )
    gpufleet = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        script,
        str(tmp_path / "logs"),
        pickle.dumps(attempt).hex(),
        stdout=asyncio.subprocess.PIPE,
    )
    assert gpufleet.stdout is not None
    pid = int(await gpufleet.stdout.readline())
    await eventually(lambda: (p := progress(attempt)) is not None and p["holding"], "holding")
    gpufleet.kill()
    await gpufleet.wait()
    await eventually(lambda: not alive(pid), "the job died with its parent")


async def test_past_its_max_runtime_an_attempt_is_stopped_gracefully(
    tmp_path: Path, runner: LocalJobRunner
) -> None:
    attempt = sgd(tmp_path, "--hold-at-step", "10", max_runtime_s=0.5)
    result = await (await runner.start(attempt)).wait()
    assert result.outcome is Outcome.TIMED_OUT and not result.killed
    assert result.reason == "ran past its maxRuntime of 0.5 s"
    assert result.duration_s >= 0.5


async def test_a_timed_out_job_ignoring_sigterm_is_killed(
    tmp_path: Path, runner: LocalJobRunner
) -> None:
    attempt = sgd(
        tmp_path, "--hold-at-step", "10", "--ignore-sigterm", max_runtime_s=0.5, grace_s=0.1
    )
    # Ignored from its first instruction (an ignored signal stays ignored across exec), so the
    # deadline cannot catch the job before it has chosen to ignore SIGTERM itself.
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        running = await runner.start(attempt)
    finally:
        signal.signal(signal.SIGTERM, previous)
    result = await running.wait()
    assert result.outcome is Outcome.TIMED_OUT and result.killed
    assert result.exit_code == -signal.SIGKILL
    assert (
        result.reason
        == "ran past its maxRuntime of 0.5 s; still running 0.1 s after SIGTERM: killed"
    )


async def test_cancel_wins_over_preemption(tmp_path: Path, runner: LocalJobRunner) -> None:
    running = await runner.start(sgd(tmp_path, "--hold-at-step", "10"))
    await holding(running)
    running.preempt("demand")
    running.cancel("cancelled by alice")
    running.preempt("more demand")
    result = await running.wait()
    assert result.outcome is Outcome.CANCELLED
    assert result.reason == "cancelled by alice"


async def test_a_stop_asked_after_the_end_changes_nothing(
    tmp_path: Path, runner: LocalJobRunner
) -> None:
    running = await runner.start(sgd(tmp_path))
    first = await running.wait()
    running.preempt("too late")
    assert await running.wait() == first
    assert first.outcome is Outcome.SUCCEEDED


async def test_a_command_that_cannot_start_fails_the_attempt(
    tmp_path: Path, runner: LocalJobRunner
) -> None:
    attempt = JobAttempt(
        job="missing",
        attempt=1,
        command=[str(tmp_path / "no-such-program")],
        checkpoint_dir=tmp_path,
    )
    running = await runner.start(attempt)
    assert running.pid is None
    result = await running.wait()
    assert result.outcome is Outcome.FAILED and result.exit_code is None
    assert result.reason.startswith("could not start: [Errno 2]")
    assert result.last_log_lines[-1] == f"--- gpufleet: {result.reason}"


async def test_one_attempt_at_a_time_and_close_preempts(
    tmp_path: Path, runner: LocalJobRunner
) -> None:
    attempt = sgd(tmp_path, "--hold-at-step", "10")
    running = await runner.start(attempt)
    with pytest.raises(RuntimeError, match="already runs attempt 1"):
        await runner.start(sgd(tmp_path, attempt=2))
    await holding(running)

    [result] = await runner.close()
    assert result.outcome is Outcome.PREEMPTED
    assert result.reason == "gpufleet is stopping"
    assert checkpoint_step(attempt) == 10
    assert runner.running("train") is None


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"job": "a/b"}, "cannot name a log directory"),
        ({"job": ".."}, "cannot name a log directory"),
        ({"attempt": 0}, "start at 1"),
        ({"command": []}, "empty command"),
        ({"grace_s": -1.0}, "negative"),
        ({"max_runtime_s": 0.0}, "not positive"),
    ],
)
def test_an_attempt_is_validated(changes: dict[str, Any], message: str) -> None:
    fields: dict[str, Any] = {
        "job": "j",
        "attempt": 1,
        "command": ["true"],
        "checkpoint_dir": Path("c"),
        **changes,
    }
    with pytest.raises(ValueError, match=message):
        JobAttempt(**fields)
