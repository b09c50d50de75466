"""One attempt of a GPU job (``kind: GpuJob``) as a child process of this one (``gpufleet up``).

A job is not an engine: it has no port and no readiness, it is meant to end, and it is stopped on
purpose — preempted when interactive work needs its GPUs, or past its ``maxRuntime`` — to start
again later as a new *attempt* that resumes from its checkpoint. This module runs exactly one
attempt and says how it ended; what comes next (requeue, retry, give up) is the controller's
choice, made from the outcome.

Processes are handled as the local runtime handles engines, with its helpers: the child runs in
its own session and process group, is stopped by group — SIGTERM, then SIGKILL once the job's
grace period has passed (the contract of Kubernetes' ``terminationGracePeriodSeconds``) — and the
kernel kills it (``PR_SET_PDEATHSIG``) if gpufleet dies outright. When the attempt's main process
ends, by itself or not, whatever it left in its group is killed too: a stray data loader must not
keep a GPU that the planner has given to someone else.

The child's environment is gpufleet's, then the job's ``env``, then what gpufleet decides and a
job cannot override: ``CUDA_VISIBLE_DEVICES`` (the planner's GPUs; empty means none, so a job
placed on no GPU cannot take one), ``GPUFLEET_JOB``, ``GPUFLEET_ATTEMPT``,
``GPUFLEET_CHECKPOINT_DIR`` (absolute, created if missing) and ``GPUFLEET_RESUMED=1`` only when
the attempt resumes — removed otherwise, even if inherited, so a fresh start is never mistaken
for a resumption.

How an attempt ends (``Outcome``); ``AttemptResult.killed`` adds whether it had to be SIGKILLed
because it outlived its grace period, whatever the outcome:

- ``succeeded``: exited 0 before anyone asked it to stop;
- ``failed``: exited non-zero, or was killed by a signal that was not ours, or could not be
  started at all (``exit_code`` None), before anyone asked it to stop;
- ``preempted``: stopped by ``preempt`` (demand, a schedule window's end, gpufleet stopping):
  the job goes back to the queue and resumes;
- ``timed_out``: stopped because it ran past ``max_runtime_s``;
- ``cancelled``: stopped by ``cancel``.

Once a stop has been signalled, the exit code no longer decides: a job may save and exit with
any code. A process that exits before the signal reaches it keeps its own outcome, so a job that
finished is not run again. A ``cancel`` overrides an earlier preemption or time-out (the job is
not to resume); otherwise the first stop's reason stands.

Each attempt logs stdout and stderr to ``<logs_dir>/<job>/attempt-<n>.log``, between a line of
gpufleet's with the command and one with the outcome; the result carries the job's own last
lines (for the event that reports a failure).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from gpufleet.runtime.local import _parent_death_hook, _signal_group, _tail

__all__ = [
    "AttemptResult",
    "JobAttempt",
    "LocalJobRunner",
    "Outcome",
    "RunningAttempt",
    "attempt_env",
]


class Outcome(enum.StrEnum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    PREEMPTED = "preempted"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"


@dataclass(frozen=True, kw_only=True)
class JobAttempt:
    """What to run for one attempt, in plain values (the controller derives them from the spec
    and the plan)."""

    job: str
    attempt: int
    command: list[str]
    checkpoint_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    resumed: bool = False
    #: Host GPU indices, as ``CUDA_VISIBLE_DEVICES``; empty: no GPU.
    gpus: list[int] = field(default_factory=list)
    grace_s: float = 30.0
    max_runtime_s: float | None = None
    #: Where the planner put it — its (first) node and a gang's other nodes — and its image:
    #: what a runner on a cluster needs; the local runner runs here, the command as it is.
    node: str | None = None
    workers: tuple[str, ...] = ()
    image: str | None = None

    def __post_init__(self) -> None:
        if not self.job or "/" in self.job or self.job in {".", ".."}:
            raise ValueError(f"job name {self.job!r} cannot name a log directory")
        if self.attempt < 1:
            raise ValueError(f"attempt numbers start at 1, not {self.attempt}")
        if not self.command:
            raise ValueError(f"job {self.job!r} has an empty command")
        if self.grace_s < 0:
            raise ValueError(f"grace period {self.grace_s:g} s is negative")
        if self.max_runtime_s is not None and self.max_runtime_s <= 0:
            raise ValueError(f"maxRuntime {self.max_runtime_s:g} s is not positive")


@dataclass(frozen=True, slots=True)
class AttemptResult:
    job: str
    attempt: int
    outcome: Outcome
    #: The process's return code (negative: the signal that ended it); None if it never ran.
    exit_code: int | None
    #: Whether it outlived its grace period and was SIGKILLed.
    killed: bool
    #: One line for the event: why it ended.
    reason: str
    #: From launch to exit, by the runner's clock.
    duration_s: float
    #: The end of the attempt's log, without gpufleet's closing line.
    last_log_lines: list[str]


def attempt_env(attempt: JobAttempt, base: Mapping[str, str]) -> dict[str, str]:
    """The environment the attempt's process gets, on top of ``base`` (gpufleet's own)."""
    env = {**base, **attempt.env}
    env.pop("GPUFLEET_RESUMED", None)
    env.update(
        CUDA_VISIBLE_DEVICES=",".join(str(g) for g in attempt.gpus),
        GPUFLEET_JOB=attempt.job,
        GPUFLEET_ATTEMPT=str(attempt.attempt),
        GPUFLEET_CHECKPOINT_DIR=str(attempt.checkpoint_dir.absolute()),
    )
    if attempt.resumed:
        env["GPUFLEET_RESUMED"] = "1"
    return env


class RunningAttempt:
    """A started attempt: stop it (``preempt``, ``cancel``), read its log, ``wait`` for its end.

    Made by ``LocalJobRunner.start``; one task watches the process and applies the deadline.
    """

    def __init__(
        self,
        attempt: JobAttempt,
        log_path: Path,
        proc: asyncio.subprocess.Process | None,
        *,
        clock: Callable[[], float],
        last_lines: int,
        start_error: str = "",
    ) -> None:
        self.attempt = attempt
        self.log_path = log_path
        self.pid = proc.pid if proc is not None else None
        #: Wall-clock time of the launch (for the ledger's rows per attempt).
        self.started_at = time.time()
        self._proc = proc
        self._clock = clock
        self._launched = clock()
        self._last_lines = last_lines
        self._start_error = start_error
        self._stop: tuple[Outcome, str] | None = None
        self._stop_asked = asyncio.Event()
        self._task = asyncio.create_task(
            self._run(), name=f"job:{attempt.job}/attempt-{attempt.attempt}"
        )

    @property
    def done(self) -> bool:
        return self._task.done()

    def preempt(self, reason: str) -> None:
        """Stop gracefully and give the GPUs back; the job resumes in a later attempt."""
        self._ask(Outcome.PREEMPTED, reason)

    def cancel(self, reason: str = "cancelled") -> None:
        """Stop gracefully for good."""
        self._ask(Outcome.CANCELLED, reason)

    async def wait(self) -> AttemptResult:
        """The attempt's result, once its process has ended and the rest of its process group
        has been sent SIGKILL (delivered by the kernel, not awaited)."""
        return await asyncio.shield(self._task)

    async def tail(self, n: int = 50) -> list[str]:
        """The last ``n`` lines of this attempt's log."""
        return await asyncio.to_thread(_lines, self.log_path, n)

    def _ask(self, outcome: Outcome, reason: str) -> None:
        if self._stop is None or (
            outcome is Outcome.CANCELLED and self._stop[0] is not Outcome.CANCELLED
        ):
            self._stop = (outcome, reason)
        self._stop_asked.set()

    async def _run(self) -> AttemptResult:
        if self._proc is None:
            return await self._finish(Outcome.FAILED, None, False, self._start_error)
        proc = self._proc
        exited = asyncio.ensure_future(proc.wait())
        asked = asyncio.ensure_future(self._stop_asked.wait())
        killed = False
        try:
            await asyncio.wait(
                {exited, asked},
                timeout=self.attempt.max_runtime_s,
                return_when=asyncio.FIRST_COMPLETED,
            )
            if exited.done():  # by itself: a stop asked too late changes nothing
                outcome, reason = _natural(proc.returncode), ""
            else:
                if self._stop is None:
                    limit = self.attempt.max_runtime_s
                    self._stop = (Outcome.TIMED_OUT, f"ran past its maxRuntime of {limit:g} s")
                killed = await self._terminate(proc, exited)
                outcome, reason = self._stop
        finally:
            asked.cancel()
            if proc.returncode is None:  # this task was cancelled: leave nothing running
                _signal_group(proc.pid, signal.SIGKILL)
                exited.cancel()
                await proc.wait()
            # Whatever the job left in its group goes with it.
            _signal_group(proc.pid, signal.SIGKILL)
        return await self._finish(outcome, proc.returncode, killed, reason)

    async def _terminate(
        self, proc: asyncio.subprocess.Process, exited: asyncio.Future[int]
    ) -> bool:
        """SIGTERM to the group, SIGKILL after the grace period; whether it came to that."""
        _signal_group(proc.pid, signal.SIGTERM)
        done, _ = await asyncio.wait({exited}, timeout=self.attempt.grace_s)
        if done:
            return False
        _signal_group(proc.pid, signal.SIGKILL)
        await asyncio.wait({exited})
        return True

    async def _finish(
        self, outcome: Outcome, code: int | None, killed: bool, reason: str
    ) -> AttemptResult:
        duration = self._clock() - self._launched
        reason = _describe(outcome, code, killed, reason, self.attempt.grace_s)
        last = await self.tail(self._last_lines)
        n = self.attempt.attempt
        line = f"--- gpufleet: attempt {n} {outcome}: {reason} ({duration:.1f} s)"
        await asyncio.to_thread(_append, self.log_path, line)
        return AttemptResult(
            job=self.attempt.job,
            attempt=self.attempt.attempt,
            outcome=outcome,
            exit_code=code,
            killed=killed,
            reason=reason,
            duration_s=duration,
            last_log_lines=last,
        )


class LocalJobRunner:
    """Starts job attempts as child processes; at most one running attempt per job."""

    def __init__(
        self,
        logs_dir: Path,
        *,
        last_lines: int = 20,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logs_dir = logs_dir
        self._last_lines = last_lines
        self._clock = clock
        self._running: dict[str, RunningAttempt] = {}
        self._death_hook = _parent_death_hook()

    def log_path(self, job: str, attempt: int) -> Path:
        return self._logs_dir / job / f"attempt-{attempt}.log"

    async def start(self, attempt: JobAttempt, job: object = None) -> RunningAttempt:
        """Launch the attempt (``job``, the spec, is a cluster runner's concern: the attempt
        says all a child process needs). A command that cannot be started (missing, not executable, a
        missing ``cwd``) is not an exception: the attempt fails, with the error in its log."""
        current = self._running.get(attempt.job)
        if current is not None and not current.done:
            raise RuntimeError(
                f"job {attempt.job!r} already runs attempt {current.attempt.attempt}"
            )
        log_path = self.log_path(attempt.job, attempt.attempt)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        proc: asyncio.subprocess.Process | None = None
        error = ""
        with log_path.open("ab") as log:
            resumed = " (resumed)" if attempt.resumed else ""
            head = f"--- gpufleet: job {attempt.job} attempt {attempt.attempt}{resumed}: "
            log.write((head + shlex.join(attempt.command) + "\n").encode())
            log.flush()
            try:
                attempt.checkpoint_dir.mkdir(parents=True, exist_ok=True)
                proc = await asyncio.create_subprocess_exec(
                    *attempt.command,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=attempt_env(attempt, os.environ),
                    cwd=attempt.cwd,
                    start_new_session=True,
                    preexec_fn=self._death_hook,
                )
            except OSError as exc:
                error = f"could not start: {exc}"
                log.write(f"--- gpufleet: {error}\n".encode())
        running = RunningAttempt(
            attempt,
            log_path,
            proc,
            clock=self._clock,
            last_lines=self._last_lines,
            start_error=error,
        )
        self._running[attempt.job] = running
        return running

    def running(self, job: str) -> RunningAttempt | None:
        """The job's attempt in progress, if one is."""
        current = self._running.get(job)
        return current if current is not None and not current.done else None

    async def logs(self, job: str, attempt: int, tail: int = 200) -> list[str]:
        """The last lines of an attempt's log, running or not (``gpufleet jobs logs``)."""
        return await asyncio.to_thread(_lines, self.log_path(job, attempt), tail)

    async def close(self, reason: str = "gpufleet is stopping") -> list[AttemptResult]:
        """Preempt every running attempt (they resume when gpufleet is back) and wait for them."""
        running = [r for r in self._running.values() if not r.done]
        for r in running:
            r.preempt(reason)
        results = await asyncio.gather(*(r.wait() for r in running))
        self._running.clear()
        return list(results)


def _natural(code: int | None) -> Outcome:
    return Outcome.SUCCEEDED if code == 0 else Outcome.FAILED


def _describe(outcome: Outcome, code: int | None, killed: bool, reason: str, grace: float) -> str:
    if outcome in {Outcome.SUCCEEDED, Outcome.FAILED}:
        if reason:  # could not start
            return reason
        if code is not None and code < 0:
            with contextlib.suppress(ValueError):
                return f"killed by {signal.Signals(-code).name}"
        return f"exited with code {code}"
    if killed:
        return f"{reason}; still running {grace:g} s after SIGTERM: killed"
    return reason


def _lines(path: Path, n: int) -> list[str]:
    try:
        return _tail(path, n).splitlines() if n > 0 else []
    except FileNotFoundError:
        return []


def _append(path: Path, line: str) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(line + "\n")
