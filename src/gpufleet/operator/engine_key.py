"""The engine key's Secret: made once, with a random key, in the operator's namespace.

Engine pods read it (each in the variable its engine takes) and the gateways mount it, so
engines answer nobody else. Engines run only in the operator's namespace (tenants' namespaces
hold no gpufleet engines), so one Secret there suffices. ``gpufleet render`` only names it (its
output stays deterministic); without an operator, people create it once with ``kubectl create
secret generic gpufleet-engine-key --from-literal=key=…``. An existing Secret is left as it is:
its key is what running engines and gateways already hold.
"""

from __future__ import annotations

import logging
import secrets

from gpufleet.runtime.kubernetes.api import KubeApi, KubeError
from gpufleet.runtime.kubernetes.common import MANAGED
from gpufleet.runtime.kubernetes.pods import ENGINE_KEY_SECRET, ENGINE_KEY_SECRET_KEY

__all__ = ["ensure_engine_key"]

log = logging.getLogger("gpufleet.operator")


async def ensure_engine_key(api: KubeApi, namespace: str) -> bool:
    """Create the Secret unless it exists. True when it is there; False (logged, with the fix)
    when it cannot be made: engine pods then wait for it rather than run open."""
    try:
        if await api.get("Secret", namespace, ENGINE_KEY_SECRET) is not None:
            return True
        await api.create(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {
                    "name": ENGINE_KEY_SECRET,
                    "namespace": namespace,
                    "labels": dict(MANAGED),
                },
                "type": "Opaque",
                "stringData": {ENGINE_KEY_SECRET_KEY: secrets.token_urlsafe(32)},
            }
        )
    except FileExistsError:
        return True  # made meanwhile by someone else: theirs stands
    except KubeError as exc:
        log.error(
            "cannot make the engine key Secret %s/%s (%s); engine pods wait for it: "
            "kubectl create secret generic %s -n %s --from-literal=%s=$(openssl rand -hex 32)",
            namespace,
            ENGINE_KEY_SECRET,
            exc,
            ENGINE_KEY_SECRET,
            namespace,
            ENGINE_KEY_SECRET_KEY,
        )
        return False
    log.info("made the engine key Secret %s/%s", namespace, ENGINE_KEY_SECRET)
    return True
