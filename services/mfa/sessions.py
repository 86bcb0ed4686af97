"""Authentication sessions in the MFA's auth_sessions table, changed by compare-and-swap on their
version so that concurrent calls on one session (two factor submissions, a decision racing a
submission) never lose an update."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import grpc

from services.common import errors
from services.common.context import Principal
from services.common.storage import ConcurrentUpdateError, NotFoundError

from .state import SessionState
from .storage import AuthSessionRecord, MfaStore

SESSION_ID = re.compile(r"ses_[0-9a-f]{32}")  # fullmatch
CAS_RETRIES = 8


def require_open(state: SessionState) -> None:
    """Refuses a session that has a decision: checked on load and again in each compare-and-swap
    that changes an open session, so that a decision taken meanwhile is never changed."""
    if state.decision is not None:
        raise errors.failed_precondition("the session has ended with a decision", "SESSION_DECIDED")


def require_room(used: int, limit: int, what: str) -> None:
    """Refuses a step past one of the session's limits (Policy.session): checked before the work and
    again in the compare-and-swap that counts it, so that concurrent calls cannot pass it together."""
    if used >= limit:
        raise errors.failed_precondition(f"the session has taken its {limit} {what}; start a new session",
                                         "SESSION_LIMIT_REACHED")


@dataclass(frozen=True)
class Session:
    """A stored session with its state parsed. Change the state only through Sessions.mutate."""

    id: str
    tenant_id: str
    subject_id: str
    expires_at: datetime
    version: int
    state: SessionState

    @classmethod
    def of(cls, rec: AuthSessionRecord) -> Session:
        return cls(rec.id, rec.tenant_id, rec.subject_id, rec.expires_at, rec.version,
                   SessionState.from_json(dict(rec.state)))


def terminal_may_serve(caller: Principal, channel: str, callback_channel: str | None = None) -> None:
    """Refuses a registered terminal (``caller``, the RPC's principal) a session of another channel
    than its own (the IVR platform may also serve a session it calls the customer back for); any
    other caller passes (context.SYSTEM, an in-process caller, is no terminal)."""
    if caller.terminal_channel is not None and caller.terminal_channel not in (
            channel, callback_channel):
        raise errors.permission_denied(
            f"the caller is a registered {caller.terminal_channel} terminal, not one of the {channel} channel: "
            "a terminal runs sessions of its own channel only", "TERMINAL_NOT_REGISTERED")


class Sessions:
    def __init__(self, store: MfaStore) -> None:
        self.repo = store.auth_sessions

    def create(self, tenant: str, subject: str, state: SessionState, expires_at: datetime, session_id: str,
               now: datetime) -> Session:
        """Raises AlreadyExistsError when the id is taken."""
        return Session.of(self.repo.create(AuthSessionRecord(tenant, subject, state.to_json(), expires_at,
                                                             id=session_id, created_at=now)))

    def get(self, session_id: str) -> Session | None:
        rec = self.repo.get(session_id)
        return Session.of(rec) if rec is not None else None

    def tenant_of(self, session_id: str) -> str | None:
        """For the server's tenant check: the session's tenant, None for no such session."""
        rec = self.repo.get(session_id) if SESSION_ID.fullmatch(session_id or "") else None
        return rec.tenant_id if rec is not None else None

    def load(self, session_id: str, now: datetime, caller: Principal, field: str = "session_id") -> Session:
        """A stored, unexpired session that ``caller`` (the RPC's principal) may serve."""
        if not SESSION_ID.fullmatch(session_id or ""):
            raise errors.invalid_argument(f"{field} is not a session id", **{field: "malformed"})
        found = self.get(session_id)
        if found is None:
            raise errors.not_found("no such authentication session", "SESSION_NOT_FOUND")
        terminal_may_serve(caller, found.state.channel, found.state.callback_channel)
        if found.expires_at <= now:
            raise errors.failed_precondition("the authentication session expired; start a new one", "SESSION_EXPIRED")
        return found

    def open(self, session_id: str, now: datetime, caller: Principal) -> Session:
        """A session that can still take factors (not yet finally decided)."""
        found = self.load(session_id, now, caller)
        require_open(found.state)
        return found

    def mutate(self, session: Session, change: Callable[[SessionState], None],
               expires_at: datetime | None = None) -> Session:
        """Apply ``change`` to a fresh copy of the state and write it (and a new expiry, when given);
        on a concurrent update re-read the session and apply ``change`` again (it must be safe to re-run)."""
        rec_id, version, state_json = session.id, session.version, session.state.to_json()
        for _ in range(CAS_RETRIES):
            state = SessionState.from_json(state_json)
            change(state)
            try:
                return Session.of(self.repo.update(rec_id, version, state.to_json(), expires_at))
            except ConcurrentUpdateError:
                fresh = self.repo.get(rec_id)
                if fresh is None:
                    raise errors.not_found("no such authentication session", "SESSION_NOT_FOUND") from None
                version, state_json = fresh.version, dict(fresh.state)
            except NotFoundError:
                raise errors.not_found("no such authentication session", "SESSION_NOT_FOUND") from None
        raise errors.ServiceError(grpc.StatusCode.ABORTED, "the session is being changed concurrently; retry",
                                  "SESSION_CONTENDED")
