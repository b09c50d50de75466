"""The Helm chart on a real API server: every object it renders accepted in a namespace that
enforces Pod Security ``restricted`` (the pods its Deployments make included), and its two
service accounts allowed exactly what gpufleet calls — checked by SelfSubjectAccessReview for
every verb, and by the calls themselves as those identities (RBAC enforced)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import yaml

from gpufleet.operator.engine_key import ensure_engine_key
from gpufleet.runtime.external import KeyError_
from gpufleet.runtime.kubernetes import KubernetesRuntime, RenderSettings
from gpufleet.runtime.kubernetes.api import Conflict
from gpufleet.runtime.kubernetes.client import ClientKube
from gpufleet.runtime.kubernetes.manifests import (
    leader_worker_set,
    loader_job,
    model_disruption_budget,
    model_service,
)
from gpufleet.runtime.kubernetes.pods import ENGINE_KEY_SECRET
from gpufleet.runtime.kubernetes.secret_keys import SecretKeys
from gpufleet.runtime.kubernetes.tenants import tenant_objects
from gpufleet.spec import ApiKeySource, load_text, load_text_resources
from tests.kube.chart import STORE, Kubectl, chart_objects, lws_crd, release, to_stream
from tests.kube.controlplane import RELEASE_NS, ROOT, ControlPlane

NS = RELEASE_NS
MODEL = yaml.safe_load(
    (ROOT / "tests" / "data" / "k8s" / "models.yaml").read_text().split("---")[0]
)


# -- the release, once for the module ---------------------------------------------------------


@pytest.fixture(scope="module")
def admin_kubectl(control_plane: ControlPlane) -> Kubectl:
    """kubectl as the admin, for module-scoped fixtures (conftest's is per test)."""
    config = control_plane.kubeconfig("admin")

    def run(*args: str, input: str | None = None, check: bool = True) -> Any:
        done = subprocess.run(
            ["kubectl", f"--kubeconfig={config}", *args],
            capture_output=True,
            text=True,
            input=input,
            timeout=180,
        )
        if check and done.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {done.stderr or done.stdout}")
        return done

    return run


@pytest.fixture(scope="module")
def installed(admin_kubectl: Kubectl) -> Iterator[str]:
    """The chart applied as release gf in gpufleet, with the LeaderWorkerSet CRD; yields the
    apply's warnings."""
    with lws_crd(admin_kubectl), release(admin_kubectl) as warnings:
        yield warnings


def warnings_of(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.lower().startswith("warning")]


def wait_for(what: str, probe: Any, timeout_s: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


# -- identities -------------------------------------------------------------------------------


def call(
    plane: ControlPlane, token: str, method: str, path: str, body: Any = None,
    content_type: str = "application/json",
) -> tuple[int, Any]:  # fmt: skip
    """One REST call with ``token``: (HTTP status, JSON body or None)."""
    request = urllib.request.Request(
        plane.url + path,
        method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"authorization": f"Bearer {token}", "content-type": content_type},
    )
    context: ssl.SSLContext = plane.ssl_context()
    try:
        with urllib.request.urlopen(request, context=context, timeout=30) as resp:
            text = resp.read()
            status = resp.status
    except urllib.error.HTTPError as err:
        text, status = err.read(), err.code
    try:
        return status, json.loads(text) if text else None
    except json.JSONDecodeError:
        return status, None


def allowed(
    plane: ControlPlane, who: str, verb: str, group: str, resource: str, namespace: str
) -> bool:
    """SelfSubjectAccessReview as the chart's service account ``who`` (gf-operator, gf-gateway)."""
    resource, _, subresource = resource.partition("/")
    attributes = {"verb": verb, "group": group, "resource": resource, "namespace": namespace}
    if subresource:
        attributes["subresource"] = subresource
    review = {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SelfSubjectAccessReview",
        "spec": {"resourceAttributes": attributes},
    }
    status, answer = call(
        plane, plane.sa_token(who), "POST",
        "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews", review,
    )  # fmt: skip
    assert status == 201, answer
    return bool(answer["status"].get("allowed"))


def client_as(plane: ControlPlane, who: str) -> ClientKube:
    """The API as ``who``, through a token kubeconfig read as the operator reads its own."""
    config = plane.kubeconfig(who, token=plane.sa_token(who))
    return ClientKube.from_environment(str(config))


@pytest.fixture
async def gateway(control_plane: ControlPlane, installed: str) -> AsyncIterator[ClientKube]:
    client = client_as(control_plane, "gf-gateway")
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
async def operator(control_plane: ControlPlane, installed: str) -> AsyncIterator[ClientKube]:
    client = client_as(control_plane, "gf-operator")
    try:
        yield client
    finally:
        await client.close()


# -- every object accepted --------------------------------------------------------------------


def test_every_object_of_the_chart_is_accepted_under_pod_security_restricted(
    installed: str, admin_kubectl: Kubectl
) -> None:
    assert warnings_of(installed) == []  # PodSecurity warns here of what it would refuse
    docs = chart_objects()
    there = admin_kubectl("get", "-f", "-", "-o", "name", input=to_stream(docs)).stdout.split()
    assert len(there) == len(docs)

    # Pod Security is enforced on pods: the ReplicaSets' pods exist only if it admitted them.
    def pods(name: str) -> list[str]:
        selector = f"app.kubernetes.io/name={name}"
        out = admin_kubectl("get", "pods", "-n", NS, "-l", selector, "-o", "name")
        return out.stdout.split()

    for name in ("gpufleet-operator", "gpufleet-gateway"):
        wait_for(f"{name}'s 2 pods", lambda name=name: len(pods(name)) == 2)
    # ... and enforced indeed: a pod that is not restricted is refused there.
    loose = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "loose", "namespace": NS},
        "spec": {"containers": [{"name": "c", "image": "busybox"}]},
    }
    refused = admin_kubectl(
        "apply", "--dry-run=server", "-f", "-", input=to_stream([loose]), check=False
    )
    assert refused.returncode != 0 and 'violates PodSecurity "restricted' in refused.stderr


def test_every_option_of_the_chart_is_accepted_too(installed: str, admin_kubectl: Kubectl) -> None:
    values = {
        "store": {"existingSecret": "pg-credentials", "secretKey": "dsn"},
        "redis": {"url": "redis://redis:6379/0"},
        "image": {"tag": "0.1.1"},
        "gateway": {
            "replicas": 3,
            "port": 8080,
            "ingress": {"enabled": True, "className": "nginx", "tlsSecret": "llm-tls"},
            "allowFromNamespaces": ["apps", "notebooks"],
        },
        "engine": {"port": 9000},
        "modelCache": {"accessMode": "ReadWriteMany", "size": "500Gi"},
    }
    docs = chart_objects(values)
    applied = admin_kubectl(
        "apply", "--server-side", "--force-conflicts", "-f", "-", input=to_stream(docs)
    )
    assert warnings_of(applied.stderr) == []
    policy = json.loads(admin_kubectl("get", "netpol", "gf-engines", "-n", NS, "-o", "json").stdout)
    assert policy["spec"]["ingress"][0]["ports"][0] == {"protocol": "TCP", "port": 9000}
    ingress = admin_kubectl("get", "ingress", "gf-gateway", "-n", NS, "-o", "name")
    assert ingress.stdout.strip() == "ingress.networking.k8s.io/gf-gateway"
    # Back to the defaults for the tests after this one.
    admin_kubectl("delete", "ingress/gf-gateway", "netpol/gf-gateway", "secret/gf-redis", "-n", NS)
    admin_kubectl(
        "apply",
        "--server-side",
        "--force-conflicts",
        "-f",
        "-",
        input=to_stream(chart_objects(STORE)),
    )


# -- what each identity may do -----------------------------------------------------------------

#: (group, resource, verbs, namespace; "" = all namespaces / cluster-scoped) the gateway calls:
#: src/gpufleet/cluster.py and the KubernetesRuntime it reads pods with.
GATEWAY_CALLS = [
    ("gpufleet.io", "models", "get list watch create update patch delete", NS),
    ("", "pods", "get list watch", NS),
    ("", "pods/log", "get", NS),
    ("leaderworkerset.x-k8s.io", "leaderworkersets", "get list watch", NS),
]
GATEWAY_DENIED = [
    ("", "pods", "create delete", NS),
    ("leaderworkerset.x-k8s.io", "leaderworkersets", "create delete", NS),
    ("", "secrets", "get list", NS),
    ("gpufleet.io", "models", "list", "default"),
    ("gpufleet.io", "tenants", "list", ""),
    ("", "nodes", "list", ""),
]
TENANT_NS = "tenant-anyone"
#: What the operator calls: src/gpufleet/operator/ (leadership, the model and tenant mirrors,
#: status), runtime/kubernetes/runtime.py (engine pods, their logs, loader Jobs,
#: LeaderWorkerSets) and the node inventory.
OPERATOR_CALLS = [
    ("gpufleet.io", "models", "get list watch", NS),
    ("gpufleet.io", "models/status", "get update patch", NS),
    ("gpufleet.io", "tenants", "get list watch", ""),
    ("gpufleet.io", "tenants/status", "get update patch", ""),
    ("", "nodes", "get list watch", ""),
    ("", "pods", "list watch", ""),
    ("", "pods", "get list watch create delete", NS),
    ("", "pods/log", "get", NS),
    ("batch", "jobs", "get list watch create update delete", NS),
    ("gpufleet.io", "gpujobs", "get list watch", NS),
    ("gpufleet.io", "gpujobs/status", "get update patch", NS),
    ("", "persistentvolumeclaims", "get list create delete", NS),
    ("leaderworkerset.x-k8s.io", "leaderworkersets", "get list watch create delete", NS),
    ("", "services", "get list watch create update patch delete", NS),
    ("policy", "poddisruptionbudgets", "get list watch create update patch delete", NS),
    ("coordination.k8s.io", "leases", "get create update", NS),
    ("", "events", "create patch", NS),
    ("", "secrets", "create", NS),  # the engine key's, when missing (and get of that one)
    ("events.k8s.io", "events", "create patch", NS),
    ("", "namespaces", "get list watch create update patch delete", ""),
    ("", "resourcequotas", "list watch", ""),
    ("", "resourcequotas", "get create update patch delete", TENANT_NS),
    ("networking.k8s.io", "networkpolicies", "list watch", ""),
    ("networking.k8s.io", "networkpolicies", "get create update patch delete", TENANT_NS),
    ("rbac.authorization.k8s.io", "roles", "list watch", ""),
    ("rbac.authorization.k8s.io", "roles", "get create update delete bind escalate", TENANT_NS),
    ("rbac.authorization.k8s.io", "rolebindings", "list watch", ""),
    ("rbac.authorization.k8s.io", "rolebindings", "get create update delete", TENANT_NS),
]
OPERATOR_DENIED = [
    ("", "secrets", "get list", NS),
    ("", "secrets", "list", ""),
    ("coordination.k8s.io", "leases", "get update", "kube-system"),  # not other components'
    ("gpufleet.io", "models", "create delete", NS),
    ("gpufleet.io", "tenants", "create delete", ""),
    ("gpufleet.io", "gpujobs", "create delete", NS),
]


@pytest.mark.parametrize(
    ("who", "calls", "denied"),
    [
        ("gf-gateway", GATEWAY_CALLS, GATEWAY_DENIED),
        ("gf-operator", OPERATOR_CALLS, OPERATOR_DENIED),
    ],
)
def test_each_service_account_may_make_the_calls_it_makes_and_no_others(
    control_plane: ControlPlane,
    installed: str,
    who: str,
    calls: list[tuple[str, str, str, str]],
    denied: list[tuple[str, str, str, str]],
) -> None:
    def check(table: list[tuple[str, str, str, str]]) -> list[str]:
        return [
            f"{verb} {group or 'core'}/{resource} in {namespace or 'all namespaces'}"
            for group, resource, verbs, namespace in table
            for verb in verbs.split()
            if allowed(control_plane, who, verb, group, resource, namespace) != (table is calls)
        ]

    assert check(calls) == [], f"{who} may not"
    assert check(denied) == [], f"{who} may, and should not"


# -- the calls themselves, as each identity ----------------------------------------------------


def a_pod(kubectl: Kubectl) -> str:
    """The name of one of the chart's pods (the controller manager makes them shortly)."""
    out = wait_for("a pod", lambda: kubectl("get", "pods", "-n", NS, "-o", "name").stdout.split())
    return str(out[0]).removeprefix("pod/")


async def test_the_gateway_follows_models_pods_and_leaderworkersets(
    control_plane: ControlPlane, gateway: ClientKube, kube: ClientKube, admin_kubectl: Kubectl
) -> None:
    # What the gateway does at start: adopt engine pods and multi-node groups, then watch pods
    # (a 403 on leaderworkersets stopped it here).
    runtime = KubernetesRuntime(gateway, RenderSettings(namespace=NS))
    await runtime.start_watching()
    await runtime.close()
    await gateway.list("Model", NS)
    token = control_plane.sa_token("gf-gateway")
    for path in (
        f"/apis/gpufleet.io/v1alpha1/namespaces/{NS}/models",
        f"/api/v1/namespaces/{NS}/pods",
        f"/apis/leaderworkerset.x-k8s.io/v1/namespaces/{NS}/leaderworkersets",
    ):
        status, _ = call(control_plane, token, "GET", path + "?watch=true&timeoutSeconds=1")
        assert status == 200, path
    # apply, wake (a stamp on the Model, by update and by merge patch) and delete.
    name = f"gw-{secrets.token_hex(3)}"
    model = {**MODEL, "metadata": {"name": name, "namespace": NS}}
    created = await gateway.create(model)
    created["metadata"]["annotations"] = {"gpufleet.io/wake-at": "2026-01-01T00:00:00+00:00"}
    await gateway.replace(created)
    status, patched = call(
        control_plane, token, "PATCH",
        f"/apis/gpufleet.io/v1alpha1/namespaces/{NS}/models/{name}",
        {"metadata": {"annotations": {"gpufleet.io/wake-at": "2026-01-01T00:00:01+00:00"}}},
        content_type="application/merge-patch+json",
    )  # fmt: skip
    assert status == 200, patched
    await gateway.delete("Model", NS, name)
    assert await kube.get("Model", NS, name) is None
    # Engine logs for the admin API: allowed (the pod has no node yet, hence no log).
    pod = a_pod(admin_kubectl)
    status, answer = call(control_plane, token, "GET", f"/api/v1/namespaces/{NS}/pods/{pod}/log")
    assert status != 403, answer


async def rewrite(client: ClientKube, kind: str, namespace: str, name: str) -> None:
    """Read an object and write it back (an update), as often as a controller of the cluster
    changed it in between (the disruption controller writes a new budget's status)."""
    for _ in range(10):
        have = await client.get(kind, namespace, name)
        assert have is not None
        with contextlib.suppress(Conflict):
            await client.replace(have)
            return
    raise AssertionError(f"{kind} {namespace}/{name} kept changing")


async def test_the_operator_does_its_work_as_its_service_account(
    control_plane: ControlPlane, operator: ClientKube, kube: ClientKube, admin_kubectl: Kubectl
) -> None:
    # Leadership: its Lease in its namespace.
    lease_name = f"lease-{secrets.token_hex(3)}"
    await operator.create(
        {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": lease_name, "namespace": NS},
            "spec": {"holderIdentity": "op-1", "leaseDurationSeconds": 15},
        }
    )
    lease = await operator.get("Lease", NS, lease_name)
    assert lease is not None
    lease["spec"]["holderIdentity"] = "op-2"
    await operator.replace(lease)
    # The inventory: nodes and every pod; Models and Tenants.
    await operator.list("Node", None)
    await operator.list("Pod", None)
    await operator.list("Tenant", None)
    # Status of a Model and of a Tenant.
    model_name = f"op-{secrets.token_hex(3)}"
    await kube.create({**MODEL, "metadata": {"name": model_name, "namespace": NS}})
    await operator.patch_status("Model", NS, model_name, {"desiredReplicas": 1})
    assert ((await kube.get("Model", NS, model_name)) or {})["status"]["desiredReplicas"] == 1
    tenant_name = f"t{secrets.token_hex(3)}"
    tenant_doc = {
        "apiVersion": "gpufleet.io/v1alpha1",
        "kind": "Tenant",
        "metadata": {"name": tenant_name},
        "spec": {"priority": "interactive"},
    }
    await kube.create(tenant_doc)
    try:
        await operator.patch_status(
            "Tenant", "", tenant_name, {"namespace": f"tenant-{tenant_name}"}
        )
        assert ((await kube.get("Tenant", "", tenant_name)) or {})["status"]["namespace"] == (
            f"tenant-{tenant_name}"
        )
        # A tenant's namespace and guards; its Role grants what the operator itself does not
        # hold (escalate) and is bound to the tenant's group (bind).
        _, (tenant,) = load_text_resources(yaml.safe_dump(tenant_doc))
        made = tenant_objects(tenant, RenderSettings(namespace=NS))
        for obj in made:
            await operator.create(obj)
        for obj in made[1:]:
            await rewrite(
                operator, obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"]
            )
        await operator.delete("Namespace", "", made[0]["metadata"]["name"])
    finally:
        await kube.delete("Tenant", "", tenant_name)
    # A model's Service, disruption budget, loader Job (its pod admitted under restricted) and a
    # multi-node group.
    (model,) = load_text(yaml.safe_dump({**MODEL, "metadata": {"name": model_name}}))
    settings = RenderSettings(namespace=NS)
    for obj in (model_service(model, settings), model_disruption_budget(model, settings)):
        await operator.create(obj)
        await rewrite(operator, obj["kind"], NS, obj["metadata"]["name"])
        await operator.delete(obj["kind"], NS, obj["metadata"]["name"])
    job = loader_job(model, settings)
    job["metadata"]["name"] = f"fetch-{model_name}"
    await operator.create(job)
    wait_for(
        "the loader Job's pod",
        lambda: admin_kubectl(
            "get", "pods", "-n", NS, "-l", f"job-name={job['metadata']['name']}", "-o", "name"
        ).stdout.strip(),
    )
    await operator.delete("Job", NS, job["metadata"]["name"])
    (big,) = load_text(
        "apiVersion: gpufleet.io/v1alpha1\nkind: Model\nmetadata: {name: big}\n"
        "spec: {source: 'hf://org/big', engine: vllm, resources: {gpus: 16}}\n"
    )
    group = leader_worker_set(big, settings)
    await operator.create(group)
    assert await operator.list("LeaderWorkerSet", NS)
    await operator.delete("LeaderWorkerSet", NS, group["metadata"]["name"])
    # The engine key's Secret: made when missing, read by name (no other Secret).
    assert await ensure_engine_key(operator, NS)
    assert await operator.get("Secret", NS, ENGINE_KEY_SECRET) is not None
    # An engine's log (for `gpufleet logs`): allowed.
    pod = a_pod(admin_kubectl)
    status, answer = call(
        control_plane, control_plane.sa_token("gf-operator"), "GET",
        f"/api/v1/namespaces/{NS}/pods/{pod}/log",
    )  # fmt: skip
    assert status != 403, answer
    await kube.delete("Model", NS, model_name)


async def test_the_listed_key_secrets_are_readable_by_name_and_no_other_secret_is(
    control_plane: ControlPlane,
    installed: str,
    admin_kubectl: Kubectl,
    gateway: ClientKube,
    operator: ClientKube,
) -> None:
    """External endpoints' keys (``externalEndpoints.keySecrets``): the gateways and the
    operator read exactly the Secrets listed, through ``SecretKeys`` as they do at run time;
    a Secret not listed is refused with the value to add, and listing Secrets stays denied."""
    values = {**STORE, "externalEndpoints": {"keySecrets": ["hosted-llm-key"]}}
    apply_chart = ("apply", "--server-side", "--force-conflicts", "-f", "-")
    admin_kubectl(*apply_chart, input=to_stream(chart_objects(values)))
    for name, value in (("hosted-llm-key", "sk-listed"), ("not-listed", "sk-other")):
        admin_kubectl("create", "secret", "generic", name, "-n", NS, f"--from-literal=key={value}")
    listed = ApiKeySource.model_validate({"secretKeyRef": {"name": "hosted-llm-key", "key": "key"}})
    other = ApiKeySource.model_validate({"secretKeyRef": {"name": "not-listed", "key": "key"}})
    try:
        for client in (gateway, operator):
            keys = SecretKeys(client, NS)

            async def read(keys: SecretKeys = keys) -> str | None:
                with contextlib.suppress(KeyError_):  # RBAC's cache takes a moment
                    return await keys(listed)
                return None

            assert await eventually_async(read) == "sk-listed"
            with pytest.raises(KeyError_, match=r"add 'not-listed' to the chart's externalEn"):
                await keys(other)
        for who in ("gf-gateway", "gf-operator"):
            assert not allowed(control_plane, who, "list", "", "secrets", NS)
    finally:
        admin_kubectl("delete", "secret", "hosted-llm-key", "not-listed", "-n", NS)
        admin_kubectl(*apply_chart, input=to_stream(chart_objects(STORE)))


async def eventually_async(check: Any, timeout_s: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while (value := await check()) is None:
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.2)
    return value
