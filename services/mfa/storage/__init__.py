"""The MFA's own tables, owned and migrated by the MFA: bound devices, SMS OTP codes, authentication
sessions, the review queue, lockout counters, subject signals and the webhook outbox.

They live in the shared storage's database (the devices refer to the shared subjects) and join its
transactions, so that a session change and its audit record commit together:

    store = attach(rt.storage)        # runs the MFA's migrations once per storage
    with rt.storage.transaction():
        store.auth_sessions.update(...)
        rt.audit.append(...)
"""

from __future__ import annotations

from datetime import datetime

from services.common.storage import SchemaPart, Storage, StoragePart
from services.common.storage.db import Database, utcnow

from .records import (
    AuthSessionRecord,
    DeviceRecord,
    LockoutRecord,
    MfaErasure,
    OtpRecord,
    ReviewRecord,
    SubjectSignalRecord,
    WebhookEventRecord,
)
from .repositories import (
    LOCK_COST,
    SqlAuthSessionRepository,
    SqlDeviceRepository,
    SqlLockoutRepository,
    SqlOtpRepository,
    SqlReviewRepository,
    SqlSubjectSignalRepository,
    SqlWebhookOutboxRepository,
)


class MfaStore:
    def __init__(self, db: Database) -> None:
        self.db = db
        self.devices = SqlDeviceRepository(db)
        self.otp = SqlOtpRepository(db)
        self.auth_sessions = SqlAuthSessionRepository(db)
        self.reviews = SqlReviewRepository(db)
        self.lockouts = SqlLockoutRepository(db)
        self.subject_signals = SqlSubjectSignalRepository(db)
        self.webhooks = SqlWebhookOutboxRepository(db)

    def erase_subject(self, tenant_id: str, subject_id: str) -> MfaErasure:
        """Every row of the subject in the MFA's tables, in one transaction (or the caller's)."""
        with self.db.transaction():
            return MfaErasure(
                devices=self.devices.delete_for_subject(tenant_id, subject_id),
                otp=self.otp.delete_for_subject(tenant_id, subject_id),
                sessions=self.auth_sessions.delete_for_subject(tenant_id, subject_id),
                reviews=self.reviews.delete_for_subject(tenant_id, subject_id),
                lockouts=self.lockouts.delete_for_subject(tenant_id, subject_id),
                signals=self.subject_signals.delete_for_subject(tenant_id, subject_id),
            )

    def purge_expired(self, now: datetime | None = None) -> int:
        """Delete expired OTP codes and sessions; returns the rows deleted."""
        now = now or utcnow()
        with self.db.transaction() as s:
            return sum(s.count(f"DELETE FROM {table} WHERE expires_at <= ?", (now,))
                       for table in ("otp_challenges", "auth_sessions"))


PART = StoragePart(SchemaPart("mfa", __package__), MfaStore)


def attach(storage: Storage) -> MfaStore:
    return storage.attach(PART)


__all__ = [
    "LOCK_COST", "PART", "AuthSessionRecord", "DeviceRecord", "LockoutRecord", "MfaErasure", "MfaStore",
    "OtpRecord", "ReviewRecord", "SubjectSignalRecord", "WebhookEventRecord", "attach",
]
