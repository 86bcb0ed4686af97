"""Authentication sessions of the MFA flow, updated with optimistic concurrency (a version)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from .errors import ConcurrentUpdateError, NotFoundError
from .interfaces import AuthSessionRecord
from .repository import Repository


class SqlAuthSessionRepository(Repository[AuthSessionRecord]):
    table = "auth_sessions"
    record = AuthSessionRecord

    def create(self, rec: AuthSessionRecord) -> AuthSessionRecord:
        return self._insert_new(rec, "session id already in use")

    def get(self, session_id: str) -> AuthSessionRecord | None:
        return self._select_one("id = ?", (session_id,))

    def update(
        self,
        session_id: str,
        expected_version: int,
        state: Mapping[str, Any],
        expires_at: datetime | None = None,
    ) -> AuthSessionRecord:
        with self._db.transaction() as s:
            updated = self._returning(
                s,
                "UPDATE auth_sessions SET state = ?, expires_at = COALESCE(?, expires_at),"
                " version = version + 1 WHERE id = ? AND version = ?",
                (dict(state), expires_at, session_id, expected_version),
            )
            if updated is not None:
                return updated
            current = s.one("SELECT version FROM auth_sessions WHERE id = ?", (session_id,))
        if current is None:
            raise NotFoundError("no such auth session")
        raise ConcurrentUpdateError(
            f"auth session changed concurrently: at version {current[0]}, not {expected_version}"
        )
