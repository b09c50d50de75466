"""The Helm chart's objects and the optional CRDs on the test control plane, for any test.

The chart is rendered by Helm's own library (helm-python-sdk, offline) as release ``gf`` in
namespace ``gpufleet`` — the identities ``ControlPlane.sa_token`` hands out belong to that
release — and applied with ``kubectl apply --server-side`` as the admin. ``release(...)`` gives
the namespace (labelled for Pod Security ``restricted``, as the chart's README asks) and the
chart's objects, and removes both afterwards with the cluster-scoped ones (ClusterRole and
binding, PriorityClasses it created). ``lws_crd(...)`` installs the LeaderWorkerSet CRD of
``tests/data/k8s/lws-crd.yaml`` and removes it again, so a test that wants the kind absent
finds it absent.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import helm_python
import yaml

from tests.kube.controlplane import RELEASE, RELEASE_NS, ROOT

__all__ = [
    "CHART",
    "LWS_CRD",
    "POD_SECURITY_LABELS",
    "STORE",
    "chart_objects",
    "lws_crd",
    "release",
    "to_stream",
]

CHART = ROOT / "deploy" / "helm" / "gpufleet"
LWS_CRD = ROOT / "tests" / "data" / "k8s" / "lws-crd.yaml"
STORE = {"store": {"url": "postgresql+psycopg://gpufleet:secret@postgres:5432/gpufleet"}}
#: What the chart's README asks of its namespace: every pod there meets ``restricted``.
POD_SECURITY_LABELS = {
    f"pod-security.kubernetes.io/{mode}": "restricted" for mode in ("enforce", "warn", "audit")
}

Kubectl = Callable[..., subprocess.CompletedProcess[str]]


def chart_objects(values: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every object the chart renders for release ``gf`` in ``gpufleet`` (NOTES.txt aside)."""
    chart = helm_python.Chart.load(CHART)
    out = chart.render(dict(values or STORE), name=RELEASE, namespace=RELEASE_NS, is_install=True)
    docs: list[dict[str, Any]] = []
    for path, text in sorted(out.items()):
        if not path.endswith("NOTES.txt"):
            docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def to_stream(docs: Sequence[Mapping[str, Any]]) -> str:
    return yaml.safe_dump_all([dict(d) for d in docs], sort_keys=False)


def _exists(kubectl: Kubectl, *what: str) -> bool:
    return kubectl("get", *what, "--ignore-not-found", "-o", "name").stdout.strip() != ""


@contextlib.contextmanager
def lws_crd(kubectl: Kubectl) -> Iterator[None]:
    """The LeaderWorkerSet CRD, installed for the block and removed after it (its objects
    with it) — unless it was there before, then left as found."""
    name = "crd/leaderworkersets.leaderworkerset.x-k8s.io"
    there = _exists(kubectl, name)
    kubectl("apply", "--server-side", "-f", str(LWS_CRD))
    kubectl("wait", "--for=condition=Established", name, "--timeout=60s")
    try:
        yield
    finally:
        if not there:
            kubectl("delete", name, "--wait=true", "--timeout=120s")


@contextlib.contextmanager
def release(kubectl: Kubectl, values: Mapping[str, Any] | None = None) -> Iterator[str]:
    """The namespace ``gpufleet`` (Pod Security ``restricted``) with the chart applied in it;
    yields kubectl's stderr of the apply (where the API server's warnings are). Afterwards the
    chart's objects, the namespace and the cluster-scoped objects this made are deleted."""
    docs = chart_objects(values)
    cluster_scoped = [
        f"{d['kind'].lower()}/{d['metadata']['name']}"
        for d in docs
        if "namespace" not in d["metadata"]
    ]
    made = [name for name in cluster_scoped if not _exists(kubectl, name)]
    namespace_made = not _exists(kubectl, f"namespace/{RELEASE_NS}")
    if namespace_made:
        kubectl("create", "namespace", RELEASE_NS)
    labels = [f"{k}={v}" for k, v in POD_SECURITY_LABELS.items()]
    kubectl("label", "--overwrite", f"namespace/{RELEASE_NS}", *labels)
    try:
        applied = kubectl("apply", "--server-side", "-f", "-", input=to_stream(docs))
        yield applied.stderr
    finally:
        namespaced = [d for d in docs if "namespace" in d["metadata"]]
        kubectl(
            "delete", "--ignore-not-found", "--wait=false", "-f", "-", input=to_stream(namespaced)
        )
        # No kubelet finishes a bound pod's deletion: do it, or the namespace never goes.
        kubectl("delete", "pods", "--all", "-n", RELEASE_NS, "--grace-period=0", "--force")
        for name in made:
            kubectl("delete", "--ignore-not-found", "--wait=true", name)
        if namespace_made:
            kubectl("delete", f"namespace/{RELEASE_NS}", "--wait=true", "--timeout=120s")
