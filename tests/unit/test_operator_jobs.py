"""The operator's GpuJob mirror (``operator.jobs``) against the stateful fake API: a resource is
submitted once, its row written back into its status, a refused spec or tenant said there, and
a deleted resource cancels its job. The attempts are the test's (``AdoptingRunner``); the
batch/v1 Jobs themselves are tests/unit/test_kubernetes_jobs.py's and tests/kube's."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gpufleet.controller.jobs import JobScheduler
from gpufleet.operator.jobs import JobMirror
from gpufleet.runtime.kubernetes import FakeKube
from gpufleet.spec import Tenant
from gpufleet.store import Store, sqlite_url
from tests.conftest import eventually
from tests.unit.test_job_scheduler import AdoptingRunner, inventory

NS = "gpufleet"


def resource(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "gpufleet.io/v1alpha1",
        "kind": "GpuJob",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"image": "ghcr.io/example/train:1", "command": ["python", "train.py"], **spec},
    }


@dataclass
class Site:
    kube: FakeKube
    jobs: JobScheduler
    mirror: JobMirror
    runner: AdoptingRunner

    async def status(self, name: str) -> dict[str, Any]:
        obj = await self.kube.get("GpuJob", NS, name)
        assert obj is not None
        return dict(obj.get("status") or {})


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[Site]:
    store = Store.open(sqlite_url(tmp_path))
    store.apply_tenant(
        Tenant.model_validate(
            {
                "apiVersion": "gpufleet.io/v1alpha1",
                "kind": "Tenant",
                "metadata": {"name": "default"},
            }
        )
    )
    runner = AdoptingRunner()
    jobs = JobScheduler(store, runner, inventory(1), data_dir=tmp_path, interval_s=0.05)
    jobs.capacity.bound({})  # type: ignore[union-attr]
    await jobs.start()
    kube = FakeKube()
    try:
        yield Site(kube, jobs, JobMirror(kube, jobs, NS, clock=time.time), runner)
    finally:
        await jobs.close(stop_attempts=False)
        store.close()


async def test_a_gpujob_is_submitted_once_and_its_status_follows_the_row(site: Site) -> None:
    await site.kube.create(resource("tune", resources={"gpus": 1}))
    await site.mirror.sync()

    async def running() -> dict[str, Any]:
        await site.mirror.sync()
        status = await site.status("tune")
        return status if status.get("phase") == "Running" else {}

    status = await eventually(running, "Running in its status")
    assert (status["attempts"], status["nodes"]) == (1, ["box"])
    await site.mirror.sync()
    await site.mirror.sync()
    assert [a.job for a in site.runner.started] == ["tune"]  # submitted once, started once
    assert site.mirror.writes == 0  # an unchanged row writes nothing
    # The resource goes: its job is cancelled.
    await site.kube.delete("GpuJob", NS, "tune")
    await site.mirror.sync()
    assert site.runner.kept[("tune", 1)].asked == ["cancel: cancelled"]


async def test_a_refused_spec_or_tenant_is_said_in_the_status(site: Site) -> None:
    await site.kube.create(resource("bad", priorityClass="interactive"))
    await site.kube.create(resource("stray", tenant="nobody"))
    await site.mirror.sync()
    bad, stray = await site.status("bad"), await site.status("stray")
    assert bad["phase"] == "Invalid" and "priorityClass" in bad["message"]
    assert stray["phase"] == "Refused" and "tenant 'nobody' does not exist" in stray["message"]
    assert site.runner.started == []
