"""``KubeApi`` over the Kubernetes REST API: the official client's configuration, aiohttp calls.

The official client (``kubernetes.config``) finds the cluster and the credentials — in-cluster
service account, or a kubeconfig with its contexts, certificates and tokens — and this adapter
speaks the REST API with aiohttp, so the operator stays on one event loop (no thread per
watch). Watches resume from the last resource version and start again from a fresh list when
the server says that version is gone (HTTP 410).
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from gpufleet.runtime.kubernetes.api import Conflict, WatchEvent

__all__ = ["KINDS", "ClientKube", "Kind"]

log = logging.getLogger("gpufleet.kubernetes.client")


@dataclass(frozen=True, slots=True)
class Kind:
    api_version: str
    plural: str
    namespaced: bool = True

    def prefix(self) -> str:
        return "/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"


KINDS: dict[str, Kind] = {
    "Pod": Kind("v1", "pods"),
    "Job": Kind("batch/v1", "jobs"),
    "LeaderWorkerSet": Kind("leaderworkerset.x-k8s.io/v1", "leaderworkersets"),
    "Service": Kind("v1", "services"),
    "PodDisruptionBudget": Kind("policy/v1", "poddisruptionbudgets"),
    "Node": Kind("v1", "nodes", namespaced=False),
    "Lease": Kind("coordination.k8s.io/v1", "leases"),
    "Model": Kind("gpufleet.io/v1alpha1", "models"),
    "Tenant": Kind("gpufleet.io/v1alpha1", "tenants", namespaced=False),
    "Namespace": Kind("v1", "namespaces", namespaced=False),
    "ResourceQuota": Kind("v1", "resourcequotas"),
    "NetworkPolicy": Kind("networking.k8s.io/v1", "networkpolicies"),
    "Role": Kind("rbac.authorization.k8s.io/v1", "roles"),
    "RoleBinding": Kind("rbac.authorization.k8s.io/v1", "rolebindings"),
}


_Items = list[dict[str, Any]]


def _selector(labels: Mapping[str, str] | None) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted((labels or {}).items()))


class ClientKube:
    def __init__(
        self,
        host: str,
        *,
        token: str | None = None,
        ssl_context: ssl.SSLContext | bool = True,
        timeout_s: float = 30.0,
    ) -> None:
        self.host = host.rstrip("/")
        self._headers = {"authorization": f"Bearer {token}"} if token else {}
        self._ssl = ssl_context
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def from_environment(cls) -> ClientKube:
        """In a pod: its service account; elsewhere: the current kubeconfig context."""
        from kubernetes import client, config

        try:
            config.load_incluster_config()  # type: ignore[no-untyped-call]
        except config.ConfigException:
            config.load_kube_config()  # type: ignore[no-untyped-call]
        conf = client.Configuration.get_default_copy()
        token = (conf.api_key or {}).get("authorization", "").removeprefix("Bearer ").strip()
        context: ssl.SSLContext | bool = True
        if conf.verify_ssl:
            context = ssl.create_default_context(cafile=conf.ssl_ca_cert)
            if conf.cert_file:
                context.load_cert_chain(conf.cert_file, conf.key_file)
        else:
            context = False
        return cls(conf.host, token=token or None, ssl_context=context)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(headers=self._headers)
        return self._session

    def _path(self, kind: str, namespace: str | None, name: str | None = None) -> str:
        k = KINDS[kind]
        path = k.prefix()
        if k.namespaced and namespace:
            path += f"/namespaces/{namespace}"
        path += f"/{k.plural}"
        return f"{path}/{name}" if name else path

    async def _call(
        self, method: str, path: str, *, body: Any = None, params: Mapping[str, str] | None = None,
        content_type: str = "application/json",
    ) -> tuple[int, Any]:  # fmt: skip
        data = json.dumps(body).encode() if body is not None else None
        headers = {"content-type": content_type} if data is not None else {}
        async with self._http().request(
            method,
            self.host + path,
            data=data,
            params=dict(params or {}),
            headers=headers,
            ssl=self._ssl,
            timeout=self._timeout,
        ) as resp:
            text = await resp.read()
            try:
                payload = json.loads(text) if text else None
            except json.JSONDecodeError:
                payload = None
            if resp.status >= 400 and resp.status not in (404, 409):
                detail = payload.get("message") if isinstance(payload, dict) else None
                message = detail or text[:200].decode("utf-8", "replace")
                raise RuntimeError(f"{method} {path}: HTTP {resp.status}: {message}")
            return resp.status, payload

    # -- KubeApi ----------------------------------------------------------------------------

    async def create(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        meta = obj["metadata"]
        status, payload = await self._call(
            "POST", self._path(obj["kind"], meta.get("namespace")), body=obj
        )
        if status == 409:
            raise FileExistsError(
                f"{obj['kind']} {meta.get('namespace', '')}/{meta['name']} exists"
            )
        result: dict[str, Any] = payload
        return result

    async def delete(
        self, kind: str, namespace: str, name: str, *, grace_s: int | None = None
    ) -> None:
        params = {"gracePeriodSeconds": str(grace_s)} if grace_s is not None else None
        await self._call("DELETE", self._path(kind, namespace, name), params=params)

    async def list(
        self, kind: str, namespace: str | None, selector: Mapping[str, str] | None = None
    ) -> _Items:
        items, _ = await self._list(kind, namespace, selector)
        return items

    async def _list(
        self, kind: str, namespace: str | None, selector: Mapping[str, str] | None
    ) -> tuple[_Items, str]:
        params = {"labelSelector": _selector(selector)} if selector else {}
        _, payload = await self._call("GET", self._path(kind, namespace), params=params)
        k = KINDS[kind]
        items = [
            {"apiVersion": k.api_version, "kind": kind, **item} for item in payload.get("items", [])
        ]
        return items, str(payload.get("metadata", {}).get("resourceVersion", ""))

    async def watch(
        self, kind: str, namespace: str | None, selector: Mapping[str, str] | None = None
    ) -> AsyncIterator[WatchEvent]:
        _, version = await self._list(kind, namespace, selector)
        k = KINDS[kind]
        while True:
            params = {"watch": "true", "resourceVersion": version, "allowWatchBookmarks": "true"}
            if selector:
                params["labelSelector"] = _selector(selector)
            gone = False
            try:
                async with self._http().get(
                    self.host + self._path(kind, namespace),
                    params=params,
                    ssl=self._ssl,
                    timeout=aiohttp.ClientTimeout(total=None, sock_read=300),
                ) as resp:
                    if resp.status == 410:
                        gone = True
                    else:
                        async for line in resp.content:
                            if not line.strip():
                                continue
                            event = json.loads(line)
                            obj = event.get("object", {})
                            version = obj.get("metadata", {}).get("resourceVersion", version)
                            if event.get("type") == "ERROR":
                                gone = obj.get("code") == 410
                                break
                            if event.get("type") in ("ADDED", "MODIFIED", "DELETED"):
                                obj = {"apiVersion": k.api_version, "kind": kind, **obj}
                                yield WatchEvent(event["type"], obj)
            except (aiohttp.ClientError, TimeoutError) as exc:
                log.warning("watch of %s interrupted (%s); resuming", kind, exc)
                await asyncio.sleep(1.0)
            if gone:
                _, version = await self._list(kind, namespace, selector)

    async def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        status, payload = await self._call("GET", self._path(kind, namespace, name))
        if status == 404:
            return None
        return {"apiVersion": KINDS[kind].api_version, "kind": kind, **payload}

    async def replace(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        meta = obj["metadata"]
        status, payload = await self._call(
            "PUT", self._path(obj["kind"], meta.get("namespace"), meta["name"]), body=obj
        )
        if status == 409:
            raise Conflict(f"{obj['kind']} {meta.get('namespace', '')}/{meta['name']} changed")
        if status == 404:
            raise KeyError(f"{obj['kind']} {meta.get('namespace', '')}/{meta['name']} is gone")
        result: dict[str, Any] = payload
        return result

    async def patch_status(
        self, kind: str, namespace: str, name: str, status: Mapping[str, Any]
    ) -> None:
        await self._call(
            "PATCH",
            self._path(kind, namespace, name) + "/status",
            body={"status": status},
            content_type="application/merge-patch+json",
        )
