"""Objects the operator owns in the cluster (Services, disruption budgets, loader Jobs, tenants'
namespaces, quotas, policies and RBAC), kept as written — and left alone when they already are.

"As written" means: every field gpufleet sets has the value it sets. The API server adds
defaults (a Service's clusterIP, ipFamilies, sessionAffinity, a port's protocol; a Namespace's
``kubernetes.io/metadata.name`` label) and other controllers add labels and annotations; those
are not differences. Comparing whole objects made a steady fleet rewrite every Service and
Namespace every pass, and a rewrite that dropped the server's fields gave a Service a new
ClusterIP. A correction is merged into what is there, so server-set fields survive it.

A selector (``spec.selector``) is the exception: nothing else writes it, and a key gpufleet
drops from it must go — a Service that kept ``gpufleet.io/role: decode`` after its model stopped
being disaggregated would select no pod. It is compared, and written, whole.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Mapping
from typing import Any

from gpufleet.runtime.kubernetes.api import Conflict, KubeApi

__all__ = ["covers", "ensure", "merged"]

log = logging.getLogger("gpufleet.operator")

_Key = tuple[str, str, str]
MANAGED = {"app.kubernetes.io/managed-by": "gpufleet"}
#: Fields compared and written whole, not merged (paths from the object's root).
_WHOLE: tuple[tuple[str, ...], ...] = (("spec", "selector"),)


def covers(have: Any, want: Any) -> bool:
    """Whether ``have`` holds everything ``want`` sets (maps: each key, recursively; lists:
    the same length, element by element; anything else: equal)."""
    if isinstance(want, Mapping):
        return isinstance(have, Mapping) and all(
            k in have and covers(have[k], v) for k, v in want.items()
        )
    if isinstance(want, list):
        return (
            isinstance(have, list)
            and len(have) == len(want)
            and all(covers(h, w) for h, w in zip(have, want, strict=True))
        )
    if isinstance(want, bool) or isinstance(have, bool):
        return have is want
    if isinstance(want, int | float) and isinstance(have, int | float):
        return float(want) == float(have)
    return bool(have == want)


def merged(have: Mapping[str, Any], want: Mapping[str, Any]) -> dict[str, Any]:
    """``want`` written over ``have``: maps merged key by key, anything else replaced."""
    out = copy.deepcopy(dict(have))
    for key, value in want.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _at(obj: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(obj, Mapping) or key not in obj:
            return None
        obj = obj[key]
    return obj


def _as_written(have: Mapping[str, Any], want: Mapping[str, Any]) -> bool:
    """Whether ``have`` holds ``want``: everything it sets, and its selectors exactly."""
    return covers(have, want) and all(
        _at(have, path) == _at(want, path) for path in _WHOLE if _at(want, path) is not None
    )


def _corrected(have: Mapping[str, Any], want: Mapping[str, Any]) -> dict[str, Any]:
    """``want`` merged into ``have``, its selectors written whole."""
    out = merged(have, want)
    for path in _WHOLE:
        value = _at(want, path)
        if value is not None:
            _at(out, path[:-1])[path[-1]] = copy.deepcopy(value)
    return out


def _wanted_part(obj: Mapping[str, Any]) -> dict[str, Any]:
    meta = obj.get("metadata", {})
    part = {k: v for k, v in obj.items() if k not in ("metadata", "status", "apiVersion", "kind")}
    part["metadata"] = {
        k: meta[k] for k in ("labels", "annotations", "ownerReferences") if k in meta
    }
    return part


async def ensure(
    api: KubeApi,
    wanted: Mapping[_Key, dict[str, Any]],
    kinds: tuple[str, ...],
    namespace: str | None,
    owner_label: str,
) -> int:
    """Make the objects in ``wanted`` exist as written; delete the managed ones of ``kinds``
    carrying ``owner_label`` that are not wanted any more. One list per kind reads what is
    there. Returns the number of writes (0 in a steady state)."""
    writes = 0
    existing: dict[_Key, dict[str, Any]] = {}
    for kind in kinds:
        for obj in await api.list(kind, namespace, MANAGED):
            meta = obj["metadata"]
            existing[(kind, meta.get("namespace", ""), meta["name"])] = obj
    for key, child in sorted(wanted.items()):
        have = existing.get(key)
        if have is None:
            try:
                await api.create(child)
                writes += 1
                continue
            except FileExistsError:  # there, but not labelled as ours: take it over
                have = await api.get(*key)
                if have is None:
                    continue
        want = _wanted_part(child)
        if not _as_written(have, want):
            writes += 1
            with contextlib.suppress(Conflict, KeyError):  # changed meanwhile: next pass
                await api.replace(_corrected(have, want))
    for key, obj in existing.items():
        if (
            owner_label in (obj["metadata"].get("labels") or {})
            and key not in wanted
            and not obj["metadata"].get("deletionTimestamp")
        ):
            writes += 1
            await api.delete(*key)
    return writes
