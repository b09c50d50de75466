"""Web console sessions: the SHA-256 of a random token held in the browser's cookie.

A mixin of ``Store`` (same engine, same write lock). Only the hash is stored, as for API keys:
a copy of the table opens no session. A session names the API key it was opened with and
nothing else — its tenant and role are the key's, read on every request, so a key revoked or
expired ends every session opened with it. Expired rows are purged when a session opens
(no background task; a console has a handful of sessions, not millions).
"""

from __future__ import annotations

import datetime as dt
from contextlib import AbstractContextManager
from dataclasses import dataclass

from sqlalchemy import Connection, delete, insert, select

from gpufleet.store.tables import aware, ui_sessions

__all__ = ["UiSession", "UiSessionStore"]


@dataclass(frozen=True, slots=True)
class UiSession:
    token_hash: str
    key_prefix: str
    created_at: dt.datetime
    expires_at: dt.datetime


class UiSessionStore:
    def _connect(self) -> AbstractContextManager[Connection]:
        raise NotImplementedError

    def _write(self) -> AbstractContextManager[Connection]:
        raise NotImplementedError

    def add_ui_session(self, session: UiSession) -> None:
        """Store a new session, dropping the ones expired by its creation time."""
        s = ui_sessions.c
        with self._write() as conn:
            conn.execute(delete(ui_sessions).where(s.expires_at <= session.created_at))
            conn.execute(
                insert(ui_sessions).values(
                    token_hash=session.token_hash,
                    key_prefix=session.key_prefix,
                    created_at=session.created_at,
                    expires_at=session.expires_at,
                )
            )

    def ui_session(self, token_hash: str) -> UiSession | None:
        s = ui_sessions.c
        with self._connect() as conn:
            row = conn.execute(
                select(s.token_hash, s.key_prefix, s.created_at, s.expires_at).where(
                    s.token_hash == token_hash
                )
            ).first()
        if row is None:
            return None
        return UiSession(row[0], row[1], aware(row[2]), aware(row[3]))

    def delete_ui_session(self, token_hash: str) -> bool:
        with self._write() as conn:
            result = conn.execute(delete(ui_sessions).where(ui_sessions.c.token_hash == token_hash))
        return bool(result.rowcount)

    def delete_ui_sessions_of(self, key_prefix: str) -> int:
        """End every session opened with one key (the key was revoked or expired)."""
        with self._write() as conn:
            result = conn.execute(delete(ui_sessions).where(ui_sessions.c.key_prefix == key_prefix))
        return int(result.rowcount or 0)
