"""Precise prefix routing on Kubernetes (``routing.prefixIndex: precise``): the engine of such a
model — each pool's, for a disaggregated one; a multi-node replica's leader — publishes its
KV-cache events on fixed ports that its container names; the tenants' NetworkPolicy lets the
gateway reach them; the runtime reads a Ready pod's endpoints back from the names, so a view
that knows no spec (the gateway's, a restarted operator's) finds them too; what would break the
subscription is refused with the fix. The real API server's side: tests/kube/test_runtime.py;
the chart's policy: tests/unit/test_helm_chart.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from gpufleet.engines import KV_EVENTS_TOPIC
from gpufleet.runtime import Phase, Replica, ReplicaRequest
from gpufleet.runtime.kubernetes import (
    FakeKube,
    KubernetesRuntime,
    RenderError,
    RenderSettings,
    render,
)
from gpufleet.runtime.kubernetes.common import (
    KV_EVENTS_PORT,
    KV_REPLAY_PORT,
    PORT,
    RAY_PORT,
)
from gpufleet.spec import Model, load_text, load_text_resources
from tests.conftest import eventually

KUBERNETES = "1.34.0"
DATA = Path(__file__).parents[1] / "data" / "k8s"
NS = "gpufleet"
#: vLLM's NIXL side channel (``VLLM_NIXL_SIDE_CHANNEL_PORT``'s default) in a disaggregated pod.
NIXL_SIDE_CHANNEL_PORT = 5600


def a_model(name: str, *, routing: str = "", gpus: int = 1, args: str = "[]") -> Model:
    (model,) = load_text(
        "apiVersion: gpufleet.io/v1alpha1\nkind: Model\n"
        f"metadata: {{name: {name}}}\n"
        "spec: {source: 'hf://meta-llama/Meta-Llama-3-8B-Instruct', engine: vllm, "
        f"resources: {{gpus: {gpus}, gpuTypes: [H100]}}, engineArgs: {args}"
        + (f", routing: {{prefixIndex: {routing}}}" if routing else "")
        + "}\n"
    )
    return model


def precise_pd_model() -> Model:
    """tests/data/k8s/disaggregated.yaml with ``routing.prefixIndex: precise``."""
    doc = yaml.safe_load((DATA / "disaggregated.yaml").read_text())
    doc["spec"]["routing"] = {"prefixIndex": "precise"}
    (model,) = load_text(yaml.safe_dump(doc))
    return model


def engine(workload: dict[str, Any]) -> dict[str, Any]:
    container: dict[str, Any] = workload["spec"]["template"]["spec"]["containers"][0]
    return container


def kv_config(args: list[str]) -> dict[str, Any]:
    config: dict[str, Any] = json.loads(args[args.index("--kv-events-config") + 1])
    return config


def ports(container: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container.get("ports", [])}


PUBLISHING = {
    "enable_kv_cache_events": True,
    "publisher": "zmq",
    "endpoint": f"tcp://*:{KV_EVENTS_PORT}",
    "replay_endpoint": f"tcp://*:{KV_REPLAY_PORT}",
    "topic": KV_EVENTS_TOPIC,
}
PORTS = {"http": PORT, "kv-events": KV_EVENTS_PORT, "kv-replay": KV_REPLAY_PORT}


def test_the_event_ports_are_apart_from_every_other_port_of_an_engine_pod() -> None:
    taken = [PORT, RAY_PORT, NIXL_SIDE_CHANNEL_PORT, KV_EVENTS_PORT, KV_REPLAY_PORT]
    assert len(set(taken)) == len(taken)


# -- render -----------------------------------------------------------------------------------


def test_a_precise_model_renders_engines_that_publish_on_named_ports() -> None:
    _, (tenant,) = load_text_resources(
        "apiVersion: gpufleet.io/v1alpha1\nkind: Tenant\nmetadata: {name: acme}\n"
        "spec: {priority: interactive}\n"
    )
    objects = render([a_model("precise", routing="precise"), a_model("plain")], [tenant])
    for obj in objects:
        kubernetes_validate.validate(obj, KUBERNETES, strict=True)
    deployments = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Deployment"}
    precise, plain = engine(deployments["engine-precise"]), engine(deployments["engine-plain"])
    assert kv_config(precise["args"]) == PUBLISHING
    assert ports(precise) == PORTS
    # An approximate index (the default) needs no events: none asked for, no port named.
    assert "--kv-events-config" not in plain["args"]
    assert ports(plain) == {"http": PORT}
    # The gateway reaches engines in a tenant's namespace on the event ports too.
    (policy,) = [o for o in objects if o["metadata"]["name"] == "gateway-to-engines"]
    (rule,) = policy["spec"]["ingress"]
    assert rule["ports"] == [
        {"protocol": "TCP", "port": port} for port in (PORT, KV_EVENTS_PORT, KV_REPLAY_PORT)
    ]


def test_each_pool_of_a_precise_disaggregated_model_publishes() -> None:
    objects = render([precise_pd_model()])
    for obj in objects:
        kubernetes_validate.validate(obj, KUBERNETES, strict=True)
    deployments = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Deployment"}
    assert sorted(deployments) == ["engine-llama-pd", "engine-llama-pd-prefill"]
    for workload in deployments.values():
        container = engine(workload)
        assert kv_config(container["args"]) == PUBLISHING
        assert ports(container)["kv-events"] == KV_EVENTS_PORT
        assert ports(container)["kv-replay"] == KV_REPLAY_PORT
        assert "--kv-transfer-config" in container["args"]  # beside the KV connector's


def test_a_precise_model_bigger_than_a_node_publishes_from_its_leader() -> None:
    objects = render([a_model("big", routing="precise", gpus=16)])
    (lws,) = [o for o in objects if o["kind"] == "LeaderWorkerSet"]
    template = lws["spec"]["leaderWorkerTemplate"]
    leader = template["leaderTemplate"]["spec"]["containers"][0]
    worker = template["workerTemplate"]["spec"]["containers"][0]
    assert f"'{json.dumps(PUBLISHING, separators=(',', ':'))}'" in leader["command"][2]
    assert ports(leader) == PORTS
    assert "kv-events" not in worker["command"][2] and "ports" not in worker
    for role in ("leaderTemplate", "workerTemplate"):
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}}
        kubernetes_validate.validate(
            {**pod, "spec": template[role]["spec"]}, KUBERNETES, strict=True
        )


def test_what_would_break_the_subscription_is_refused_with_the_fix() -> None:
    for port in (KV_EVENTS_PORT, KV_REPLAY_PORT):
        with pytest.raises(RenderError) as err:
            render([a_model("plain")], settings=RenderSettings(engine_port=port))
        (problem,) = err.value.problems
        assert problem.startswith(f"engine port {port} is where engines publish KV-cache events")
    # Engine arguments of its own: gpufleet's ports would not be the engine's.
    own = '{"enable_kv_cache_events":true,"endpoint":"tcp://*:6000"}'
    for args in (f"['--kv-events-config', '{own}']", f"['--kv-events-config={own}']"):
        with pytest.raises(RenderError) as err:
            render([a_model("own", routing="precise", args=args)])
        (problem,) = err.value.problems
        assert problem.startswith("own: spec.engineArgs set --kv-events-config")
        assert "remove it" in problem
    doc = yaml.safe_load((DATA / "disaggregated.yaml").read_text())
    doc["spec"]["routing"] = {"prefixIndex": "precise"}
    doc["spec"]["disaggregation"]["prefill"]["engineArgs"] += ["--kv-events-config", own]
    (pool_args,) = load_text(yaml.safe_dump(doc))
    with pytest.raises(RenderError) as err:
        render([pool_args])
    assert any(
        p.startswith("llama-pd: spec.disaggregation.prefill.engineArgs set --kv-events-config")
        for p in err.value.problems
    )
    # Without a precise index the engine's own configuration is the user's business.
    objects = render([a_model("approximate", args=f"['--kv-events-config', '{own}']")])
    (deployment,) = [o for o in objects if o["kind"] == "Deployment"]
    assert kv_config(engine(deployment)["args"]) == json.loads(own)
    assert ports(engine(deployment)) == {"http": PORT}


# -- the pod runtime --------------------------------------------------------------------------


async def ready(runtime: KubernetesRuntime, replica_id: str) -> Replica:
    def found() -> list[Replica]:
        return [r for r in runtime.replicas() if r.id == replica_id and r.phase is Phase.READY]

    (replica,) = await eventually(found, f"{replica_id} ready")
    return replica


async def test_a_ready_pod_gives_its_event_endpoints_at_its_ip_to_every_view() -> None:
    kube = FakeKube()
    operator = KubernetesRuntime(kube)
    await operator.start_watching()
    precise, plain = a_model("precise", routing="precise"), a_model("plain")
    pd = precise_pd_model()
    gateway: KubernetesRuntime | None = None
    try:
        v4 = await operator.start(ReplicaRequest("precise", 1, precise.spec))
        v6 = await operator.start(ReplicaRequest("precise", 1, precise.spec))
        other = await operator.start(ReplicaRequest("plain", 1, plain.spec))
        prefill = await operator.start(
            ReplicaRequest("llama-pd", 1, pd.spec.pool("prefill"), "prefill")
        )
        pod = kube.peek("Pod", NS, v4.id)
        assert pod is not None
        assert ports(pod["spec"]["containers"][0])["kv-events"] == KV_EVENTS_PORT
        assert v4.kv_events is None and v4.kv_replay is None  # no IP yet
        kube.pod_ready(NS, v4.id, "10.0.0.7")
        kube.pod_ready(NS, v6.id, "fd00:10:244::7")
        kube.pod_ready(NS, other.id, "10.0.0.8")
        kube.pod_ready(NS, prefill.id, "10.0.0.9")
        expected = {
            v4.id: (
                "http://10.0.0.7:8000",
                f"tcp://10.0.0.7:{KV_EVENTS_PORT}",
                f"tcp://10.0.0.7:{KV_REPLAY_PORT}",
            ),
            v6.id: (  # an IPv6 pod IP in brackets, in every endpoint
                "http://[fd00:10:244::7]:8000",
                f"tcp://[fd00:10:244::7]:{KV_EVENTS_PORT}",
                f"tcp://[fd00:10:244::7]:{KV_REPLAY_PORT}",
            ),
            other.id: ("http://10.0.0.8:8000", None, None),
            prefill.id: (
                "http://10.0.0.9:8000",
                f"tcp://10.0.0.9:{KV_EVENTS_PORT}",
                f"tcp://10.0.0.9:{KV_REPLAY_PORT}",
            ),
        }
        for rid, endpoints in expected.items():
            replica = await ready(operator, rid)
            assert (replica.url, replica.kv_events, replica.kv_replay) == endpoints, rid
        # A view that was never told the specs — the gateway's, a restarted operator's — reads
        # the same endpoints off the pods.
        gateway = KubernetesRuntime(kube, engine_key="k")
        await gateway.start_watching()
        for rid, endpoints in expected.items():
            replica = await ready(gateway, rid)
            assert (replica.url, replica.kv_events, replica.kv_replay) == endpoints, rid
    finally:
        if gateway is not None:
            await gateway.close()
        await operator.close()
