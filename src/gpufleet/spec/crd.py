"""CustomResourceDefinitions generated from the pydantic resources: one source of truth.

``Model`` and ``GpuJob`` (namespaced) and ``Tenant`` (cluster-scoped: a tenant owns namespaces)
are served as ``gpufleet.io/v1alpha1``. Their OpenAPI v3 schemas come from the same pydantic models that
validate a YAML file for ``gpufleet up``, rewritten into the *structural* form Kubernetes
requires: references inlined, ``null`` alternatives turned into ``nullable``, JSON Schema 2020
bounds (``exclusiveMinimum: 0``) into OpenAPI 3.0 ones, quantities and durations as
int-or-string, ``additionalProperties: false`` dropped (the API server prunes unknown fields,
and rejects them with ``kubectl apply --validate=strict``, the default). What the schema cannot
say (formats, bounds of durations, cross-field rules) is added as CEL rules by
``gpufleet.spec.cel``; of ``metadata`` only the name's format (a CRD may restrict no other
field of it). Pure: dicts out.
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import BaseModel

from gpufleet.spec.cel import add_rules
from gpufleet.spec.gpujob import GpuJob
from gpufleet.spec.resources import API_VERSION, Model, Tenant

__all__ = ["GROUP", "crds", "structural_schema"]

GROUP, VERSION = API_VERSION.split("/")

_KEEP = {
    "type",
    "properties",
    "items",
    "required",
    "enum",
    "default",
    "description",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "pattern",
    "minItems",
    "maxItems",
    "maxProperties",
    "nullable",
    "additionalProperties",
    "anyOf",
    "format",
    "x-kubernetes-int-or-string",
    "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-validations",
}

_CONDITION = {
    "type": "object",
    "required": ["type", "status"],
    "properties": {
        "type": {"type": "string"},
        "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
        "reason": {"type": "string"},
        "message": {"type": "string"},
        "lastTransitionTime": {"type": "string", "format": "date-time"},
        "observedGeneration": {"type": "integer"},
    },
}

_MODEL_STATUS = {
    "type": "object",
    "properties": {
        "observedGeneration": {"type": "integer"},
        "replicas": {"type": "integer"},
        "readyReplicas": {"type": "integer"},
        "desiredReplicas": {"type": "integer"},
        "selector": {"type": "string"},
        "endpoints": {"type": "array", "items": {"type": "string"}},
        "conditions": {"type": "array", "items": _CONDITION},
        # A disaggregated model's prefill pool (the counts above are its decode pool's).
        "prefill": {
            "type": "object",
            "properties": {
                "replicas": {"type": "integer"},
                "readyReplicas": {"type": "integer"},
            },
        },
        # A canary under analysis: gateways split requests and count its answers by it.
        "canary": {
            "type": "object",
            "properties": {
                "generation": {"type": "integer"},
                "percent": {"type": "integer"},
            },
        },
    },
}

_TENANT_STATUS = {
    "type": "object",
    "properties": {
        "namespace": {"type": "string"},
        "conditions": {"type": "array", "items": _CONDITION},
    },
}

# What the operator reports of a GpuJob. phase: Queued (waiting for GPUs, its window or its
# turn), Running, Preempting (SIGTERM sent, within the grace period), Preempted (back in the
# queue, to resume from its checkpoint), Succeeded, Failed (retries or maxRuntime spent, or
# refused: over budget) or Cancelled; reason and message say why it is there.
_JOB_STATUS = {
    "type": "object",
    "properties": {
        "observedGeneration": {"type": "integer"},
        "phase": {"type": "string"},
        "reason": {"type": "string"},
        "message": {"type": "string"},
        # Attempts started (each a batch/v1 Job on Kubernetes), failures counted against
        # spec.retries, and preemptions (never counted against them).
        "attempts": {"type": "integer"},
        "failures": {"type": "integer"},
        "preemptions": {"type": "integer"},
        # Running time over all attempts (what spec.maxRuntime bounds) and GPU time charged.
        "runSeconds": {"type": "number"},
        "gpuSeconds": {"type": "number"},
        # What its attempts' GPU time cost, charged to its tenant (the usage ledger's sum).
        "costUsd": {"type": "number"},
        # The nodes the running attempt's gang was placed on, rank 0's first.
        "nodes": {"type": "array", "items": {"type": "string"}},
        "startTime": {"type": "string", "format": "date-time"},
        "completionTime": {"type": "string", "format": "date-time"},
        "conditions": {"type": "array", "items": _CONDITION},
    },
}


def structural_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The resource's schema as Kubernetes wants it (``metadata`` left to the API server)."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    schema = _rewrite(raw, defs)
    name = schema["properties"]["metadata"]["properties"]["name"]
    schema["properties"]["metadata"] = {"type": "object", "properties": {"name": name}}
    # The API server forbids defaults (and any other constraint but type and description) on
    # the top-level apiVersion and kind: they name the resource, and it sets them itself.
    for top in ("apiVersion", "kind"):
        schema["properties"][top] = {"type": "string"}
    schema["required"] = [r for r in schema.get("required", []) if r != "metadata"]
    add_rules(schema, model)
    return schema


def _rewrite(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    node = copy.deepcopy(node)
    ref = node.pop("$ref", None)
    if ref is not None:
        node = {**_rewrite(defs[ref.rsplit("/", 1)[1]], defs), **node}
    if "anyOf" in node and not node.get("x-kubernetes-int-or-string"):
        # pydantic's "X or null": X, nullable.
        options = [o for o in node.pop("anyOf") if o.get("type") != "null"]
        if len(options) != 1:
            raise ValueError(f"cannot express anyOf {options} in a structural schema")
        node = {**_rewrite(options[0], defs), **node, "nullable": True}
    if "const" in node:
        node["enum"] = [node.pop("const")]
    for bound, edge in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        value = node.get(bound)
        if isinstance(value, int | float) and not isinstance(value, bool):
            node[edge] = value
            node[bound] = True
    if node.get("default", 0) is None:
        del node["default"]
    if isinstance(node.get("default"), float) and float(node["default"]).is_integer():
        node["default"] = int(node["default"])
    if node.get("x-kubernetes-int-or-string"):
        for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
            node.pop(key, None)
    if node.get("additionalProperties") is False:
        del node["additionalProperties"]
    if "properties" in node:
        node["properties"] = {k: _rewrite(v, defs) for k, v in node["properties"].items()}
        node.setdefault("type", "object")
    if isinstance(node.get("items"), dict):
        node["items"] = _rewrite(node["items"], defs)
    if isinstance(node.get("additionalProperties"), dict):
        node["additionalProperties"] = _rewrite(node["additionalProperties"], defs)
    return {k: v for k, v in node.items() if k in _KEEP}


def _crd(
    kind: str,
    plural: str,
    schema: dict[str, Any],
    status: dict[str, Any],
    *,
    namespaced: bool,
    short: list[str],
    columns: list[dict[str, Any]],
    scale: bool,
) -> dict[str, Any]:
    schema = copy.deepcopy(schema)
    schema["properties"]["status"] = status
    subresources: dict[str, Any] = {"status": {}}
    if scale:
        subresources["scale"] = {
            "specReplicasPath": ".spec.replicas.min",
            "statusReplicasPath": ".status.replicas",
            "labelSelectorPath": ".status.selector",
        }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced" if namespaced else "Cluster",
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": short,
                "categories": ["gpufleet"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": schema},
                    "subresources": subresources,
                    "additionalPrinterColumns": columns,
                }
            ],
        },
    }


def _column(name: str, path: str, type: str = "string", priority: int = 0) -> dict[str, Any]:
    column: dict[str, Any] = {"name": name, "type": type, "jsonPath": path}
    if priority:
        column["priority"] = priority
    return column


def crds() -> list[dict[str, Any]]:
    """The CustomResourceDefinitions gpufleet's operator serves, in a stable order."""
    return [
        _crd(
            "Model",
            "models",
            structural_schema(Model),
            _MODEL_STATUS,
            namespaced=True,
            short=["gfm"],
            scale=True,
            columns=[
                _column("Engine", ".spec.engine"),
                _column("Ready", ".status.readyReplicas", "integer"),
                _column("Desired", ".status.desiredReplicas", "integer"),
                _column("Status", '.status.conditions[?(@.type=="Ready")].reason'),
                _column("Source", ".spec.source", priority=1),
                _column("Age", ".metadata.creationTimestamp", "date"),
            ],
        ),
        _crd(
            "Tenant",
            "tenants",
            structural_schema(Tenant),
            _TENANT_STATUS,
            namespaced=False,
            short=["gft"],
            scale=False,
            columns=[
                _column("Priority", ".spec.priority"),
                _column("Namespace", ".status.namespace"),
                _column("Age", ".metadata.creationTimestamp", "date"),
            ],
        ),
        _crd(
            "GpuJob",
            "gpujobs",
            structural_schema(GpuJob),
            _JOB_STATUS,
            namespaced=True,
            short=["gfj"],
            scale=False,
            columns=[
                _column("Status", ".status.phase"),
                _column("Tenant", ".spec.tenant"),
                _column("GPUs", ".spec.resources.gpus", "integer"),
                _column("Priority", ".spec.priorityClass", priority=1),
                _column("Attempts", ".status.attempts", "integer", priority=1),
                _column("Age", ".metadata.creationTimestamp", "date"),
            ],
        ),
    ]
