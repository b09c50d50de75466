"""``KubeApi`` over the Kubernetes REST API: the official client's configuration, aiohttp calls.

The official client (``kubernetes.config``) finds the cluster and the credentials — in-cluster
service account, or a kubeconfig with its contexts, certificates and tokens — and this adapter
speaks the REST API with aiohttp, so the operator stays on one event loop (no thread per
watch). What it learned against a real API server (v1.36):

- the bearer token sits under ``api_key["BearerToken"]`` from client 37 on, ``"authorization"``
  before, with a ``Bearer``/``bearer`` prefix; in a pod the token file is read again every
  minute, as client-go does, because the kubelet rotates it;
- a path the server does not serve (a CRD not installed) answers ``404 page not found`` as
  plain text: that is ``NotServed``, found at start through discovery (``served``), never a
  crash on a non-JSON body;
- a watch starts with a list whose items it yields (``ADDED``), then watches from the list's
  resourceVersion; on 410 Gone it lists again and derives the changes it missed, deletions
  included, from the objects it last knew (``_diff``). Connection losses resume where they
  were; only errors a retry cannot fix (403, a kind not served) end the watch.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from gpufleet.runtime.kubernetes.api import (
    Conflict,
    Forbidden,
    Invalid,
    KubeError,
    NotServed,
    Unavailable,
    WatchEvent,
)

__all__ = ["KINDS", "OPTIONAL_KINDS", "SERVICE_ACCOUNT_DIR", "ClientKube", "Kind", "bearer_token"]

log = logging.getLogger("gpufleet.kubernetes.client")

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


@dataclass(frozen=True, slots=True)
class Kind:
    api_version: str
    plural: str
    namespaced: bool = True
    #: Third-party: served only where its CRD is installed.
    optional: bool = False

    def prefix(self) -> str:
        return "/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"


KINDS: dict[str, Kind] = {
    "Pod": Kind("v1", "pods"),
    "Secret": Kind("v1", "secrets"),
    "Job": Kind("batch/v1", "jobs"),
    "LeaderWorkerSet": Kind("leaderworkerset.x-k8s.io/v1", "leaderworkersets", optional=True),
    "Service": Kind("v1", "services"),
    "PodDisruptionBudget": Kind("policy/v1", "poddisruptionbudgets"),
    "Node": Kind("v1", "nodes", namespaced=False),
    "Lease": Kind("coordination.k8s.io/v1", "leases"),
    "Model": Kind("gpufleet.io/v1alpha1", "models"),
    "Tenant": Kind("gpufleet.io/v1alpha1", "tenants", namespaced=False),
    "GpuJob": Kind("gpufleet.io/v1alpha1", "gpujobs"),
    "PersistentVolumeClaim": Kind("v1", "persistentvolumeclaims"),
    "Namespace": Kind("v1", "namespaces", namespaced=False),
    "ResourceQuota": Kind("v1", "resourcequotas"),
    "NetworkPolicy": Kind("networking.k8s.io/v1", "networkpolicies"),
    "Role": Kind("rbac.authorization.k8s.io/v1", "roles"),
    "RoleBinding": Kind("rbac.authorization.k8s.io/v1", "rolebindings"),
}
OPTIONAL_KINDS = tuple(name for name, k in KINDS.items() if k.optional)

_Items = list[dict[str, Any]]
#: etcd's first revision: older than the history of any watch cache begun after the cluster's
#: first writes (a CRD's, a restarted server's), so resuming from it meets 410 Gone there, as a
#: client away for longer than the server's watch history does.
_FORGOTTEN = "1"
_TOKEN_REREAD_S = 60.0


def bearer_token(api_key: Mapping[str, str] | None) -> str | None:
    """The bearer token the official client read from a kubeconfig or a service account.

    Releases 31–36 keep it under ``api_key["authorization"]``, 37 and later under
    ``api_key["BearerToken"]``; both carry a ``Bearer `` prefix (``bearer `` in the in-cluster
    loader). Reading only one of them made every call anonymous on the other releases.
    """
    for key in ("BearerToken", "authorization"):
        value = (api_key or {}).get(key, "").strip()
        if value[:7].lower() == "bearer ":
            value = value[7:].strip()
        if value:
            return value
    return None


def _selector(labels: Mapping[str, str] | None) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted((labels or {}).items()))


def _message(payload: Any, text: bytes) -> str:
    detail = payload.get("message") if isinstance(payload, dict) else None
    return str(detail or text[:300].decode("utf-8", "replace").strip())


def _is_status(payload: Any) -> bool:
    """A ``Status`` object: the server's own answer about an object (404 of a missing object),
    as opposed to a path it does not serve at all (``404 page not found``)."""
    return isinstance(payload, dict) and payload.get("kind") == "Status"


def _key(obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata", {})
    return str(meta.get("uid") or f"{meta.get('namespace', '')}/{meta.get('name', '')}")


def _diff(known: dict[str, dict[str, Any]], items: _Items) -> Iterator[WatchEvent]:
    """The events that take ``known`` to ``items`` (a fresh list), and ``known`` updated."""
    fresh = {_key(obj): obj for obj in items}
    for key, gone in list(known.items()):
        if key not in fresh:
            yield WatchEvent("DELETED", gone)
    for key, obj in fresh.items():
        old = known.get(key)
        if old is None:
            yield WatchEvent("ADDED", obj)
        elif old["metadata"].get("resourceVersion") != obj["metadata"].get("resourceVersion"):
            yield WatchEvent("MODIFIED", obj)
    known.clear()
    known.update(fresh)


class ClientKube:
    def __init__(
        self,
        host: str,
        *,
        token: str | None = None,
        token_file: str | None = None,
        ssl_context: ssl.SSLContext | bool = True,
        timeout_s: float = 30.0,
        watch_timeout_s: int = 300,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.host = host.rstrip("/")
        self._token = token
        #: In a pod: the service account's token file, read again as the kubelet rotates it.
        self._token_file = token_file
        self._token_read_at = clock() if token else float("-inf")
        self._clock = clock
        self._ssl = ssl_context
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        #: The server ends each watch after this long; the client resumes it (as client-go).
        self.watch_timeout_s = watch_timeout_s
        self._session: aiohttp.ClientSession | None = None
        self._served: set[str] = set()
        self._watches: set[aiohttp.ClientResponse] = set()
        self._expired = 0

    @classmethod
    def from_environment(
        cls, config_file: str | None = None, *, service_account_dir: Path = SERVICE_ACCOUNT_DIR
    ) -> ClientKube:
        """In a pod: its service account; elsewhere: the current context of ``config_file``
        (default: ``$KUBECONFIG`` or ``~/.kube/config``)."""
        from kubernetes import client, config
        from kubernetes.config.incluster_config import InClusterConfigLoader

        conf = client.Configuration()
        token_file: str | None = None
        if config_file is not None:
            config.load_kube_config(config_file, client_configuration=conf)  # type: ignore[no-untyped-call]
        else:
            try:
                InClusterConfigLoader(  # type: ignore[no-untyped-call]
                    token_filename=str(service_account_dir / "token"),
                    cert_filename=str(service_account_dir / "ca.crt"),
                ).load_and_set(conf)
                token_file = str(service_account_dir / "token")
            except config.ConfigException:
                config.load_kube_config(client_configuration=conf)  # type: ignore[no-untyped-call]
        token = bearer_token(conf.api_key)
        context: ssl.SSLContext | bool = True
        if conf.verify_ssl:
            context = ssl.create_default_context(cafile=conf.ssl_ca_cert)
            if conf.cert_file:
                context.load_cert_chain(conf.cert_file, conf.key_file)
        else:
            context = False
        return cls(conf.host, token=token or None, token_file=token_file, ssl_context=context)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

    def _auth(self) -> dict[str, str]:
        if self._token_file and self._clock() - self._token_read_at >= _TOKEN_REREAD_S:
            try:
                self._token = Path(self._token_file).read_text().strip() or self._token
                self._token_read_at = self._clock()
            except OSError as exc:
                log.warning("cannot read the service account token %s: %s", self._token_file, exc)
        return {"authorization": f"Bearer {self._token}"} if self._token else {}

    def _path(self, kind: str, namespace: str | None, name: str | None = None) -> str:
        k = KINDS[kind]
        path = k.prefix()
        if k.namespaced and namespace:
            path += f"/namespaces/{namespace}"
        path += f"/{k.plural}"
        return f"{path}/{name}" if name else path

    async def _request(
        self, method: str, path: str, *, body: Any = None, params: Mapping[str, str] | None = None,
        content_type: str = "application/json",
    ) -> tuple[int, Any, bytes]:  # fmt: skip
        data = json.dumps(body).encode() if body is not None else None
        headers = self._auth()
        if data is not None:
            headers["content-type"] = content_type
        try:
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
                status = resp.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise Unavailable(f"{method} {path}: {type(exc).__name__}: {exc}") from exc
        try:
            payload = json.loads(text) if text else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            payload = None
        return status, payload, text

    async def _call(
        self, method: str, path: str, *, kind: str | None = None, accept: tuple[int, ...] = (),
        body: Any = None, params: Mapping[str, str] | None = None,
        content_type: str = "application/json",
    ) -> tuple[int, Any]:  # fmt: skip
        """One call; statuses in ``accept`` are the caller's to read, other errors raise."""
        status, payload, text = await self._request(
            method, path, body=body, params=params, content_type=content_type
        )
        if status < 400 or (status in accept and (status != 404 or _is_status(payload))):
            return status, payload
        raise _error(method, path, status, payload, text, kind)

    # -- KubeApi ----------------------------------------------------------------------------

    async def create(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        meta = obj["metadata"]
        kind = obj["kind"]
        status, payload = await self._call(
            "POST", self._path(kind, meta.get("namespace")), kind=kind, accept=(409,), body=obj
        )
        if status == 409:
            raise FileExistsError(f"{kind} {meta.get('namespace', '')}/{meta['name']} exists")
        if not isinstance(payload, dict):
            raise KubeError(f"POST {kind} {meta['name']}: HTTP {status} with no object", status)
        return payload

    async def delete(
        self, kind: str, namespace: str, name: str, *, grace_s: int | None = None
    ) -> None:
        # What an object owns goes with it, as ``kubectl delete`` does: the API's own default
        # for batch/v1 Jobs orphans their pods.
        params = {"propagationPolicy": "Background"}
        if grace_s is not None:
            params["gracePeriodSeconds"] = str(grace_s)
        status, payload, text = await self._request(
            "DELETE", self._path(kind, namespace, name), params=params
        )
        if status >= 400 and status != 404:  # gone already, or its kind is: nothing to delete
            raise _error("DELETE", self._path(kind, namespace, name), status, payload, text, kind)

    async def list(
        self, kind: str, namespace: str | None, selector: Mapping[str, str] | None = None
    ) -> _Items:
        items, _ = await self._list(kind, namespace, selector)
        return items

    async def _list(
        self, kind: str, namespace: str | None, selector: Mapping[str, str] | None
    ) -> tuple[_Items, str]:
        params = {"labelSelector": _selector(selector)} if selector else {}
        _, payload = await self._call("GET", self._path(kind, namespace), kind=kind, params=params)
        if not isinstance(payload, dict):
            raise KubeError(f"GET {self._path(kind, namespace)}: not a list")
        k = KINDS[kind]
        items = [
            {"apiVersion": k.api_version, "kind": kind, **item}
            for item in payload.get("items") or []
        ]
        return items, str((payload.get("metadata") or {}).get("resourceVersion", ""))

    async def watch(
        self,
        kind: str,
        namespace: str | None,
        selector: Mapping[str, str] | None = None,
        *,
        synced: Callable[[], None] | None = None,
    ) -> AsyncIterator[WatchEvent]:
        """The objects there now (``ADDED``), then every change; see the module's notes."""
        k = KINDS[kind]
        known: dict[str, dict[str, Any]] = {}
        epoch = self._expired
        items, version = await self._list(kind, namespace, selector)  # errors: the caller's
        for event in _diff(known, items):
            yield event
        if synced is not None:
            synced()
        pause = 0.0
        while True:
            if pause:
                await asyncio.sleep(pause)
            if not version:  # 410 Gone: list again, and say what changed meanwhile
                try:
                    items, version = await self._list(kind, namespace, selector)
                except Unavailable as exc:  # the API is away: keep what we knew, try again
                    log.warning("watch of %s: re-list failed (%s); retrying", kind, exc)
                    pause = min(30.0, max(1.0, pause * 2))
                    continue
                for event in _diff(known, items):
                    yield event
            if epoch != self._expired:
                epoch, version = self._expired, _FORGOTTEN
            params = {
                "watch": "true",
                "resourceVersion": version,
                "allowWatchBookmarks": "true",
                "timeoutSeconds": str(self.watch_timeout_s),
            }
            if selector:
                params["labelSelector"] = _selector(selector)
            path = self._path(kind, namespace)
            pause = 0.0
            try:
                async with self._http().get(
                    self.host + path,
                    params=params,
                    headers=self._auth(),
                    ssl=self._ssl,
                    timeout=aiohttp.ClientTimeout(total=None, sock_read=self.watch_timeout_s + 60),
                ) as resp:
                    if resp.status == 410:
                        log.info(
                            "watch of %s: version %s is gone (410); listing again", kind, version
                        )
                        version = ""
                        continue
                    if resp.status >= 400:
                        text = await resp.read()
                        error = _error("GET", path, resp.status, _json(text), text, kind)
                        if not isinstance(error, Unavailable):
                            raise error
                        log.warning("watch of %s: %s; resuming", kind, error)
                        pause = 1.0
                        continue
                    self._watches.add(resp)
                    try:
                        async for line in resp.content:
                            if not line.strip():
                                continue
                            event = json.loads(line)
                            obj = event.get("object") or {}
                            if event.get("type") == "ERROR":
                                if obj.get("code") == 410:
                                    log.info(
                                        "watch of %s: version %s is gone (410: %s); listing again",
                                        kind, version, obj.get("message", ""),
                                    )  # fmt: skip
                                    version = ""
                                else:
                                    log.warning("watch of %s: %s", kind, obj.get("message", obj))
                                    pause = 1.0
                                break
                            version = obj.get("metadata", {}).get("resourceVersion", version)
                            if event.get("type") not in ("ADDED", "MODIFIED", "DELETED"):
                                continue  # BOOKMARK: only the version moves
                            obj = {"apiVersion": k.api_version, "kind": kind, **obj}
                            if event["type"] == "DELETED":
                                known.pop(_key(obj), None)
                            else:
                                known[_key(obj)] = obj
                            yield WatchEvent(event["type"], obj)
                    finally:
                        self._watches.discard(resp)
            except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError) as exc:
                log.warning("watch of %s interrupted (%s); resuming", kind, exc)
                pause = 1.0

    def expire_watches(self) -> None:
        """Drop every open watch's connection and resume it from a resourceVersion the server
        has forgotten — what a client away for longer than the server's watch history meets
        (410 Gone). For tests of what follows: the re-list and the changes derived from it."""
        self._expired += 1
        for resp in list(self._watches):
            resp.close()

    async def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        status, payload = await self._call(
            "GET", self._path(kind, namespace, name), kind=kind, accept=(404,)
        )
        if status == 404:
            return None
        return {"apiVersion": KINDS[kind].api_version, "kind": kind, **payload}

    async def replace(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        meta = obj["metadata"]
        kind = obj["kind"]
        status, payload = await self._call(
            "PUT",
            self._path(kind, meta.get("namespace"), meta["name"]),
            kind=kind,
            accept=(404, 409),
            body=obj,
        )
        if status == 409:
            raise Conflict(f"{kind} {meta.get('namespace', '')}/{meta['name']} changed")
        if status == 404:
            raise KeyError(f"{kind} {meta.get('namespace', '')}/{meta['name']} is gone")
        result: dict[str, Any] = payload
        return result

    async def patch_status(
        self, kind: str, namespace: str, name: str, status: Mapping[str, Any]
    ) -> None:
        await self._call(
            "PATCH",
            self._path(kind, namespace, name) + "/status",
            kind=kind,
            accept=(404,),  # the object is gone: nothing to report on
            body={"status": status},
            content_type="application/merge-patch+json",
        )

    async def served(self, kind: str) -> bool:
        """API discovery (``GET /apis/GROUP/VERSION``): whether ``kind`` is served. A kind
        found stays found; one missing is asked about again (its CRD may come later)."""
        if kind in self._served:
            return True
        k = KINDS[kind]
        status, payload, text = await self._request("GET", k.prefix())
        if status >= 400 and status != 404:
            raise _error("GET", k.prefix(), status, payload, text, None)
        resources = payload.get("resources") or [] if isinstance(payload, dict) else []
        found = any(r.get("name") == k.plural for r in resources)
        if found:
            self._served.add(kind)
        return found

    async def logs(
        self, namespace: str, pod: str, *, container: str | None = None, tail: int | None = None
    ) -> str:
        params = {"container": container} if container else {}
        if tail is not None:
            params["tailLines"] = str(tail)
        path = f"/api/v1/namespaces/{namespace}/pods/{pod}/log"
        status, payload, text = await self._request("GET", path, params=params)
        if status >= 400:
            raise _error("GET", path, status, payload, text, None, what=f"logs of pod {pod}")
        return text.decode("utf-8", "replace")

    async def whoami(self) -> str:
        """The user the server sees this client as (a SelfSubjectReview): what the operator
        logs at start, and what tells a token the client failed to send (system:anonymous)."""
        review = {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}
        _, payload = await self._call(
            "POST", "/apis/authentication.k8s.io/v1/selfsubjectreviews", body=review
        )
        return str(payload["status"]["userInfo"]["username"])


def _json(text: bytes) -> Any:
    try:
        return json.loads(text) if text else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def _error(
    method: str, path: str, status: int, payload: Any, text: bytes, kind: str | None,
    what: str = "",
) -> KubeError:  # fmt: skip
    """The error of a failed call, its class by what a retry can do."""
    message = f"{what or f'{method} {path}'}: HTTP {status}: {_message(payload, text)}"
    if status == 404 and kind is not None and not _is_status(payload):
        k = KINDS[kind]
        return NotServed(kind, f"{kind} ({k.api_version}) is not served by the cluster: {message}")
    if status in (401, 403):
        return Forbidden(message, status)
    if status in (400, 422):
        return Invalid(message, status)
    if status == 429 or status >= 500:
        return Unavailable(message, status)
    return KubeError(message, status)
