"""A tenant's place in the cluster: its namespace and what guards it.

Its engines are reached by the gateway alone: on the engine port, and on the ports an engine
of a ``routing.prefixIndex: precise`` model publishes its KV-cache events on (the gateway's
ZeroMQ subscription and replay requests; an engine that publishes none listens on neither).
They are opened whatever the tenant's models are: the policy is made once per tenant, and a
blocked subscription would fail silently (ZeroMQ retries the connection for ever).
"""

from __future__ import annotations

from typing import Any

from gpufleet.runtime.kubernetes.common import (
    KV_EVENTS_PORT,
    KV_REPLAY_PORT,
    LABEL_COMPONENT,
    LABEL_TENANT,
    RenderSettings,
    meta,
    namespace_object,
)
from gpufleet.spec import Tenant

__all__ = ["tenant_objects"]


def tenant_objects(tenant: Tenant, settings: RenderSettings) -> list[dict[str, Any]]:
    """A tenant's namespace and what guards it (quota, network policies, RBAC)."""
    ns = f"tenant-{tenant.name}"
    labels = {LABEL_TENANT: tenant.name}
    gateway = dict(settings.gateway_labels)
    return [
        namespace_object(ns, labels),
        {
            "apiVersion": "v1",
            "kind": "ResourceQuota",
            "metadata": meta("gpus", ns, labels),
            "spec": {"hard": {"requests.nvidia.com/gpu": str(_gpu_quota(tenant))}},
        },
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": meta("default-deny", ns, labels),
            "spec": {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]},
        },
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": meta("gateway-to-engines", ns, labels),
            "spec": {
                "podSelector": {"matchLabels": {LABEL_COMPONENT: "engine"}},
                "policyTypes": ["Ingress"],
                "ingress": [
                    {
                        "from": [
                            {
                                "namespaceSelector": {
                                    "matchLabels": {
                                        "kubernetes.io/metadata.name": settings.namespace
                                    }
                                },
                                "podSelector": {"matchLabels": gateway},
                            }
                        ],
                        "ports": [
                            {"protocol": "TCP", "port": port}
                            for port in (settings.engine_port, KV_EVENTS_PORT, KV_REPLAY_PORT)
                        ],
                    }
                ],
            },
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": meta("gpufleet-tenant", ns, labels),
            "rules": [
                {
                    "apiGroups": ["gpufleet.io"],
                    "resources": ["models"],
                    "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"],
                },
                {
                    "apiGroups": ["gpufleet.io"],
                    "resources": ["models/status"],
                    "verbs": ["get"],
                },
                {"apiGroups": [""], "resources": ["pods", "pods/log"], "verbs": ["get", "list"]},
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": meta("gpufleet-tenant", ns, labels),
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "Role",
                "name": "gpufleet-tenant",
            },
            "subjects": [
                {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "Group",
                    "name": settings.tenant_group.format(tenant=tenant.name),
                }
            ],
        },
    ]


def _gpu_quota(tenant: Tenant) -> int:
    """GPUs a tenant's namespace may request (its ``gpus`` label, else none: engines of shared
    models run in gpufleet's namespace; a tenant's own engines need a quota to be set)."""
    value = tenant.metadata.labels.get("gpufleet.io/gpus", "0")
    return int(value) if value.isdigit() else 0
