"""GPU job attempts on Kubernetes: one ``batch/v1`` Job per attempt, admitted and preempted by
toggling ``spec.suspend`` — the mechanism Kueue uses — with the same contract as the local runner
(``runtime.jobs``): ``start`` an attempt, ``preempt`` or ``cancel`` it, ``wait`` for its
``AttemptResult``. What an attempt is made of — its Job (a gang of one pod per node, pinned to
the planner's nodes, with torchrun's rendezvous in its environment), headless Service and
checkpoint claim — is ``job_manifests``'.

Admission: ``start`` creates the job's claim, then the attempt's Job with ``suspend: true``
(creating is not admitting: the Job controller makes no pod), then its Service, owned by the
Job, and unsuspends the Job. Preemption and cancellation write ``suspend: true``: the Job
controller deletes the pods, each with its ``terminationGracePeriodSeconds`` — SIGTERM, then
SIGKILL — the local runner's contract.

How an attempt ends, read from the Job and its pods (``attempt_verdict``): ``Complete`` →
succeeded; ``Failed`` with reason ``DeadlineExceeded`` → timed out; ``Failed`` otherwise →
failed, with the failed pod's exit code and the end of its log (pods/log; when the API cannot
give it, a line of gpufleet's saying so). Once gpufleet has written ``suspend: true`` to a Job
that had not finished, the attempt's end is the stop's — preempted or cancelled — whatever the
Job shows afterwards (the Job controller of v1.36 keeps it ``Suspended``, takes the tracking
finalizer off the pods it deletes and counts them neither failed nor succeeded; it clears
``startTime``): a stop signalled decides, as locally, where the exit code then no longer does. A
Job that finished before the write keeps its own outcome. A verdict waits until no pod of the
attempt is left running (a terminating pod holds its GPUs until its grace period is over), so
the GPUs are free when ``wait`` returns. A Job someone else suspended (Kueue, an admin) ends the
attempt as preempted, with the reason; one deleted under it ends it as failed. The duration runs
from the Job's ``startTime`` (as first seen) to its completion, its failure, or now. Whether a
pod outlived its grace period is not visible once it is deleted: ``killed`` is always false
here.

After an attempt: a Job that completed or failed by itself is kept for its pods' logs
(``gpufleet jobs logs``) and removed by the TTL controller ``ttlSecondsAfterFinished`` later (a
day by default); a stopped one has no pods left to read and is deleted at once. The Service
belongs to its Job (an owner reference) and goes with it; the claim stays until
``discard_checkpoint``. Pods outlive the operator: a gpufleet that takes over ``adopt``s the
attempts whose Jobs it finds; and a start that finds Jobs of the job's earlier attempts still
running anyway preempts them first, and waits until their pods are gone: an attempt never runs
twice.

Coexisting with Kueue: the Jobs gpufleet creates carry no ``kueue.x-k8s.io/queue-name`` label,
so Kueue leaves them alone — unless its configuration sets ``manageJobsWithoutQueueName: true``.
Then Kueue suspends every Job without the label in the namespaces its
``managedJobsNamespaceSelector`` selects (by default every namespace but ``kube-system`` and
``kueue-system``) and keeps it suspended until one of its queues admits it: gpufleet's attempts
would be suspended under it, and end as preempted, the reason naming Kueue. Administrators of
such a cluster exclude gpufleet's namespace from that selector (add it to the ``NotIn`` list of
``kubernetes.io/metadata.name``). Kueue's quotas do not count gpufleet's pods, nor gpufleet's
planner Kueue's: give each its own GPU nodes (Kueue's ResourceFlavors by node label, gpufleet's
inventory), or the two overbook them.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from gpufleet.runtime.jobs import AttemptResult, JobAttempt, Outcome
from gpufleet.runtime.kubernetes.api import Conflict, KubeApi, KubeError
from gpufleet.runtime.kubernetes.common import RenderError, RenderSettings
from gpufleet.runtime.kubernetes.job_manifests import (
    CHECKPOINT_MOUNT,
    CONTAINER,
    DEFAULT_CHECKPOINT_SIZE,
    FINISHED_TTL_S,
    INDEX_ANNOTATION,
    LABEL_ATTEMPT,
    LABEL_JOB,
    MASTER_PORT,
    CheckpointVolume,
    attempt_job,
    attempt_name,
    attempt_selector,
    attempt_service,
    checkpoint_claim,
    checkpoint_claim_name,
    checkpoint_mount,
    pod_index,
    service_name,
)
from gpufleet.spec import GpuJob
from gpufleet.supervise import Supervisor, wait_set

__all__ = [
    "CHECKPOINT_MOUNT",
    "CONTAINER",
    "DEFAULT_CHECKPOINT_SIZE",
    "FINISHED_TTL_S",
    "INDEX_ANNOTATION",
    "LABEL_ATTEMPT",
    "LABEL_JOB",
    "MASTER_PORT",
    "CheckpointVolume",
    "KubeJobAttempt",
    "KubernetesJobRunner",
    "attempt_job",
    "attempt_name",
    "attempt_selector",
    "attempt_service",
    "attempt_verdict",
    "checkpoint_claim",
    "checkpoint_claim_name",
    "checkpoint_mount",
    "pod_index",
    "service_name",
    "set_suspend",
]

log = logging.getLogger("gpufleet.runtime.kubernetes.jobs")

_SUSPEND_TRIES = 8


# -- reading a Job --------------------------------------------------------------------------------


def _condition(job: Mapping[str, Any], kind: str) -> dict[str, Any] | None:
    for c in job.get("status", {}).get("conditions") or []:
        if c.get("type") == kind and c.get("status") == "True":
            return dict(c)
    return None


def _finished(job: Mapping[str, Any]) -> bool:
    return _condition(job, "Complete") is not None or _condition(job, "Failed") is not None


def _alive(pods: Sequence[Mapping[str, Any]]) -> list[str]:
    """The pods still running or about to (holding their GPUs)."""
    done = {"Succeeded", "Failed"}
    return [p["metadata"]["name"] for p in pods if p.get("status", {}).get("phase") not in done]


def _time(stamp: str | None) -> float | None:
    if not stamp:
        return None
    return dt.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def attempt_verdict(
    job: Mapping[str, Any] | None,
    pods: Sequence[Mapping[str, Any]],
    stop: tuple[Outcome, str] | None,
    landed: bool,
    *,
    max_runtime_s: float | None = None,
) -> tuple[Outcome, str] | None:
    """How the attempt ended, or None while it runs (or its pods still hold their GPUs).

    ``stop``: the stop asked of it, if any; ``landed``: whether gpufleet's ``suspend: true``
    reached the Job before it had finished (then the stop decides)."""
    if job is None:
        return stop if stop is not None else (Outcome.FAILED, "its Job was deleted")
    if _alive(pods):
        return None
    spec, status = job.get("spec", {}), job.get("status", {})
    if _finished(job):
        if landed and stop is not None:
            return stop
        if _condition(job, "Complete") is not None:
            return Outcome.SUCCEEDED, ""
        failed = _condition(job, "Failed") or {}
        if failed.get("reason") == "DeadlineExceeded":
            limit = f" of {max_runtime_s:g} s" if max_runtime_s is not None else ""
            return Outcome.TIMED_OUT, f"ran past its maxRuntime{limit}"
        return Outcome.FAILED, _failure(failed, pods)
    suspended = spec.get("suspend") is True and _condition(job, "Suspended") is not None
    if not suspended or status.get("active"):
        return None
    if stop is not None and landed:
        return stop
    return (
        Outcome.PREEMPTED,
        "its Job was suspended by something other than gpufleet (Kueue with "
        "manageJobsWithoutQueueName? exclude gpufleet's namespace from its "
        "managedJobsNamespaceSelector)",
    )


def _failed_pod(pods: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    failed = [p for p in pods if p.get("status", {}).get("phase") == "Failed"]
    return min(failed, key=pod_index) if failed else None


def _exit_code(pod: Mapping[str, Any] | None) -> int | None:
    if pod is None:
        return None
    for c in pod.get("status", {}).get("containerStatuses") or []:
        terminated = (c.get("state") or {}).get("terminated")
        if c.get("name") == CONTAINER and terminated is not None:
            code = terminated.get("exitCode")
            return int(code) if code is not None else None
    return None


def _failure(condition: Mapping[str, Any], pods: Sequence[Mapping[str, Any]]) -> str:
    pod = _failed_pod(pods)
    code = _exit_code(pod)
    if pod is not None:
        where = f" (rank {pod_index(pod)}, pod {pod['metadata']['name']})" if len(pods) > 1 else ""
        status = pod.get("status", {})
        if code is not None:
            return f"exited with code {code}{where}"
        if status.get("reason"):
            return f"{status['reason']}: {status.get('message', '')}".rstrip(": ") + where
    reason = condition.get("reason", "Failed")
    return f"{reason}: {condition.get('message', '')}".rstrip(": ")


async def set_suspend(api: KubeApi, namespace: str, name: str, suspend: bool) -> bool:
    """Write ``spec.suspend`` (read, change, replace; again on a conflict, since the Job
    controller writes the same object). False when there is nothing to write it to: the Job is
    gone, or — suspending — it has finished already."""
    for _ in range(_SUSPEND_TRIES):
        job = await api.get("Job", namespace, name)
        if job is None or (suspend and _finished(job)):
            return False
        if job.get("spec", {}).get("suspend", False) is suspend:
            return True
        job["spec"]["suspend"] = suspend
        try:
            await api.replace(job)
        except Conflict:
            continue
        except KeyError:  # deleted between the read and the write
            return False
        return True
    raise Conflict(f"Job {namespace}/{name}: spec.suspend not written after {_SUSPEND_TRIES} tries")


# -- the runner -----------------------------------------------------------------------------------


class KubeJobAttempt:
    """A started attempt's Job: stop it (``preempt``, ``cancel``), ``wait`` for its end.

    One task reconciles from the Job and its pods as they are now (read again on every change a
    watch reports, and every ``poll_s`` in any case); the watches only wake it."""

    def __init__(
        self,
        api: KubeApi,
        namespace: str,
        *,
        job: str,
        number: int,
        name: str,
        max_runtime_s: float | None = None,
        clock: Callable[[], float] = time.time,
        poll_s: float = 5.0,
        last_lines: int = 20,
        start_error: str = "",
    ) -> None:
        self.job = job
        self.number = number
        #: The attempt's Job.
        self.name = name
        self._api = api
        self._namespace = namespace
        self._max_runtime_s = max_runtime_s
        self._clock = clock
        self._poll_s = poll_s
        self._last_lines = last_lines
        self._start_error = start_error
        self._launched = clock()
        self._started: float | None = None
        self._stop: tuple[Outcome, str] | None = None
        self._landed = False
        self._sent = False
        self._wake = asyncio.Event()
        self._loops = Supervisor()
        self._task = asyncio.create_task(self._run(), name=f"job:{job}/attempt-{number}")

    @property
    def done(self) -> bool:
        return self._task.done()

    def preempt(self, reason: str) -> None:
        """Suspend the Job: its pods get SIGTERM, SIGKILL after the grace period; the job
        resumes in a later attempt."""
        self._ask(Outcome.PREEMPTED, reason)

    def cancel(self, reason: str = "cancelled") -> None:
        """Stop gracefully for good."""
        self._ask(Outcome.CANCELLED, reason)

    async def wait(self) -> AttemptResult:
        """The attempt's result, once no pod of it holds its GPUs."""
        return await asyncio.shield(self._task)

    async def close(self) -> None:
        """Stop following the Job (it runs on: the cluster keeps it)."""
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    def _ask(self, outcome: Outcome, reason: str) -> None:
        if self._stop is None or (
            outcome is Outcome.CANCELLED and self._stop[0] is not Outcome.CANCELLED
        ):
            self._stop = (outcome, reason)
        self._wake.set()

    async def _run(self) -> AttemptResult:
        if self._start_error:
            return self._result(Outcome.FAILED, self._start_error, None, [], self._clock())
        selector = attempt_selector(self.job, self.number)
        for kind in ("Job", "Pod"):
            self._loops.spawn(
                f"kubernetes:{kind.lower()}s-of:{self.name}",
                functools.partial(self._follow, kind, selector),
                critical=False,
            )
        try:
            while True:
                self._wake.clear()
                try:
                    result = await self._step(selector)
                except (KubeError, Conflict) as exc:  # the cluster decides: ask it again
                    log.warning("job %s attempt %d: %s", self.job, self.number, exc)
                    result = None
                if result is not None:
                    return result
                await wait_set(self._wake, self._poll_s)
        finally:
            await self._loops.close()

    async def _follow(self, kind: str, selector: Mapping[str, str]) -> None:
        async for _ in self._api.watch(kind, self._namespace, selector):
            self._wake.set()

    async def _step(self, selector: Mapping[str, str]) -> AttemptResult | None:
        api, ns = self._api, self._namespace
        if self._stop is not None and not self._sent:
            self._landed = await set_suspend(api, ns, self.name, True)
            self._sent = True
        job = await api.get("Job", ns, self.name)
        pods = await api.list("Pod", ns, selector)
        if job is not None and self._started is None:
            self._started = _time(job.get("status", {}).get("startTime"))
        verdict = attempt_verdict(
            job, pods, self._stop, self._landed, max_runtime_s=self._max_runtime_s
        )
        if verdict is None:
            return None
        outcome, reason = verdict
        end = self._clock()
        code: int | None = None
        lines: list[str] = []
        if job is not None and outcome in {Outcome.SUCCEEDED, Outcome.FAILED, Outcome.TIMED_OUT}:
            status = job.get("status", {})
            ended = _condition(job, "Complete") or _condition(job, "Failed") or {}
            end = _time(status.get("completionTime") or ended.get("lastTransitionTime")) or end
            if outcome is Outcome.SUCCEEDED:
                code = 0
            elif outcome is Outcome.FAILED:
                failed = _failed_pod(pods)
                code = _exit_code(failed)
                lines = await self._last_log(failed)
        if outcome in {Outcome.PREEMPTED, Outcome.CANCELLED} and job is not None:
            # Nothing of it is left to read; its Service goes with it (owner reference).
            try:
                await api.delete("Job", ns, self.name)
            except KubeError as exc:
                log.warning("job %s: Job %s not deleted: %s", self.job, self.name, exc)
        return self._result(outcome, reason, code, lines, end)

    async def _last_log(self, pod: Mapping[str, Any] | None) -> list[str]:
        if pod is None:
            return ["--- gpufleet: no failed pod left to read a log from"]
        name = pod["metadata"]["name"]
        try:
            text = await self._api.logs(
                self._namespace, name, container=CONTAINER, tail=self._last_lines
            )
        except KubeError as exc:
            return [f"--- gpufleet: the log of pod {name} is not available: {exc}"]
        return text.splitlines()

    def _result(
        self, outcome: Outcome, reason: str, code: int | None, lines: list[str], end: float
    ) -> AttemptResult:
        if outcome is Outcome.SUCCEEDED and not reason:
            reason = "completed"
        elif outcome is Outcome.FAILED and not reason:
            reason = "failed"
        start = self._started if self._started is not None else self._launched
        return AttemptResult(
            job=self.job,
            attempt=self.number,
            outcome=outcome,
            exit_code=code,
            killed=False,
            reason=reason,
            duration_s=max(0.0, end - start),
            last_log_lines=lines,
        )


class KubernetesJobRunner:
    """Starts job attempts as ``batch/v1`` Jobs in ``settings.namespace``; at most one running
    attempt per job. ``start`` takes the job's spec beside the attempt: the gang's shape, image,
    priority and checkpoint path are the job's, not the attempt's. ``adopt`` follows an attempt
    whose Job an earlier gpufleet made; ``close`` stops following, and the Jobs run on."""

    def __init__(
        self,
        api: KubeApi,
        settings: RenderSettings | None = None,
        *,
        checkpoint: CheckpointVolume | None = None,
        finished_ttl_s: int = FINISHED_TTL_S,
        last_lines: int = 20,
        poll_s: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.api = api
        self.settings = settings or RenderSettings()
        self.namespace = self.settings.namespace
        self.checkpoint = checkpoint or CheckpointVolume()
        self._ttl_s = finished_ttl_s
        self._last_lines = last_lines
        self._poll_s = poll_s
        self._clock = clock
        self._running: dict[str, KubeJobAttempt] = {}

    async def start(self, attempt: JobAttempt, job: GpuJob) -> KubeJobAttempt:
        """Create (or find) the attempt's claim, Job and Service, then unsuspend the Job. A job
        that cannot run here (no image) or a call the API refuses is not an exception: the
        attempt fails with the reason, as a command that cannot start does locally."""
        current = self.running(attempt.job)
        if current is not None:
            raise RuntimeError(f"job {attempt.job!r} already runs attempt {current.number}")
        name = attempt_name(attempt.job, attempt.attempt, job.spec.resources.nodes)
        try:
            error = await self._admit(attempt, job, name)
        except RenderError as exc:
            error = f"cannot run on Kubernetes: {'; '.join(exc.problems)}"
        except (KubeError, Conflict) as exc:
            error = f"could not start: {exc}"
        running = self._attempt(attempt.job, attempt.attempt, name, attempt.max_runtime_s, error)
        self._running[attempt.job] = running
        return running

    async def _admit(self, attempt: JobAttempt, job: GpuJob, name: str) -> str:
        """Make the attempt's objects, the Job suspended, then unsuspend it; "" or why not."""
        claim = checkpoint_claim(job, self.settings, self.checkpoint)
        manifest = attempt_job(attempt, job, self.settings, ttl_s=self._ttl_s)
        service = attempt_service(attempt, job, self.settings)
        await self._stop_earlier(attempt)
        await _ensure(self.api, claim)
        created = await _ensure(self.api, manifest)
        service["metadata"]["ownerReferences"] = [_owner(created)]
        await _ensure(self.api, service)
        if not await set_suspend(self.api, self.namespace, name, False):
            return f"could not start: its Job {name} is gone"
        return ""

    async def adopt(self, job: str, attempt: int) -> KubeJobAttempt | None:
        """Follow again an attempt a previous gpufleet started (an operator that took over the
        lead: the Jobs outlived the one before); None when the cluster has no Job of it."""
        current = self._running.get(job)
        if current is not None and current.number == attempt and not current.done:
            return current
        found = await self.api.list("Job", self.namespace, attempt_selector(job, attempt))
        if not found:
            return None
        (manifest,) = found
        deadline = manifest.get("spec", {}).get("activeDeadlineSeconds")
        handle = self._attempt(
            job, attempt, manifest["metadata"]["name"], float(deadline) if deadline else None
        )
        self._running[job] = handle
        return handle

    def running(self, job: str) -> KubeJobAttempt | None:
        """The job's attempt in progress, if one is."""
        current = self._running.get(job)
        return current if current is not None and not current.done else None

    async def logs(self, job: str, attempt: int, tail: int = 200) -> list[str]:
        """The last lines of an attempt's pods' logs, rank 0 first, while its pods exist (a
        finished Job keeps them for ``finished_ttl_s``); a log the API cannot give is a line
        of gpufleet's saying so."""
        pods = sorted(
            await self.api.list("Pod", self.namespace, attempt_selector(job, attempt)),
            key=pod_index,
        )
        lines: list[str] = []
        for pod in pods:
            name = pod["metadata"]["name"]
            if len(pods) > 1:
                node = pod.get("spec", {}).get("nodeName") or "no node"
                lines.append(f"--- gpufleet: pod {name} (rank {pod_index(pod)}, {node})")
            try:
                text = await self.api.logs(self.namespace, name, container=CONTAINER, tail=tail)
            except KubeError as exc:
                lines.append(f"--- gpufleet: the log of pod {name} is not available: {exc}")
                continue
            lines += text.splitlines()
        return lines

    async def discard_checkpoint(self, job: str) -> None:
        """Delete the job's checkpoint claim (once the job has ended for good)."""
        await self.api.delete("PersistentVolumeClaim", self.namespace, checkpoint_claim_name(job))

    async def close(self) -> None:
        """Stop following the attempts; their Jobs run on (pods outlive the operator)."""
        await asyncio.gather(*(r.close() for r in self._running.values()))
        self._running.clear()

    def _attempt(
        self, job: str, number: int, name: str, max_runtime_s: float | None, error: str = ""
    ) -> KubeJobAttempt:
        return KubeJobAttempt(
            self.api,
            self.namespace,
            job=job,
            number=number,
            name=name,
            max_runtime_s=max_runtime_s,
            clock=self._clock,
            poll_s=self._poll_s,
            last_lines=self._last_lines,
            start_error=error,
        )

    async def _stop_earlier(self, attempt: JobAttempt) -> None:
        """Preempt the job's other attempts that still run (left by a gpufleet that restarted)
        and wait until their pods are gone."""
        for other in await self.api.list("Job", self.namespace, {LABEL_JOB: attempt.job}):
            number = (other["metadata"].get("labels") or {}).get(LABEL_ATTEMPT, "")
            if number == str(attempt.attempt) or not number.isdigit() or _finished(other):
                continue
            earlier = self._attempt(attempt.job, int(number), other["metadata"]["name"], None)
            earlier.preempt(f"attempt {attempt.attempt} starts: an attempt runs only once")
            try:
                result = await earlier.wait()
            finally:
                await earlier.close()  # nothing left to follow, even if this start is cancelled
            log.warning(
                "job %s: attempt %s was still running and is now %s",
                attempt.job, number, result.outcome,
            )  # fmt: skip


async def _ensure(api: KubeApi, obj: Mapping[str, Any]) -> dict[str, Any]:
    """Create ``obj``, or take the one there (a start that is repeated makes nothing twice)."""
    try:
        return await api.create(obj)
    except FileExistsError:
        meta_ = obj["metadata"]
        found = await api.get(obj["kind"], meta_["namespace"], meta_["name"])
        if found is None:  # deleted in between: create it after all
            return await api.create(obj)
        return found


def _owner(job: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "name": job["metadata"]["name"],
        "uid": job["metadata"]["uid"],
    }
