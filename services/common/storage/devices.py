"""Bound devices: fingerprint, public key, and lifecycle (bound, seen, revoked)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from .db import Repository, from_json, from_ts, utcnow
from .errors import AlreadyExistsError
from .interfaces import DeviceRecord
from .subjects import ensure_subject

_COLS = (
    "id, tenant_id, subject_id, fingerprint, attributes, public_key, label, platform, bound_at,"
    " last_seen_at, revoked_at"
)


def _record(row: Any) -> DeviceRecord:
    return DeviceRecord(
        id=row[0],
        tenant_id=row[1],
        subject_id=row[2],
        fingerprint=row[3],
        attributes=from_json(row[4]),
        public_key=None if row[5] is None else bytes(row[5]),
        label=row[6],
        platform=row[7],
        bound_at=from_ts(row[8]),
        last_seen_at=from_ts(row[9]),
        revoked_at=from_ts(row[10]),
    )


class SqlDeviceRepository(Repository):
    table = "devices"

    def add(self, rec: DeviceRecord) -> DeviceRecord:
        with self._db.transaction() as s:
            ensure_subject(s, rec.tenant_id, rec.subject_id, rec.bound_at)
            row = s.one(
                f"INSERT INTO devices ({_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                f" ON CONFLICT DO NOTHING RETURNING {_COLS}",
                (
                    rec.id, rec.tenant_id, rec.subject_id, rec.fingerprint, dict(rec.attributes),
                    rec.public_key, rec.label, rec.platform, rec.bound_at, rec.last_seen_at,
                    rec.revoked_at,
                ),
            )
        if row is None:
            raise AlreadyExistsError("an active device with this fingerprint is already bound")
        return _record(row)

    def get(self, tenant_id: str, device_id: str) -> DeviceRecord | None:
        with self._db.read() as s:
            row = s.one(
                f"SELECT {_COLS} FROM devices WHERE tenant_id = ? AND id = ?", (tenant_id, device_id)
            )
        return _record(row) if row else None

    def get_by_fingerprint(
        self, tenant_id: str, subject_id: str, fingerprint: str
    ) -> DeviceRecord | None:
        with self._db.read() as s:
            row = s.one(
                f"SELECT {_COLS} FROM devices WHERE tenant_id = ? AND subject_id = ?"
                " AND fingerprint = ? AND revoked_at IS NULL",
                (tenant_id, subject_id, fingerprint),
            )
        return _record(row) if row else None

    def list_for_subject(
        self, tenant_id: str, subject_id: str, include_revoked: bool = False
    ) -> list[DeviceRecord]:
        query = f"SELECT {_COLS} FROM devices WHERE tenant_id = ? AND subject_id = ?"
        if not include_revoked:
            query += " AND revoked_at IS NULL"
        with self._db.read() as s:
            rows = s.all(query + " ORDER BY bound_at, id", (tenant_id, subject_id))
        return [_record(r) for r in rows]

    def revoke(self, tenant_id: str, device_id: str, now: datetime | None = None) -> bool:
        return self._update_one(
            "UPDATE devices SET revoked_at = ? WHERE tenant_id = ? AND id = ? AND revoked_at IS NULL",
            (now or utcnow(), tenant_id, device_id),
        )

    def touch(self, tenant_id: str, device_id: str, now: datetime | None = None) -> bool:
        return self._update_one(
            "UPDATE devices SET last_seen_at = ? WHERE tenant_id = ? AND id = ? AND revoked_at IS NULL",
            (now or utcnow(), tenant_id, device_id),
        )
