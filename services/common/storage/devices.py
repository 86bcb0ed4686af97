"""Bound devices: fingerprint, public key, and lifecycle (bound, seen, revoked)."""

from __future__ import annotations

from datetime import datetime

from .db import utcnow
from .interfaces import DeviceRecord
from .repository import Repository
from .subjects import ensure_subject


class SqlDeviceRepository(Repository[DeviceRecord]):
    table = "devices"
    record = DeviceRecord

    def add(self, rec: DeviceRecord) -> DeviceRecord:
        with self._db.transaction() as s:
            ensure_subject(s, rec.tenant_id, rec.subject_id, rec.bound_at)
            return self._insert_new(
                rec, "device id in use, or an active device with this fingerprint is bound"
            )

    def get(self, tenant_id: str, device_id: str) -> DeviceRecord | None:
        return self._select_one("tenant_id = ? AND id = ?", (tenant_id, device_id))

    def get_by_fingerprint(
        self, tenant_id: str, subject_id: str, fingerprint: str
    ) -> DeviceRecord | None:
        return self._select_one(
            "tenant_id = ? AND subject_id = ? AND fingerprint = ? AND revoked_at IS NULL",
            (tenant_id, subject_id, fingerprint),
        )

    def list_for_subject(
        self, tenant_id: str, subject_id: str, include_revoked: bool = False
    ) -> list[DeviceRecord]:
        where = "tenant_id = ? AND subject_id = ?"
        if not include_revoked:
            where += " AND revoked_at IS NULL"
        return self._select(where, (tenant_id, subject_id), "ORDER BY bound_at, id")

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
