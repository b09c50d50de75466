"""The chart's CRDs on a real API server (issue 13, point 1, point 8 and the schema's missing
rules): installed and Established; every example Model and Tenant of the repository accepted by
``kubectl apply``; every document gpufleet's spec rejects (tests/crd_cases.py) refused by the API
server with the CEL rule's message; ``kubectl scale`` mapped to ``spec.replicas.min`` and refused
above ``max`` instead of storing a model gpufleet cannot run."""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
import yaml

from gpufleet.errors import SpecError
from gpufleet.runtime.kubernetes.resources import model_from_resource, tenant_from_resource
from tests.crd_cases import ACCEPTED, REJECTED, ROOT, Rejected, examples, gpufleet_reads, model

Kubectl = Callable[..., subprocess.CompletedProcess[str]]
CHART_CRDS = ROOT / "deploy" / "helm" / "gpufleet" / "crds"


def test_the_charts_crds_are_established_and_explained(kubectl: Kubectl) -> None:
    for name in ("models.gpufleet.io", "tenants.gpufleet.io"):
        crd = json.loads(kubectl("get", "crd", name, "-o", "json").stdout)
        conditions = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
        assert conditions["Established"] == "True", name
        assert conditions["NamesAccepted"] == "True", name
    # What the issue's user ran (client-side apply of the folder), and render --crds' output.
    kubectl("apply", "--dry-run=server", "-f", str(CHART_CRDS))
    rendered = subprocess.run(
        [sys.executable, "-m", "gpufleet", "render", "--crds", "-f", "deploy/e2e/model.yaml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    crds = [
        d for d in yaml.safe_load_all(rendered) if d and d["kind"] == "CustomResourceDefinition"
    ]
    assert len(crds) == 3
    kubectl("apply", "--dry-run=server", "-f", "-", input=yaml.safe_dump_all(crds))
    resources = kubectl("api-resources", "--api-group=gpufleet.io", "-o", "name").stdout.split()
    assert sorted(resources) == ["gpujobs.gpufleet.io", "models.gpufleet.io", "tenants.gpufleet.io"]
    replicas = kubectl("explain", "models.spec.replicas").stdout
    assert "min\t" in replicas and "max\t" in replicas
    assert "autoscaling" in kubectl("explain", "models.spec").stdout
    assert "limits" in kubectl("explain", "tenants.spec").stdout


async def test_every_example_model_and_tenant_is_applied(kubectl: Kubectl, namespace: str) -> None:
    suffix = secrets.token_hex(3)
    tenants: list[str] = []
    try:
        for i, (where, doc) in enumerate(examples()):
            gpufleet_reads(doc)
            doc = json.loads(json.dumps(doc))
            # Unique names: several files share one, and Tenants are cluster-wide.
            doc["metadata"]["name"] = f"{doc['metadata']['name'][:40]}-{i}-{suffix}"
            if doc["kind"] == "Tenant":
                tenants.append(doc["metadata"]["name"])
            else:
                doc["metadata"]["namespace"] = namespace
            done = kubectl("apply", "-f", "-", input=yaml.safe_dump(doc), check=False)
            assert done.returncode == 0, f"{where}: {done.stderr}"
            # What the server stored, defaults filled in, is a resource gpufleet reads.
            kind, name = doc["kind"].lower(), doc["metadata"]["name"]
            scope = ["-n", namespace] if kind == "model" else []
            stored = json.loads(kubectl("get", kind, name, *scope, "-o", "json").stdout)
            if kind == "tenant":
                tenant_from_resource(stored)
            elif not (stored["spec"].get("source") or "").startswith("file:"):  # author's disk
                model_from_resource(stored)
        listed = kubectl("get", "models", "-n", namespace, "-o", "name").stdout.split()
        assert len(listed) == sum(1 for _, d in examples() if d["kind"] == "Model")
    finally:
        for name in tenants:
            kubectl("delete", "tenant", name, "--ignore-not-found", check=False)


@pytest.mark.parametrize("case", REJECTED, ids=lambda c: c.name)
def test_what_gpufleet_rejects_kubectl_apply_rejects(kubectl: Kubectl, case: Rejected) -> None:
    text = yaml.safe_dump(case.doc)
    with pytest.raises(SpecError):
        gpufleet_reads(case.doc)
    refused = kubectl(
        "apply", "--dry-run=server", "-n", "default", "-f", "-", input=text, check=False
    )
    assert refused.returncode != 0, f"the API server accepted {case.name}: {refused.stdout}"
    # A path into a list names an item (spec.endpoints[0].apiKey) or none (a pattern's error:
    # spec.schedule.windows[]), whichever the server and the case say: compared without it.
    said, path = (re.sub(r"\[\d+\]", "[]", text) for text in (refused.stderr, case.path))
    assert f"{path}:" in said, refused.stderr
    assert case.message in refused.stderr, refused.stderr


@pytest.mark.parametrize("name,doc", ACCEPTED, ids=[n for n, _ in ACCEPTED])
def test_the_rules_admit_the_edges_gpufleet_admits(
    kubectl: Kubectl, name: str, doc: dict[str, Any]
) -> None:
    gpufleet_reads(doc)
    kubectl("apply", "--dry-run=server", "-n", "default", "-f", "-", input=yaml.safe_dump(doc))


def _replicas(kubectl: Kubectl, namespace: str, name: str) -> dict[str, Any]:
    stored = json.loads(kubectl("get", "model", name, "-n", namespace, "-o", "json").stdout)
    model_from_resource(stored)  # still a model gpufleet can run
    replicas: dict[str, Any] = stored["spec"]["replicas"]
    return replicas


async def test_kubectl_scale_sets_the_floor_and_is_refused_above_max(
    kubectl: Kubectl, namespace: str
) -> None:
    doc = model("scaled", replicas={"min": 1, "max": 3})
    kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(doc))
    kubectl("scale", "-n", namespace, "model/scaled", "--replicas=2")
    assert _replicas(kubectl, namespace, "scaled") == {"min": 2, "max": 3}
    scale = json.loads(
        kubectl("get", "-n", namespace, "model/scaled", "--subresource=scale", "-o", "json").stdout
    )
    assert scale["kind"] == "Scale" and scale["spec"]["replicas"] == 2
    # Above max: refused with the rule's message, and the model stays as it was.
    refused = kubectl("scale", "-n", namespace, "model/scaled", "--replicas=5", check=False)
    assert refused.returncode != 0
    assert "spec.replicas.max:" in refused.stderr
    assert "must be >= replicas.min" in refused.stderr
    assert _replicas(kubectl, namespace, "scaled") == {"min": 2, "max": 3}
    # To zero: a floor of 0 lets the autoscaler stop the last replica when idle.
    kubectl("scale", "-n", namespace, "model/scaled", "--replicas=0")
    assert _replicas(kubectl, namespace, "scaled") == {"min": 0, "max": 3}
    kubectl("scale", "-n", namespace, "model/scaled", "--replicas=3")
    assert _replicas(kubectl, namespace, "scaled") == {"min": 3, "max": 3}
