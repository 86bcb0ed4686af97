"""Records and repository interfaces of the MFA orchestrator's own tables (migration 0002):
the human review queue, lockout counters, and the last trusted context of a subject."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, Protocol

from .db import utcnow

ReviewStatus = Literal["pending", "approved", "rejected"]
LockoutScope = Literal["subject", "device"]


def _review_id() -> str:
    return "rev_" + uuid.uuid4().hex


@dataclass(frozen=True)
class ReviewRecord:
    tenant_id: str
    subject_id: str
    session_id: str
    action: str
    reasons: tuple[Any, ...]  # ((code, message), ...)
    status: str = "pending"
    id: str = field(default_factory=_review_id)
    created_at: datetime = field(default_factory=utcnow)
    resolved_at: datetime | None = None
    resolved_by: str = ""
    note: str = ""


@dataclass(frozen=True)
class LockoutRecord:
    """Consecutive failures of one scope. ``cost`` is in thousandths of the lock limit, so that
    failures of different weight (with or without liveness) add up: locked at 1000."""

    tenant_id: str
    scope: str
    key: str
    subject_id: str  # for a device scope: the subject of the latest failure
    failures: int = 0
    cost: int = 0
    last_failure_at: datetime | None = None
    locked_at: datetime | None = None
    updated_at: datetime = field(default_factory=utcnow)


@dataclass(frozen=True)
class SubjectSignalRecord:
    tenant_id: str
    subject_id: str
    country: str
    latitude: float | None = None
    longitude: float | None = None
    seen_at: datetime = field(default_factory=utcnow)


class ReviewRepository(Protocol):
    def create(self, rec: ReviewRecord) -> ReviewRecord:
        """Raises AlreadyExistsError when the session already has a review."""

    def get(self, review_id: str) -> ReviewRecord | None: ...

    def list(
        self, tenant_id: str, status: str, limit: int, after: tuple[datetime, str] | None = None
    ) -> list[ReviewRecord]:
        """Oldest first; ``after`` is the (created_at, id) of the previous page's last review."""

    def resolve(
        self, review_id: str, status: str, resolved_by: str, note: str, now: datetime | None = None
    ) -> ReviewRecord | None:
        """Compare-and-swap from 'pending'; None when unknown or already resolved."""

    def delete_for_subject(self, tenant_id: str, subject_id: str) -> int: ...


class LockoutRepository(Protocol):
    def get(self, tenant_id: str, scope: str, key: str) -> LockoutRecord | None: ...

    def record_failure(
        self, tenant_id: str, scope: str, key: str, subject_id: str, cost: int,
        now: datetime | None = None,
    ) -> LockoutRecord:
        """Atomically add one failure of ``cost``; sets locked_at when the cost reaches 1000."""

    def reset(self, tenant_id: str, scope: str, key: str) -> bool:
        """Forget the counter (a success)."""

    def delete_for_subject(self, tenant_id: str, subject_id: str) -> int:
        """Forget the subject's counter and those of devices whose latest failure was the
        subject's (an administrator's unlock, erasure)."""


class SubjectSignalRepository(Protocol):
    def get(self, tenant_id: str, subject_id: str) -> SubjectSignalRecord | None: ...

    def put(self, rec: SubjectSignalRecord) -> None: ...

    def delete_for_subject(self, tenant_id: str, subject_id: str) -> int: ...


__all__ = [
    "LockoutRecord", "LockoutRepository", "LockoutScope", "ReviewRecord", "ReviewRepository",
    "ReviewStatus", "SubjectSignalRecord", "SubjectSignalRepository", "utcnow",
]
