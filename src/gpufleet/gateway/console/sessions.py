"""Console sessions: sign in once with an API key, then a cookie — and CSRF tokens for writes.

The cookie holds a random 256-bit token; the store keeps only its SHA-256 and the prefix of the
API key it was opened with (``store.ui_sessions``). Each request re-reads who that key is
through the keyring, from memory, as the API does for a bearer key: a key revoked or expired
ends its sessions within the keyring's refresh (0.5 s), and a key's changed role applies at
once. The cookie is ``HttpOnly`` (no script reads it), ``SameSite=Strict`` (no other site's
page sends it), ``Secure`` when the console is reached over https, and lasts ``SESSION_S``.

A write — a form POST or a ``fetch`` that is not a GET — must also carry
``HMAC-SHA256(token, "csrf")``: in the ``X-CSRF-Token`` header or a ``csrf`` form field. The page
gets it in a ``<meta>`` tag of its own HTML, which another origin cannot read; SameSite already
keeps the cookie off cross-site requests, and the token holds where SameSite is not honoured
(old browsers, a sibling subdomain). The token is derived, so nothing more is stored.

With authentication off (``gpufleet up --no-auth``) there are no keys: signing in opens a
session for the anonymous admin, and the same cookie and CSRF rules apply.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import hmac
import secrets
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import Response

from gpufleet.gateway.auth import ANONYMOUS, Keyring, Principal
from gpufleet.gateway.errors import ApiError
from gpufleet.store import Store
from gpufleet.store.ui_sessions import UiSession

__all__ = [
    "COOKIE",
    "CSRF_HEADER",
    "SESSION_S",
    "Session",
    "Sessions",
    "csrf_token",
    "hash_token",
]

COOKIE = "gpufleet_session"
CSRF_HEADER = "x-csrf-token"
#: How long a session lasts from sign-in (a working day and a half; the key may end it sooner).
SESSION_S = 12 * 3600
#: The key prefix of sessions opened while authentication is off.
ANONYMOUS_PREFIX = "none"
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def csrf_token(token: str) -> str:
    """The CSRF token of a session: HMAC-SHA256 of the literal "csrf" keyed by its token."""
    return hmac.new(token.encode(), b"csrf", hashlib.sha256).hexdigest()


def not_signed_in(message: str = "Not signed in: sign in at /ui/login") -> ApiError:
    return ApiError(401, message, type="invalid_request_error", code="not_signed_in")


def csrf_refused() -> ApiError:
    return ApiError(
        403,
        "Missing or wrong CSRF token: reload the console page and try again (a change must "
        "come from the console's own page, with its X-CSRF-Token header or csrf form field)",
        type="permission_error",
        code="csrf_failed",
    )


@dataclass(frozen=True, slots=True)
class Session:
    """A signed-in browser: its token (from the cookie), when it ends, and who it acts as."""

    token: str
    key_prefix: str
    expires_at: dt.datetime
    principal: Principal

    @property
    def csrf(self) -> str:
        return csrf_token(self.token)

    def check_csrf(self, presented: str | None) -> None:
        if not presented or not hmac.compare_digest(presented, self.csrf):
            raise csrf_refused()


class Sessions:
    """Opening, reading and ending sessions; ``keyring`` None: authentication is off."""

    def __init__(self, store: Store, keyring: Keyring | None, *, session_s: float = SESSION_S):
        self.store = store
        self.keyring = keyring
        self.session_s = session_s

    @property
    def auth(self) -> bool:
        return self.keyring is not None and self.keyring.enabled

    async def open(self, key: str, now: dt.datetime | None = None) -> tuple[str, Session]:
        """Check ``key`` as the API does (401 ``ApiError`` if it is not a live key), store a
        new session for it and return its token and the session."""
        if self.keyring is not None and self.keyring.enabled:
            if not key.strip():
                raise not_signed_in("Enter an API key (it starts with gpf_)")
            principal = await self.keyring.authenticate(f"Bearer {key.strip()}")
        else:
            principal = ANONYMOUS
        prefix = principal.key_prefix if self.auth else ANONYMOUS_PREFIX
        now = now or dt.datetime.now(dt.UTC)
        token = secrets.token_urlsafe(32)
        expires = now + dt.timedelta(seconds=self.session_s)
        await asyncio.to_thread(
            self.store.add_ui_session, UiSession(hash_token(token), prefix, now, expires)
        )
        return token, Session(token, prefix, expires, principal)

    async def read(self, request: Request) -> Session:
        """The request's session, or 401: no cookie, unknown or expired token, or a key that
        no longer works (its sessions are ended then)."""
        token = request.cookies.get(COOKIE)
        if not token:
            raise not_signed_in()
        row = await asyncio.to_thread(self.store.ui_session, hash_token(token))
        if row is None:
            raise not_signed_in("Your console session ended: sign in again")
        if row.expires_at <= dt.datetime.now(dt.UTC):
            await asyncio.to_thread(self.store.delete_ui_session, row.token_hash)
            raise not_signed_in("Your console session expired: sign in again")
        principal = self._principal(row.key_prefix)
        if principal is None:
            await asyncio.to_thread(self.store.delete_ui_sessions_of, row.key_prefix)
            raise not_signed_in(
                f"The API key {row.key_prefix}… of this session was revoked or expired: sign in "
                "with another key"
            )
        return Session(token, row.key_prefix, row.expires_at, principal)

    async def write(self, request: Request, csrf: str | None = None) -> Session:
        """The session of a request that changes something: ``read``, then its CSRF token —
        ``csrf`` (a form's field) or the ``X-CSRF-Token`` header — or 403."""
        session = await self.read(request)
        session.check_csrf(csrf if csrf is not None else request.headers.get(CSRF_HEADER))
        return session

    async def authenticate(self, request: Request) -> Principal:
        """The caller of a console API request: reads need the session, writes its CSRF
        token too (what the admin routes mounted under ``/ui/api`` authenticate with)."""
        if request.method in _SAFE_METHODS:
            return (await self.read(request)).principal
        return (await self.write(request)).principal

    async def close(self, session: Session) -> None:
        await asyncio.to_thread(self.store.delete_ui_session, hash_token(session.token))

    def _principal(self, prefix: str) -> Principal | None:
        if not self.auth:
            return ANONYMOUS if prefix == ANONYMOUS_PREFIX else None
        assert self.keyring is not None
        return self.keyring.principal_for(prefix)


def set_cookie(response: Response, request: Request, token: str, max_age: int) -> None:
    response.set_cookie(
        COOKIE,
        token,
        max_age=max_age,
        path="/",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )


def clear_cookie(response: Response, request: Request) -> None:
    response.delete_cookie(
        COOKIE, path="/", httponly=True, samesite="strict", secure=request.url.scheme == "https"
    )
