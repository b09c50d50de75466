"""Issue 13, point 6 on the real API server: a new model of the same priority — a bigger one,
which the planner places first when it plans from nothing — must not take a Ready model's
GPUs through the autoscaler's capacity bound; it is reported unschedulable instead."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gpufleet.autoscale import Sample
from gpufleet.runtime.kubernetes.client import ClientKube
from tests.kube.conftest import Nodes
from tests.kube.kubelet import Kubelet
from tests.kube.test_operator import (
    apply,
    engine_pods,
    eventually,
    model,
    operating,
    pass_until,
)


class Idle:
    """A demand source saying nothing is asked for: each model keeps its spec's count."""

    def sample(self, model: str, now: float) -> Sample:
        return Sample(now, 0.0)


async def test_a_bigger_newcomer_of_equal_priority_leaves_a_ready_model_alone(
    kube: ClientKube,
    namespace: str,
    nodes: Nodes,
    kubelet: Kubelet,
    model_cache: str,
    priority_classes: None,
    kubectl: Callable[..., Any],
    tmp_path: Path,
) -> None:
    for name in ("a", "b"):
        await nodes.add(f"{namespace}-gpu-{name}", gpus=8)

    async def default_account() -> Any:
        # Pods of a fresh namespace are refused until the controller-manager has made it.
        done = await asyncio.to_thread(
            kubectl, "get", "serviceaccount", "default", "-n", namespace, check=False
        )
        return done.returncode == 0

    await eventually(default_account)
    apply(kubectl, namespace, model("chat", replicas={"min": 4, "max": 4}))
    async with operating(kube, namespace, tmp_path) as operator:
        controller = operator.controller
        controller.attach_demand(Idle())

        async def chat_ready() -> Any:
            obj = await kube.get("Model", namespace, "chat")
            return (obj or {}).get("status", {}).get("readyReplicas") == 4

        await pass_until(operator, chat_ready)
        await controller.autoscale_once()  # the bound has seen the chat model run
        # Two replicas of 8 GPUs each: both nodes whole, which the chat model's 4 leave none of.
        big = model(
            "big",
            replicas={"min": 2, "max": 2},
            resources={"gpus": 8, "gpuTypes": ["H100"], "memory": "320Gi"},
        )
        apply(kubectl, namespace, big)

        async def big_reported() -> Any:
            await controller.autoscale_once()
            obj = await kube.get("Model", namespace, "big")
            conditions = {c["type"]: c for c in (obj or {}).get("status", {}).get("conditions", [])}
            return conditions.get("Unschedulable", {}).get("status") == "True"

        await pass_until(operator, big_reported)

        async def only_chat_runs() -> Any:
            await controller.autoscale_once()
            pods = await engine_pods(kube, namespace)
            names = sorted(p["metadata"]["labels"]["gpufleet.io/model"] for p in pods)
            obj = await kube.get("Model", namespace, "chat")
            ready = (obj or {}).get("status", {}).get("readyReplicas")
            return names == ["chat"] * 4 and ready == 4

        await pass_until(operator, only_chat_runs)
        for _ in range(3):
            await operator.sync()
            await controller.autoscale_once()
        assert await only_chat_runs()
