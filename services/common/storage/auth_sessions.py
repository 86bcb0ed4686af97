"""Authentication sessions of the MFA flow, updated with optimistic concurrency (a version)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from .db import Repository, from_json, from_ts
from .errors import AlreadyExistsError, ConcurrentUpdateError, NotFoundError
from .interfaces import AuthSessionRecord

_COLS = "id, tenant_id, subject_id, state, created_at, expires_at, version"


def _record(row: Any) -> AuthSessionRecord:
    return AuthSessionRecord(
        id=row[0],
        tenant_id=row[1],
        subject_id=row[2],
        state=from_json(row[3]),
        created_at=from_ts(row[4]),
        expires_at=from_ts(row[5]),
        version=row[6],
    )


class SqlAuthSessionRepository(Repository):
    table = "auth_sessions"

    def create(self, rec: AuthSessionRecord) -> AuthSessionRecord:
        with self._db.transaction() as s:
            row = s.one(
                f"INSERT INTO auth_sessions ({_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?)"
                f" ON CONFLICT DO NOTHING RETURNING {_COLS}",
                (
                    rec.id, rec.tenant_id, rec.subject_id, dict(rec.state), rec.created_at,
                    rec.expires_at, rec.version,
                ),
            )
        if row is None:
            raise AlreadyExistsError("session id already in use")
        return _record(row)

    def get(self, session_id: str) -> AuthSessionRecord | None:
        with self._db.read() as s:
            row = s.one(f"SELECT {_COLS} FROM auth_sessions WHERE id = ?", (session_id,))
        return _record(row) if row else None

    def update(
        self,
        session_id: str,
        expected_version: int,
        state: Mapping[str, Any],
        expires_at: datetime | None = None,
    ) -> AuthSessionRecord:
        with self._db.transaction() as s:
            row = s.one(
                "UPDATE auth_sessions SET state = ?, expires_at = COALESCE(?, expires_at),"
                f" version = version + 1 WHERE id = ? AND version = ? RETURNING {_COLS}",
                (dict(state), expires_at, session_id, expected_version),
            )
            if row is None:
                current = s.one("SELECT version FROM auth_sessions WHERE id = ?", (session_id,))
        if row is not None:
            return _record(row)
        if current is None:
            raise NotFoundError(f"no auth session {session_id!r}")
        raise ConcurrentUpdateError(
            f"auth session {session_id!r} is at version {current[0]}, not {expected_version}"
        )
