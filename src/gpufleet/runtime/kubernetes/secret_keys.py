"""External endpoints' keys on Kubernetes: read from the Secrets their specs name.

An ``engine: external`` model's ``spec.endpoints[*].apiKey.secretKeyRef`` names a Secret in the
model's namespace (the release's, where the operator and the gateways run) and a key in it. The
key is read through the API at each probe, so a rotated Secret is used from the next probe on
(seconds), with no restart and no copy of it anywhere else: gpufleet never writes it into a
pod spec, a Model's status, a log or an event.

Access is scoped by name: the chart grants the gateways and the operator ``get`` on exactly the
Secrets listed in ``externalEndpoints.keySecrets`` (a Role's ``resourceNames``) — never on every
Secret of the namespace, which holds the store's URL and the engine key. A Secret that is not
listed answers 403, and the replica says which value to add; a missing Secret or key says so
too. ``apiKey.env`` and ``apiKey.file`` belong to ``gpufleet up``: ``check`` refuses them on
Kubernetes before anything is started.
"""

from __future__ import annotations

import base64
import binascii

from gpufleet.runtime.external import KeyError_
from gpufleet.runtime.kubernetes.api import KubeApi, KubeError
from gpufleet.spec import ApiKeySource

__all__ = ["KEY_SECRETS_VALUE", "SecretKeys"]

#: The chart's value listing the Secrets gateways and the operator may read keys from.
KEY_SECRETS_VALUE = "externalEndpoints.keySecrets"


class SecretKeys:
    """``KeyReader`` over the API: ``await keys(source)`` is the key ``source.secretKeyRef``
    names, or ``KeyError_`` with the fix."""

    def __init__(self, api: KubeApi, namespace: str) -> None:
        self.api = api
        self.namespace = namespace

    async def __call__(self, source: ApiKeySource) -> str:
        ref = source.secret_key_ref
        if ref is None:
            raise KeyError_(
                "apiKey.env and apiKey.file are read by gpufleet up; on Kubernetes give "
                "apiKey.secretKeyRef {name, key}"
            )
        where = f"Secret {self.namespace}/{ref.name}"
        try:
            secret = await self.api.get("Secret", self.namespace, ref.name)
        except KubeError as exc:
            if exc.status in (401, 403):
                raise KeyError_(
                    f"apiKey.secretKeyRef: may not read {where}; add {ref.name!r} to the "
                    f"chart's {KEY_SECRETS_VALUE} (the Role's resourceNames) and upgrade"
                ) from None
            raise KeyError_(f"apiKey.secretKeyRef: cannot read {where} ({exc})") from None
        if secret is None:
            raise KeyError_(
                f"apiKey.secretKeyRef: {where} does not exist; kubectl create secret generic "
                f"{ref.name} -n {self.namespace} --from-literal={ref.key}=…"
            )
        value = _value(secret, ref.key)
        if value is None:
            raise KeyError_(f"apiKey.secretKeyRef: {where} has no key {ref.key!r}")
        value = value.strip()
        if not value:
            raise KeyError_(f"apiKey.secretKeyRef: {where} key {ref.key!r} is empty")
        return value


def _value(secret: dict[str, object], key: str) -> str | None:
    """The key's value: ``data`` is base64 (what the API returns); ``stringData`` is accepted
    from in-memory stand-ins that keep what was written."""
    data = secret.get("data") or {}
    if isinstance(data, dict) and key in data:
        try:
            return base64.b64decode(str(data[key]), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None
    plain = secret.get("stringData") or {}
    if isinstance(plain, dict) and key in plain:
        return str(plain[key])
    return None
