"""Tenant resources mirrored into the store and the cluster.

Into the store: the tenant's limits, priority and weight, which every gateway enforces; a
Tenant deleted from the cluster is deleted from the store too (its keys revoked), so no key
can be made for it or used any more. The store marks the tenants that came from the cluster
(``gpufleet.io/source: kubernetes`` on their metadata): tenants made through the admin API
are left alone. Into the cluster: the tenant's namespace, GPU quota, default-deny network
policies and RBAC, created or corrected, removed with the tenant (namespace last). Each
Tenant's status says its namespace, or why its spec is refused.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from gpufleet.errors import SpecError
from gpufleet.operator.objects import ensure
from gpufleet.operator.status import tenant_status
from gpufleet.runtime.kubernetes.api import KubeApi
from gpufleet.runtime.kubernetes.common import RenderSettings
from gpufleet.runtime.kubernetes.resources import (
    MIRRORED_LABEL,
    MIRRORED_VALUE,
    tenant_from_resource,
)
from gpufleet.runtime.kubernetes.tenants import tenant_objects
from gpufleet.store import Store

__all__ = ["TENANT_KINDS", "TenantMirror"]

log = logging.getLogger("gpufleet.operator")

#: What a tenant owns in the cluster, deleted with it (its namespace last).
TENANT_KINDS = ("RoleBinding", "Role", "NetworkPolicy", "ResourceQuota", "Namespace")


class TenantMirror:
    def __init__(
        self,
        api: KubeApi,
        store: Store,
        settings: RenderSettings,
        *,
        clock: Callable[[], float],
    ) -> None:
        self.api = api
        self.store = store
        self.settings = settings
        self.clock = clock
        self.writes = 0

    async def sync(self) -> None:
        self.writes = 0
        wanted: dict[tuple[str, str, str], dict[str, Any]] = {}
        present: set[str] = set()
        statuses: list[tuple[dict[str, Any], dict[str, Any]]] = []
        now = self.clock()
        for obj in await self.api.list("Tenant", None):
            name = obj["metadata"]["name"]
            generation = int(obj["metadata"].get("generation", 1))
            previous = obj.get("status") or {}
            try:
                tenant = tenant_from_resource(obj)
            except SpecError as exc:
                log.warning("tenant %s is invalid: %s", name, exc)
                invalid = "; ".join(exc.problems)
                # Refused now: what it had stays until it is fixed; it says why.
                kept = str(previous.get("namespace", ""))
                statuses.append(
                    (obj, tenant_status(kept, observed_generation=generation, previous=previous,
                                        now=now, invalid=invalid))
                )  # fmt: skip
                present.add(name)
                continue
            present.add(name)
            await asyncio.to_thread(self.store.apply_tenant, tenant)
            namespace = ""
            for child in tenant_objects(tenant, self.settings):
                meta = child["metadata"]
                if child["kind"] == "Namespace":
                    namespace = meta["name"]
                wanted[(child["kind"], meta.get("namespace", ""), meta["name"])] = child
            statuses.append(
                (obj, tenant_status(namespace, observed_generation=generation,
                                    previous=previous, now=now))
            )  # fmt: skip
        self.writes += await ensure(self.api, wanted, TENANT_KINDS, None, "gpufleet.io/tenant")
        await self._forget(present)
        for obj, status in statuses:
            if status != (obj.get("status") or {}):
                self.writes += 1
                await self.api.patch_status("Tenant", "", obj["metadata"]["name"], status)

    async def _forget(self, present: set[str]) -> None:
        """Tenants mirrored from the cluster whose resource is gone leave the store."""
        for stored in await asyncio.to_thread(self.store.list_tenants):
            tenant = stored.tenant
            labels = tenant.metadata.labels
            if labels.get(MIRRORED_LABEL) == MIRRORED_VALUE and tenant.name not in present:
                log.info("tenant %s was deleted from the cluster; revoking its keys", tenant.name)
                await asyncio.to_thread(self.store.delete_tenant, tenant.name)
