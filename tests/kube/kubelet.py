"""The kubelet's part, played by a test: there is no kubelet on the control plane, so a pod the
scheduler bound stays Pending until this writes its status (Running, Ready, a pod IP) — which
is also how a test points a pod at an engine emulator on 127.0.0.1 — and a deleted pod stays
terminating until this removes it (grace 0), as a kubelet does once the container stopped."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any, Literal

from gpufleet.runtime.kubernetes.client import ClientKube

log = logging.getLogger("tests.kubelet")

Verdict = Literal["ready", "pending", "crash"]


class Kubelet:
    def __init__(self, kube: ClientKube, namespace: str) -> None:
        self.kube = kube
        self.namespace = namespace
        #: What becomes of a bound pod: ready (default), left pending, or crash-looping.
        self.policy: Callable[[dict[str, Any]], Verdict] = lambda pod: "ready"
        self.ip = "127.0.0.1"
        #: Whether terminating pods are removed (False: they stay terminating).
        self.finish_deletions = True
        self.started: list[str] = []

    async def run(self) -> None:
        while True:
            try:
                for pod in await self.kube.list("Pod", self.namespace):
                    await self._handle(pod)
                async for event in self.kube.watch("Pod", self.namespace):
                    if event.type != "DELETED":
                        await self._handle(event.object)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("kubelet: %s", exc)
                await asyncio.sleep(0.2)

    async def settle(self, pod: dict[str, Any]) -> None:
        """Apply the policy to one pod now (a test changed it)."""
        await self._handle(pod, again=True)

    async def _handle(self, pod: dict[str, Any], *, again: bool = False) -> None:
        meta, spec = pod["metadata"], pod.get("spec", {})
        name = meta["name"]
        if meta.get("deletionTimestamp"):
            if self.finish_deletions:
                with contextlib.suppress(Exception):
                    await self.kube.delete("Pod", self.namespace, name, grace_s=0)
            return
        if not spec.get("nodeName"):
            return
        status = pod.get("status", {}) or {}
        if status.get("phase") == "Running" and not again:
            return
        verdict = self.policy(pod)
        if verdict == "pending":
            return
        containers = [c["name"] for c in spec.get("containers", [])]
        if verdict == "crash":
            patch = {
                "phase": "Running",
                "podIP": self.ip,
                "conditions": [{"type": "Ready", "status": "False"}],
                "containerStatuses": [
                    {
                        "name": c,
                        "ready": False,
                        "restartCount": 3,
                        "image": "engine",
                        "imageID": "",
                        "state": {
                            "waiting": {"reason": "CrashLoopBackOff", "message": "engine exited 1"}
                        },
                    }
                    for c in containers
                ],
            }
        else:
            patch = {
                "phase": "Running",
                "podIP": self.ip,
                "podIPs": [{"ip": self.ip}],
                "conditions": [
                    {"type": "PodScheduled", "status": "True"},
                    {"type": "Initialized", "status": "True"},
                    {"type": "ContainersReady", "status": "True"},
                    {"type": "Ready", "status": "True"},
                ],
                "containerStatuses": [
                    {
                        "name": c,
                        "ready": True,
                        "restartCount": 0,
                        "image": "engine",
                        "imageID": "",
                        "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}},
                    }
                    for c in containers
                ],
            }
        try:
            await self.kube.patch_status("Pod", self.namespace, name, patch)
            self.started.append(name)
        except Exception as exc:
            log.info("kubelet: pod %s: %s", name, exc)
