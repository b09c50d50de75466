"""Custom resources as the spec layer reads them: server-side metadata (uid, resource version,
managed fields, status) dropped, name and labels kept."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gpufleet.spec import GpuJob, Model, Tenant, parse_document, parse_job, parse_tenant

__all__ = [
    "MIRRORED_LABEL",
    "MIRRORED_VALUE",
    "job_from_resource",
    "model_from_resource",
    "tenant_from_resource",
]

#: On a tenant in the store: it was mirrored from a Tenant resource (and goes with it).
MIRRORED_LABEL, MIRRORED_VALUE = "gpufleet.io/source", "kubernetes"


def model_from_resource(obj: Mapping[str, Any]) -> Model:
    """A Model custom resource as the spec layer reads it (server-side metadata dropped)."""
    meta = obj.get("metadata", {})
    return parse_document(
        {
            "apiVersion": obj.get("apiVersion"),
            "kind": obj.get("kind"),
            "metadata": {
                "name": meta.get("name"),
                "labels": meta.get("labels", {}) or {},
            },
            "spec": obj.get("spec", {}),
        }
    )


def tenant_from_resource(obj: Mapping[str, Any]) -> Tenant:
    meta = obj.get("metadata", {})
    return parse_tenant(
        {
            "apiVersion": obj.get("apiVersion"),
            "kind": obj.get("kind"),
            "metadata": {
                "name": meta.get("name"),
                "labels": {**(meta.get("labels", {}) or {}), MIRRORED_LABEL: MIRRORED_VALUE},
            },
            "spec": obj.get("spec", {}) or {},
        }
    )


def job_from_resource(obj: Mapping[str, Any]) -> GpuJob:
    """A GpuJob custom resource as the spec layer reads it (server-side metadata dropped)."""
    meta = obj.get("metadata", {})
    return parse_job(
        {
            "apiVersion": obj.get("apiVersion"),
            "kind": obj.get("kind"),
            "metadata": {"name": meta.get("name"), "labels": meta.get("labels", {}) or {}},
            "spec": obj.get("spec", {}),
        }
    )
