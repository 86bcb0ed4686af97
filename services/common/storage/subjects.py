"""Subjects: consent per purpose, and the encrypted phone number used for SMS OTP."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from .db import Repository, Session, from_json, from_ts, utcnow
from .interfaces import ConsentRecord, Modality, PhoneRecord

_CONSENT_COLS = (
    "tenant_id, subject_id, purpose, modalities, granted, policy_version, evidence_ref,"
    " recorded_at, withdrawn_at"
)


def ensure_subject(s: Session, tenant_id: str, subject_id: str, now: datetime) -> None:
    """Create the subject row that templates, consents and devices refer to, if missing."""
    s.execute(
        "INSERT INTO subjects (tenant_id, subject_id, created_at) VALUES (?, ?, ?)"
        " ON CONFLICT (tenant_id, subject_id) DO NOTHING",
        (tenant_id, subject_id, now),
    )


def _consent(row: Any) -> ConsentRecord:
    return ConsentRecord(
        tenant_id=row[0],
        subject_id=row[1],
        purpose=row[2],
        modalities=tuple(from_json(row[3])),
        granted=bool(row[4]),
        policy_version=row[5],
        evidence_ref=row[6],
        recorded_at=from_ts(row[7]),
        withdrawn_at=from_ts(row[8]),
    )


class SqlSubjectRepository(Repository):
    table = "consents"

    def record_consent(self, consent: ConsentRecord) -> ConsentRecord:
        with self._db.transaction() as s:
            ensure_subject(s, consent.tenant_id, consent.subject_id, consent.recorded_at)
            row = s.one(
                f"INSERT INTO consents ({_CONSENT_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (tenant_id, subject_id, purpose) DO UPDATE SET"
                " modalities = excluded.modalities, granted = excluded.granted,"
                " policy_version = excluded.policy_version, evidence_ref = excluded.evidence_ref,"
                " recorded_at = excluded.recorded_at, withdrawn_at = excluded.withdrawn_at"
                f" RETURNING {_CONSENT_COLS}",
                (
                    consent.tenant_id, consent.subject_id, consent.purpose,
                    list(consent.modalities), consent.granted, consent.policy_version,
                    consent.evidence_ref, consent.recorded_at, consent.withdrawn_at,
                ),
            )
        return _consent(row)

    def withdraw_consent(
        self, tenant_id: str, subject_id: str, purpose: str, now: datetime | None = None
    ) -> ConsentRecord | None:
        with self._db.transaction() as s:
            row = s.one(
                "UPDATE consents SET granted = ?, withdrawn_at = COALESCE(withdrawn_at, ?)"
                " WHERE tenant_id = ? AND subject_id = ? AND purpose = ?"
                f" RETURNING {_CONSENT_COLS}",
                (False, now or utcnow(), tenant_id, subject_id, purpose),
            )
        return _consent(row) if row else None

    def get_consents(self, tenant_id: str, subject_id: str) -> list[ConsentRecord]:
        with self._db.read() as s:
            rows = s.all(
                f"SELECT {_CONSENT_COLS} FROM consents WHERE tenant_id = ? AND subject_id = ?"
                " ORDER BY purpose",
                (tenant_id, subject_id),
            )
        return [_consent(r) for r in rows]

    def has_active_consent(
        self, tenant_id: str, subject_id: str, purpose: str, modality: Modality
    ) -> bool:
        with self._db.read() as s:
            row = s.one(
                "SELECT modalities FROM consents WHERE tenant_id = ? AND subject_id = ?"
                " AND purpose = ? AND granted = ? AND withdrawn_at IS NULL",
                (tenant_id, subject_id, purpose, True),
            )
        return row is not None and modality in from_json(row[0])

    def set_phone(self, tenant_id: str, subject_id: str, envelope: bytes, key_id: str) -> None:
        now = utcnow()
        with self._db.transaction() as s:
            s.execute(
                "INSERT INTO subjects (tenant_id, subject_id, created_at, phone_envelope,"
                " phone_key_id, phone_updated_at) VALUES (?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (tenant_id, subject_id) DO UPDATE SET"
                " phone_envelope = excluded.phone_envelope, phone_key_id = excluded.phone_key_id,"
                " phone_updated_at = excluded.phone_updated_at",
                (tenant_id, subject_id, now, envelope, key_id, now),
            )

    def get_phone(self, tenant_id: str, subject_id: str) -> tuple[bytes, str] | None:
        with self._db.read() as s:
            row = s.one(
                "SELECT phone_envelope, phone_key_id FROM subjects"
                " WHERE tenant_id = ? AND subject_id = ? AND phone_envelope IS NOT NULL",
                (tenant_id, subject_id),
            )
        return (bytes(row[0]), row[1]) if row else None

    def iter_phones_for_rewrap(
        self, exclude_key_id: str, batch: int, after: tuple[str, str] = ("", "")
    ) -> list[PhoneRecord]:
        with self._db.read() as s:
            rows = s.all(
                "SELECT tenant_id, subject_id, phone_envelope, phone_key_id FROM subjects"
                " WHERE phone_key_id IS NOT NULL AND phone_key_id <> ?"
                " AND (tenant_id, subject_id) > (?, ?) ORDER BY tenant_id, subject_id LIMIT ?",
                (exclude_key_id, after[0], after[1], batch),
            )
        return [PhoneRecord(r[0], r[1], bytes(r[2]), r[3]) for r in rows]

    def replace_phone_envelope(
        self,
        tenant_id: str,
        subject_id: str,
        expected_key_id: str,
        new_envelope: bytes,
        new_key_id: str,
        expected_envelope: bytes | None = None,
    ) -> bool:
        return self._swap_envelope(
            "UPDATE subjects SET phone_envelope = ?, phone_key_id = ?"
            " WHERE tenant_id = ? AND subject_id = ? AND phone_key_id = ?",
            (new_envelope, new_key_id, tenant_id, subject_id, expected_key_id),
            "phone_envelope",
            expected_envelope,
        )
