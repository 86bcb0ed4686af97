"""Subjects: consent per purpose, and the encrypted phone number used for SMS OTP."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from .db import Session, from_json, from_ts, utcnow
from .interfaces import ConsentRecord, Modality, PhoneRecord
from .repository import Repository
from .rows import insert_sql, values


def ensure_subject(s: Session, tenant_id: str, subject_id: str, now: datetime) -> None:
    """Create the subject row that templates, consents and services' own rows refer to, if missing."""
    s.execute(
        "INSERT INTO subjects (tenant_id, subject_id, created_at) VALUES (?, ?, ?)"
        " ON CONFLICT (tenant_id, subject_id) DO NOTHING",
        (tenant_id, subject_id, now),
    )


class SqlSubjectRepository(Repository[ConsentRecord]):
    table = "consents"
    record = ConsentRecord

    def record_consent(self, consent: ConsentRecord) -> ConsentRecord:
        with self._db.transaction() as s:
            ensure_subject(s, consent.tenant_id, consent.subject_id, consent.recorded_at)
            stored = self._returning(
                s,
                insert_sql(self.table, self.record)
                + " ON CONFLICT (tenant_id, subject_id, purpose) DO UPDATE SET"
                " modalities = excluded.modalities, granted = excluded.granted,"
                " policy_version = excluded.policy_version, evidence_ref = excluded.evidence_ref,"
                " recorded_at = excluded.recorded_at, withdrawn_at = excluded.withdrawn_at",
                values(consent),
            )
        assert stored is not None
        return stored

    def withdraw_consent(
        self, tenant_id: str, subject_id: str, purpose: str, now: datetime | None = None
    ) -> ConsentRecord | None:
        with self._db.transaction() as s:
            return self._returning(
                s,
                "UPDATE consents SET granted = ?, withdrawn_at = COALESCE(withdrawn_at, ?)"
                " WHERE tenant_id = ? AND subject_id = ? AND purpose = ?",
                (False, now or utcnow(), tenant_id, subject_id, purpose),
            )

    def get_consents(self, tenant_id: str, subject_id: str) -> list[ConsentRecord]:
        return self._select("tenant_id = ? AND subject_id = ?", (tenant_id, subject_id), "ORDER BY purpose")

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

    def consenting(
        self, tenant_id: str, purpose: str, modality: Modality, subject_ids: Sequence[str]
    ) -> set[str]:
        if not subject_ids:
            return set()
        marks = ", ".join("?" * len(subject_ids))
        with self._db.read() as s:
            rows = s.all(
                "SELECT subject_id, modalities FROM consents WHERE tenant_id = ? AND purpose = ?"
                f" AND granted = ? AND withdrawn_at IS NULL AND subject_id IN ({marks})",
                (tenant_id, purpose, True, *subject_ids),
            )
        return {r[0] for r in rows if modality in from_json(r[1])}

    def consent_changed_at(self, tenant_id: str, purpose: str) -> datetime | None:
        # Two index seeks (consents_recorded, consents_withdrawn): a grant sets recorded_at, a
        # withdrawal withdrawn_at, so the later of the two maxima moves with either.
        where = "FROM consents WHERE tenant_id = ? AND purpose = ?"
        with self._db.read() as s:
            recorded, withdrawn = s.one(
                f"SELECT (SELECT MAX(recorded_at) {where}), (SELECT MAX(withdrawn_at) {where})",
                (tenant_id, purpose, tenant_id, purpose),
            )
        return max((t for t in (from_ts(recorded), from_ts(withdrawn)) if t is not None), default=None)

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

    def count_phones_by_key(self) -> dict[str, int]:
        with self._db.read() as s:
            rows = s.all(
                "SELECT phone_key_id, COUNT(*) FROM subjects WHERE phone_key_id IS NOT NULL GROUP BY phone_key_id"
            )
        return {key_id: int(n) for key_id, n in rows}

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
