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

from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from services.common.storage import SchemaPart, Storage, StoragePart
from services.common.storage.db import Database, utcnow
from services.common.storage.retention import Expiry

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

if TYPE_CHECKING:
    from services.common.config import RetentionConfig


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

    def expiries(self, cfg: RetentionConfig, webhook_keep_s: int, now: datetime | None = None) -> list[Expiry]:
        """The MFA's rows past their retention at ``now`` (services/common/storage/retention.py).
        Bound devices, subject signals and lockout counters that hold a lock go with erasure."""
        now = now or utcnow()

        def before(seconds: int) -> datetime:
            return now - timedelta(seconds=seconds)

        otp, sessions = before(cfg.otp_s), before(cfg.sessions_s)
        return [
            # A session's codes go together once all are past the grace: deleting the newest alone
            # would let an older code sent with a longer lifetime answer again (otp.py, check).
            Expiry("sms_codes", "otp_challenges",
                   "expires_at <= ? AND NOT EXISTS (SELECT 1 FROM otp_challenges o"
                   " WHERE o.session_id = otp_challenges.session_id AND o.expires_at > ?)", (otp, otp),
                   order="expires_at"),
            # Kept while its review is pending, and for sessions_s after the review's resolution.
            Expiry("auth_sessions", "auth_sessions",
                   "expires_at <= ? AND NOT EXISTS (SELECT 1 FROM mfa_reviews r WHERE r.session_id ="
                   " auth_sessions.id AND (r.status = 'pending' OR r.resolved_at > ?))", (sessions, sessions),
                   order="expires_at"),
            Expiry("reviews", "mfa_reviews", "status <> 'pending' AND resolved_at <= ?", (before(cfg.reviews_s),),
                   order="resolved_at"),
            Expiry("webhook_events", "mfa_webhook_outbox", "next_attempt_at IS NULL AND created_at <= ?",
                   (before(webhook_keep_s),), order="created_at"),
            Expiry("lockout_counters", "mfa_lockouts", "locked_at IS NULL AND updated_at <= ?",
                   (before(cfg.lockouts_s),), key="tenant_id, scope, key", order="updated_at"),
            Expiry("revoked_devices", "devices", "revoked_at <= ?", (before(cfg.revoked_devices_s),),
                   order="revoked_at"),
        ]


PART = StoragePart(SchemaPart("mfa", __package__), MfaStore)


def attach(storage: Storage) -> MfaStore:
    return storage.attach(PART)


__all__ = [
    "LOCK_COST", "PART", "AuthSessionRecord", "DeviceRecord", "LockoutRecord", "MfaErasure", "MfaStore",
    "OtpRecord", "ReviewRecord", "SubjectSignalRecord", "WebhookEventRecord", "attach",
]
