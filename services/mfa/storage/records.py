"""What the MFA stores in its own tables (frozen record types): bound devices, SMS OTP codes,
authentication sessions, the human review queue, lockout counters and the last trusted context
of a subject. Every timestamp is a timezone-aware UTC ``datetime``."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from services.common.storage import new_id
from services.common.storage.db import utcnow

ReviewStatus = Literal["pending", "approved", "rejected", "expired"]
LockoutScope = Literal["subject", "device"]


def _review_id() -> str:
    return "rev_" + uuid.uuid4().hex


@dataclass(frozen=True)
class DeviceRecord:
    tenant_id: str
    subject_id: str
    fingerprint: str  # a hash of the device's attributes, never the raw identifiers
    public_key: bytes | None = None  # DER SubjectPublicKeyInfo
    attributes: Mapping[str, Any] = field(default_factory=dict)
    label: str = ""
    platform: str = ""
    id: str = field(default_factory=new_id)
    bound_at: datetime = field(default_factory=utcnow)
    last_seen_at: datetime | None = None
    revoked_at: datetime | None = None
    kind: str = "key"  # "key" (a raw public key) or "webauthn" (a passkey)
    credential_id: str | None = None  # WebAuthn: the credential's rawId, base64url
    credential_public_key: bytes | None = None  # WebAuthn: COSE key (public_key holds it as DER SPKI)
    sign_count: int = 0  # WebAuthn: the authenticator's signature counter last seen
    push_token: str | None = None  # the app's push registration token (FCM), where it gave one
    flagged_at: datetime | None = None  # the customer denied a transaction on this device


@dataclass(frozen=True)
class OtpRecord:
    session_id: str
    tenant_id: str
    subject_id: str
    code_hash: str
    expires_at: datetime
    max_attempts: int = 3
    attempts: int = 0
    id: str = field(default_factory=new_id)
    sent_at: datetime = field(default_factory=utcnow)
    consumed_at: datetime | None = None


@dataclass(frozen=True)
class AuthSessionRecord:
    """``state`` is the JSON form of :class:`services.mfa.state.SessionState`."""

    tenant_id: str
    subject_id: str
    state: Mapping[str, Any]
    expires_at: datetime
    id: str = field(default_factory=new_id)
    created_at: datetime = field(default_factory=utcnow)
    version: int = 1


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
class WebhookEventRecord:
    """An event for the bank's webhook, written in the transaction of the change it reports.
    ``body`` is the JSON sent (no personal data); ``next_attempt_at`` is None once it was
    delivered (``delivered_at``) or abandoned after its last attempt."""

    tenant_id: str
    event_type: str
    body: str
    next_attempt_at: datetime | None
    id: str = field(default_factory=lambda: "evt_" + uuid.uuid4().hex)
    created_at: datetime = field(default_factory=utcnow)
    attempts: int = 0
    delivered_at: datetime | None = None
    last_error: str = ""


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
    phone_changed_at: datetime | None = None  # the SIM-swap cooling-off starts here
    flagged_at: datetime | None = None  # the latest fraud signal (a denied push confirmation)
    flag_reason: str = ""


@dataclass(frozen=True)
class MfaErasure:
    """Rows of one subject erased from the MFA's tables."""

    devices: int
    otp: int
    sessions: int
    reviews: int
    lockouts: int
    signals: int
