"""The Helm chart, rendered by Helm itself (helm-python-sdk embeds Helm's Go library; offline)
and every object validated against Kubernetes 1.34's schemas; the chart's CRDs are the ones
generated from the spec."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import helm_python
import kubernetes_validate
import pytest
import yaml

from gpufleet.runtime.kubernetes.common import KV_EVENTS_PORT, KV_REPLAY_PORT
from gpufleet.spec.crd import crds

CHART = Path(__file__).parents[2] / "deploy" / "helm" / "gpufleet"
KUBERNETES = "1.34.0"
STORE = {"store": {"url": "postgresql+psycopg://gpufleet:secret@postgres:5432/gpufleet"}}


def render(values: dict[str, Any]) -> list[dict[str, Any]]:
    chart = helm_python.Chart.load(CHART)
    out = chart.render(values, name="gf", namespace="gpufleet", is_install=True)
    docs = []
    for path, text in sorted(out.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def validate_all(docs: list[dict[str, Any]]) -> None:
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # the Prometheus Operator's CRD, not in Kubernetes' schemas
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)


def test_the_chart_lints_clean() -> None:
    report = helm_python.lint(CHART, STORE, strict=True)
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_default_install_renders_valid_objects() -> None:
    docs = render(STORE)
    validate_all(docs)
    kinds = sorted({d["kind"] for d in docs})
    assert kinds == [
        "ClusterRole", "ClusterRoleBinding", "ConfigMap", "Deployment", "NetworkPolicy",
        "PersistentVolumeClaim", "PodDisruptionBudget", "PriorityClass", "Role",
        "RoleBinding", "Secret", "Service", "ServiceAccount",
    ]  # fmt: skip
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    operator = deployments["gf-operator"]["spec"]["template"]["spec"]["containers"][0]
    assert operator["args"] == ["operator", "--namespace", "gpufleet"]
    assert operator["image"] == "ghcr.io/gpufleet/gpufleet:0.1.0"
    env = {
        e["name"]: e.get("valueFrom", {}).get("secretKeyRef", e.get("value"))
        for e in operator["env"]
    }
    assert env == {
        "GPUFLEET_STORE": {"name": "gf-store", "key": "url"},  # no Redis configured
        "GPUFLEET_ENGINE_PORT": "8000",
        "GPUFLEET_JOB_CHECKPOINT_SIZE": "10Gi",  # GPU jobs' claims; the default class
    }
    for deployment in deployments.values():
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in pod["containers"]:
            assert container["securityContext"]["readOnlyRootFilesystem"] is True
            assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}


def test_every_option_renders_valid_objects() -> None:
    docs = render(
        {
            "store": {"existingSecret": "pg-credentials", "secretKey": "dsn"},
            "redis": {"url": "redis://redis:6379/0"},
            "image": {"tag": "0.1.1"},
            "gateway": {
                "replicas": 3,
                "ingress": {"enabled": True, "className": "nginx", "tlsSecret": "llm-tls"},
                "allowFromNamespaces": ["apps", "notebooks"],
            },
            "modelCache": {"storageClass": "cephfs"},
            "serviceMonitor": {"enabled": True},
            "jobs": {"checkpointStorageClass": "cephfs", "checkpointSize": "50Gi"},
            "externalEndpoints": {"keySecrets": ["hosted-llm-key"]},
        }
    )
    validate_all(docs)
    by = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    assert ("Secret", "gf-store") not in by  # the existing one is used
    gateway = by[("Deployment", "gf-gateway")]
    assert gateway["spec"]["replicas"] == 3
    env = {
        e["name"]: e.get("valueFrom", {}).get("secretKeyRef", e.get("value"))
        for e in gateway["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["GPUFLEET_STORE"] == {"name": "pg-credentials", "key": "dsn"}
    assert env["GPUFLEET_REDIS"] == {"name": "gf-redis", "key": "url"}
    assert by[("Ingress", "gf-gateway")]["spec"]["tls"][0]["secretName"] == "llm-tls"
    allowed = by[("NetworkPolicy", "gf-gateway")]["spec"]["ingress"][0]["from"]
    assert [
        a["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"] for a in allowed
    ] == ["apps", "notebooks"]
    assert by[("ServiceMonitor", "gf-gateway")]["spec"]["endpoints"][0]["path"] == "/metrics"
    operator = by[("Deployment", "gf-operator")]["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "GPUFLEET_JOB_CHECKPOINT_CLASS", "value": "cephfs"} in operator["env"]
    assert {"name": "GPUFLEET_JOB_CHECKPOINT_SIZE", "value": "50Gi"} in operator["env"]
    # External endpoints' keys: both identities may read the listed Secret by name, no other.
    for role in (("Role", "gf-gateway"), ("Role", "gf-operator")):
        keys = [r for r in by[role]["rules"] if r.get("resourceNames") == ["hosted-llm-key"]]
        assert keys == [
            {
                "apiGroups": [""],
                "resources": ["secrets"],
                "resourceNames": ["hosted-llm-key"],
                "verbs": ["get"],
            }
        ], role


def test_an_install_without_a_store_fails_with_the_fix() -> None:
    with pytest.raises(helm_python.HelmError) as err:
        render({})
    assert "set store.url or store.existingSecret" in str(err.value)


def test_the_charts_crds_are_the_generated_ones() -> None:
    shipped = {p.name: yaml.safe_load(p.read_text()) for p in (CHART / "crds").glob("*.yaml")}
    generated = {f"{c['metadata']['name']}.yaml": c for c in crds()}
    assert shipped == generated, "run scripts/generate-crds"
    for crd in shipped.values():
        kubernetes_validate.validate(crd, KUBERNETES, strict=True)


def rules(doc: dict[str, Any]) -> set[tuple[str, str, str]]:
    """(group, resource, verb) triples a Role or ClusterRole grants."""
    return {
        (group, resource, verb)
        for rule in doc["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def test_the_gateway_may_follow_what_it_routes_to_and_nothing_more() -> None:
    by = {(d["kind"], d["metadata"]["name"]): d for d in render(STORE)}
    gateway = rules(by[("Role", "gf-gateway")])
    for resource in ("models", "pods", "leaderworkersets"):
        group = {
            "models": "gpufleet.io",
            "pods": "",
            "leaderworkersets": "leaderworkerset.x-k8s.io",
        }
        assert {(group[resource], resource, v) for v in ("get", "list", "watch")} <= gateway
    assert ("gpufleet.io", "models", "patch") in gateway  # the wake stamp
    assert ("", "pods/log", "get") in gateway
    assert not {r for r in gateway if r[2] in ("create", "delete") and r[1] != "models"}
    operator = rules(by[("ClusterRole", "gf-operator")])
    assert ("", "pods/log", "get") in operator
    assert ("gpufleet.io", "tenants/status", "patch") in operator
    assert ("batch", "jobs", "delete") in operator
    # Leases only in its own namespace: it cannot take another component's lease.
    assert not {r for r in operator if r[1] == "leases"}
    assert ("coordination.k8s.io", "leases", "update") in rules(by[("Role", "gf-operator")])
    assert by[("RoleBinding", "gf-operator")]["roleRef"]["name"] == "gf-operator"


def test_the_engine_port_reaches_the_policy_the_operator_and_the_gateway() -> None:
    docs = render({**STORE, "engine": {"port": 9000}, "gateway": {"port": 8080}})
    validate_all(docs)
    by = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    engines = by[("NetworkPolicy", "gf-engines")]["spec"]["ingress"]
    # The engine port, and the ports engines publish KV-cache events on (the gateway
    # subscribes there with routing.prefixIndex: precise): the code's, which the chart repeats.
    assert engines[0]["ports"] == [
        {"protocol": "TCP", "port": port} for port in (9000, KV_EVENTS_PORT, KV_REPLAY_PORT)
    ]
    # The pods of one multi-node engine reach each other (Ray, NCCL) on any port.
    assert engines[1] == {
        "from": [{"podSelector": {"matchLabels": {"app.kubernetes.io/component": "engine"}}}]
    }
    for name in ("gf-operator", "gf-gateway"):
        container = by[("Deployment", name)]["spec"]["template"]["spec"]["containers"][0]
        assert {"name": "GPUFLEET_ENGINE_PORT", "value": "9000"} in container["env"]
    gateway = by[("Deployment", "gf-gateway")]["spec"]["template"]["spec"]["containers"][0]
    assert gateway["args"][-2:] == ["--port", "8080"]
    assert gateway["ports"] == [{"name": "http", "containerPort": 8080}]


def test_only_gateways_read_the_engine_key_that_the_operator_may_make() -> None:
    by = {(d["kind"], d["metadata"]["name"]): d for d in render(STORE)}
    ref = {"name": "gpufleet-engine-key", "key": "key"}

    def secret_env(name: str) -> list[Any]:
        (container,) = by[("Deployment", name)]["spec"]["template"]["spec"]["containers"]
        return [
            (e["name"], e["valueFrom"]["secretKeyRef"])
            for e in container["env"]
            if e.get("valueFrom", {}).get("secretKeyRef", {}).get("name") == ref["name"]
        ]

    assert secret_env("gf-gateway") == [("GPUFLEET_ENGINE_KEY", ref)]
    assert secret_env("gf-operator") == []
    # The operator may make Secrets and read that one by name, in its namespace only.
    secrets = [r for r in by[("Role", "gf-operator")]["rules"] if "secrets" in r["resources"]]
    assert secrets == [
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]},
        {
            "apiGroups": [""],
            "resources": ["secrets"],
            "resourceNames": ["gpufleet-engine-key"],
            "verbs": ["get"],
        },
    ]
    assert not {r for r in rules(by[("ClusterRole", "gf-operator")]) if r[1] == "secrets"}
    assert not {r for r in rules(by[("Role", "gf-gateway")]) if r[1] == "secrets"}


def test_the_operator_reads_the_dcgm_exporter_only_when_told_where() -> None:
    def operator_env(values: dict[str, Any]) -> dict[str, Any]:
        docs = render({**STORE, **values})
        validate_all(docs)
        (deployment,) = [
            d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "gf-operator"
        ]
        return {
            e["name"]: e.get("value")
            for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]
        }

    assert "GPUFLEET_DCGM_URL" not in operator_env({})
    url = "http://prometheus.monitoring:9090/api/v1/query"
    assert operator_env({"operator": {"dcgmUrl": url}})["GPUFLEET_DCGM_URL"] == url
