"""Who is calling: API keys, tenants and roles, checked on every request without a database trip.

Keys are ``gpf_`` followed by 32 URL-safe characters (192 random bits). Only the SHA-256 of a
key is stored (a slow password hash buys nothing against 192 random bits and would cost the
hot path); the first 12 characters are kept in clear as the key's *prefix*, the id shown in
listings and used to find the record. Verification compares digests in constant time.

Every gateway holds all tenants and keys in memory (a bank has thousands, not millions) and
reloads what changed every ``refresh_s`` (0.5 s): a key revoked through any gateway stops
working everywhere within a second. A key this gateway has not seen yet (made through another
gateway a moment ago) is looked up once in the store.

Roles: ``admin`` may do everything; ``operator`` manages models and the fleet and reads usage;
``user`` may only call the inference API, on the models its tenant may use.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from typing import Any, Literal

from gpufleet.gateway.errors import ApiError
from gpufleet.gateway.quotas import Limits
from gpufleet.outages import OutageReporter
from gpufleet.policies.fair_order import QUEUE_PRIORITIES
from gpufleet.policies.quota_rules import limits_of
from gpufleet.spec import API_VERSION, LimitsSpec, ModelSpec, Tenant, parse_tenant
from gpufleet.store import KeyRecord, Store

__all__ = [
    "DEFAULT_TENANT",
    "KEY_PREFIX",
    "ROLES",
    "Keyring",
    "Principal",
    "hash_key",
    "new_key",
]


Role = Literal["admin", "operator", "user"]
ROLES: tuple[str, ...] = ("admin", "operator", "user")
KEY_PREFIX = "gpf_"
_PREFIX_LEN = 12
DEFAULT_TENANT = "default"


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_key() -> tuple[str, str, str]:
    """A fresh key: (the secret shown once, its prefix, its hash)."""
    secret = KEY_PREFIX + secrets.token_urlsafe(24)
    return secret, secret[:_PREFIX_LEN], hash_key(secret)


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller of one request, as the gateway sees it after authentication."""

    tenant: str
    key_prefix: str
    role: str
    tenant_limits: Limits
    key_limits: Limits
    priority: int = 0
    weight: float = 1.0
    #: The tenant opted in to endpoints outside the company (``allowExternalEndpoints``).
    external_endpoints: bool = False

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    @property
    def is_operator(self) -> bool:
        return self.role in ("admin", "operator")

    def may_use(self, spec: ModelSpec) -> bool:
        allowed = spec.access.tenants
        return not allowed or self.is_operator or self.tenant in allowed

    def scopes(self) -> list[tuple[str, Limits]]:
        return [
            (f"tenant:{self.tenant}", self.tenant_limits),
            (f"key:{self.key_prefix}", self.key_limits),
        ]


#: The caller when auth is disabled explicitly (``gpufleet up --no-auth``).
ANONYMOUS = Principal(DEFAULT_TENANT, "none", "admin", Limits(), Limits())


def unauthorized(message: str) -> ApiError:
    return ApiError(
        401,
        message,
        type="invalid_request_error",
        code="invalid_api_key",
        headers={"www-authenticate": 'Bearer realm="gpufleet"'},
    )


def forbidden(needed: str) -> ApiError:
    return ApiError(
        403,
        f"This API key may not do this; it needs the role '{needed}' (ask an admin for such a key)",
        type="permission_error",
        code="insufficient_role",
    )


@dataclass(slots=True)
class _Entry:
    record: KeyRecord
    principal: Principal


class Keyring:
    """Tenants and keys in memory, refreshed from the store; ``enabled=False`` admits everyone
    as an admin of the default tenant (explicit opt-out for a single-user machine)."""

    def __init__(self, store: Store, *, enabled: bool = True, refresh_s: float = 0.5) -> None:
        self.store = store
        self.enabled = enabled
        self.refresh_s = refresh_s
        #: The gateway's, once it is built (``service.Gateway``): a store outage is one line.
        self.outages = OutageReporter()
        self._keys: dict[str, _Entry] = {}
        self._tenants: dict[str, Tenant] = {}
        self._misses: dict[str, float] = {}
        self._watermark: dt.datetime | None = None
        self._task: asyncio.Task[None] | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def load(self) -> None:
        """Read every tenant and key (blocking: at start, and after this gateway changes one)."""
        now = dt.datetime.now(dt.UTC)
        self._tenants = {t.tenant.name: t.tenant for t in self.store.list_tenants()}
        self._keys = {}
        for record in self.store.list_keys():
            self._put(record)
        self._watermark = now

    def _refresh(self) -> None:
        now = dt.datetime.now(dt.UTC)
        # Overlap the window: a row committed just before the last look may carry an older time.
        since = (self._watermark or now) - dt.timedelta(seconds=5)
        tenants = {t.tenant.name: t.tenant for t in self.store.list_tenants()}
        changed = self.store.list_keys(changed_since=since)
        if tenants != self._tenants:
            # A tenant's limits, class or weight changed: rebuild every principal.
            self._tenants = tenants
            changed = [e.record for e in self._keys.values()] + changed
        for record in changed:
            self._put(record)
        self._watermark = now

    async def start(self) -> None:
        await asyncio.to_thread(self.load)
        self._task = asyncio.create_task(self._loop(), name="auth:refresh")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                await asyncio.to_thread(self._refresh)
            except Exception as exc:  # noqa: BLE001 - the store is away: serve from memory
                self.outages.failed("store", exc, affected="key refresh (keys served from memory)")
            else:
                self.outages.recovered("store")

    def _put(self, record: KeyRecord) -> None:
        tenant = self._tenants.get(record.tenant)
        spec = tenant.spec if tenant is not None else None
        key_limits = (
            limits_of(LimitsSpec.model_validate(record.limits)) if record.limits else Limits()
        )
        principal = Principal(
            tenant=record.tenant,
            key_prefix=record.prefix,
            role=record.role,
            tenant_limits=limits_of(spec.limits) if spec else Limits(),
            key_limits=key_limits,
            priority=QUEUE_PRIORITIES[spec.priority] if spec else 0,
            weight=spec.weight if spec else 1.0,
            external_endpoints=spec.allow_external_endpoints if spec else False,
        )
        self._keys[record.prefix] = _Entry(record, principal)

    # -- queries -----------------------------------------------------------------------------

    def tenant(self, name: str) -> Tenant | None:
        return self._tenants.get(name)

    def tenants(self) -> list[Tenant]:
        return [self._tenants[n] for n in sorted(self._tenants)]

    async def authenticate(self, authorization: str | None) -> Principal:
        if not self.enabled:
            return ANONYMOUS
        if not authorization:
            raise unauthorized(
                "No API key: send 'Authorization: Bearer <key>' (an admin creates keys with "
                "'gpufleet keys create')"
            )
        scheme, _, secret = authorization.partition(" ")
        secret = secret.strip()
        if scheme.lower() != "bearer" or not secret:
            raise unauthorized("The Authorization header must be 'Bearer <key>'")
        prefix = secret[:_PREFIX_LEN]
        entry = self._keys.get(prefix)
        if entry is None and secret.startswith(KEY_PREFIX) and len(prefix) == _PREFIX_LEN:
            entry = await self._lookup(prefix)
        if entry is None or not hmac.compare_digest(entry.record.hash, hash_key(secret)):
            raise unauthorized("Invalid API key")
        record = entry.record
        if record.revoked_at is not None:
            raise unauthorized(f"The API key {record.prefix}… was revoked")
        if record.expires_at is not None and record.expires_at <= dt.datetime.now(dt.UTC):
            raise unauthorized(
                f"The API key {record.prefix}… expired at {record.expires_at:%Y-%m-%d %H:%M} UTC"
            )
        if record.tenant not in self._tenants:
            raise unauthorized(f"The tenant '{record.tenant}' of this API key no longer exists")
        return entry.principal

    def principal_for(self, prefix: str) -> Principal | None:
        """The caller a key stands for, without its secret (work the key started earlier,
        such as a batch); None once the key is revoked, expired or its tenant gone."""
        if not self.enabled:
            return ANONYMOUS
        entry = self._keys.get(prefix)
        if entry is None or entry.record.tenant not in self._tenants:
            return None
        record = entry.record
        if record.revoked_at is not None:
            return None
        if record.expires_at is not None and record.expires_at <= dt.datetime.now(dt.UTC):
            return None
        return entry.principal

    async def _lookup(self, prefix: str) -> _Entry | None:
        """A key made through another gateway since the last refresh (misses cached 1 s)."""
        now = time.monotonic()
        if self._misses.get(prefix, 0.0) > now:
            return None
        record = await asyncio.to_thread(self.store.get_key, prefix)
        if record is None:
            if len(self._misses) > 10_000:
                self._misses.clear()
            self._misses[prefix] = now + 1.0
            return None
        if record.tenant not in self._tenants:
            await asyncio.to_thread(self._refresh)
        self._put(record)
        return self._keys.get(prefix)

    # -- changes made through this gateway ---------------------------------------------------

    def ensure_default_tenant(self) -> None:
        if not any(t.tenant.name == DEFAULT_TENANT for t in self.store.list_tenants()):
            self.store.apply_tenant(default_tenant())

    def create_key(
        self,
        tenant: str,
        *,
        name: str,
        role: str,
        limits: dict[str, Any] | None = None,
        expires_at: dt.datetime | None = None,
    ) -> tuple[str, KeyRecord]:
        secret, prefix, digest = new_key()
        now = dt.datetime.now(dt.UTC)
        record = KeyRecord(
            prefix=prefix,
            hash=digest,
            tenant=tenant,
            name=name,
            role=role,
            limits=limits,
            created_at=now,
            expires_at=expires_at,
            revoked_at=None,
            updated_at=now,
        )
        self.store.add_key(record)
        self._put(record)
        return secret, record

    def bootstrap_admin(self, secret: str | None) -> str | None:
        """Make sure an admin can log in; returns a new admin key to print once, or None.

        With ``secret`` (``GPUFLEET_ADMIN_KEY``) that key is installed as the admin key of the
        default tenant, replacing an earlier one with the same prefix. Without it, a key is
        made only when the store has no admin key at all.
        """
        self.ensure_default_tenant()
        if secret:
            if not secret.startswith(KEY_PREFIX) or len(secret) < 32:
                raise ValueError(
                    f"GPUFLEET_ADMIN_KEY must start with '{KEY_PREFIX}' and be at least 32 "
                    'characters long (make one with: python -c "import secrets; '
                    "print('gpf_' + secrets.token_urlsafe(24))\")"
                )
            self.store.replace_key_hash(
                secret[:_PREFIX_LEN], hash_key(secret), tenant=DEFAULT_TENANT, role="admin"
            )
            self.load()
            return None
        live = [k for k in self.store.list_keys() if k.role == "admin" and k.revoked_at is None]
        if live:
            return None
        made, _ = self.create_key(DEFAULT_TENANT, name="admin", role="admin")
        self.load()
        return made


def default_tenant() -> Tenant:
    return parse_tenant(
        {"apiVersion": API_VERSION, "kind": "Tenant", "metadata": {"name": DEFAULT_TENANT}}
    )
