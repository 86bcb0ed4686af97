"""Authentication sessions in storage.auth_sessions, changed by compare-and-swap on their version
so that concurrent calls on one session (two factor submissions, a decision racing a submission)
never lose an update."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import datetime
from typing import Any

import grpc

from services.common import context, errors
from services.common.storage import AuthSessionRecord, ConcurrentUpdateError, NotFoundError, Storage

SESSION_ID = re.compile(r"^ses_[0-9a-f]{32}$")
CAS_RETRIES = 8


class Sessions:
    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    def load(self, session_id: str, now: datetime, field: str = "session_id") -> AuthSessionRecord:
        if not SESSION_ID.match(session_id or ""):
            raise errors.invalid_argument(f"{field} is not a session id", **{field: "malformed"})
        rec = self.storage.auth_sessions.get(session_id)
        if rec is None:
            raise errors.not_found("no such authentication session", "SESSION_NOT_FOUND")
        principal = context.principal.get()
        if principal is not None and not principal.may_act_for(rec.tenant_id):
            raise errors.permission_denied(f"caller '{principal.name}' may not act for this session's tenant",
                                           "TENANT_NOT_ALLOWED")
        if rec.expires_at <= now:
            raise errors.failed_precondition("the authentication session expired; start a new one", "SESSION_EXPIRED")
        return rec

    def open(self, session_id: str, now: datetime) -> AuthSessionRecord:
        """A session that can still take factors (not yet finally decided)."""
        rec = self.load(session_id, now)
        if rec.state.get("decision"):
            raise errors.failed_precondition("the session has ended with a decision", "SESSION_DECIDED")
        return rec

    def mutate(self, rec: AuthSessionRecord, change: Callable[[dict[str, Any]], None]) -> AuthSessionRecord:
        """Apply ``change`` to a copy of the state and write it; on a concurrent update re-read
        the session and apply ``change`` again (it must be safe to re-run)."""
        for _ in range(CAS_RETRIES):
            state = _copy(rec.state)
            change(state)
            try:
                return self.storage.auth_sessions.update(rec.id, rec.version, state)
            except ConcurrentUpdateError:
                fresh = self.storage.auth_sessions.get(rec.id)
                if fresh is None:
                    raise errors.not_found("no such authentication session", "SESSION_NOT_FOUND") from None
                rec = fresh
            except NotFoundError:
                raise errors.not_found("no such authentication session", "SESSION_NOT_FOUND") from None
        raise errors.ServiceError(grpc.StatusCode.ABORTED, "the session is being changed concurrently; retry",
                                  "SESSION_CONTENDED")


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_copy(v) for v in value]
    return value
