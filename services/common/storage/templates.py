"""Biometric templates (envelopes encrypted by the caller), by subject and as 1:N galleries."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from .db import Repository, from_json, from_ts
from .errors import AlreadyExistsError
from .interfaces import Modality, TemplateRecord
from .subjects import ensure_subject

_COLS = (
    "id, tenant_id, subject_id, modality, model_id, channel, envelope, key_id, samples, quality,"
    " created_at, updated_at"
)


def _record(row: Any) -> TemplateRecord:
    return TemplateRecord(
        id=row[0],
        tenant_id=row[1],
        subject_id=row[2],
        modality=row[3],
        model_id=row[4],
        channel=row[5],
        envelope=bytes(row[6]),
        key_id=row[7],
        samples=row[8],
        quality=from_json(row[9]),
        created_at=from_ts(row[10]),
        updated_at=from_ts(row[11]),
    )


class SqlTemplateRepository(Repository):
    table = "templates"

    def put(self, rec: TemplateRecord, replace: bool = False) -> TemplateRecord:
        values = (
            rec.id, rec.tenant_id, rec.subject_id, rec.modality, rec.model_id, rec.channel,
            rec.envelope, rec.key_id, rec.samples, dict(rec.quality), rec.created_at, rec.updated_at,
        )
        insert = f"INSERT INTO templates ({_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        with self._db.transaction() as s:
            ensure_subject(s, rec.tenant_id, rec.subject_id, rec.created_at)
            if replace:
                row = s.one(
                    insert + " ON CONFLICT (tenant_id, subject_id, modality, model_id, channel)"
                    " DO UPDATE SET envelope = excluded.envelope, key_id = excluded.key_id,"
                    " samples = excluded.samples, quality = excluded.quality,"
                    f" updated_at = excluded.updated_at RETURNING {_COLS}",
                    values,
                )
            else:
                row = s.one(insert + f" ON CONFLICT DO NOTHING RETURNING {_COLS}", values)
        if row is None:
            raise AlreadyExistsError(
                f"a {rec.modality} template for model {rec.model_id!r} channel {rec.channel!r}"
                " already exists for this subject (or the id is taken)"
            )
        return _record(row)

    def get(
        self, tenant_id: str, subject_id: str, modality: Modality, model_id: str, channel: str = ""
    ) -> TemplateRecord | None:
        with self._db.read() as s:
            row = s.one(
                f"SELECT {_COLS} FROM templates WHERE tenant_id = ? AND subject_id = ?"
                " AND modality = ? AND model_id = ? AND channel = ?",
                (tenant_id, subject_id, modality, model_id, channel),
            )
        return _record(row) if row else None

    def list_for_subject(
        self, tenant_id: str, subject_id: str, modality: Modality | None = None
    ) -> list[TemplateRecord]:
        where, params = _subject_filter(tenant_id, subject_id, modality)
        with self._db.read() as s:
            rows = s.all(
                f"SELECT {_COLS} FROM templates WHERE {where} ORDER BY modality, model_id, channel",
                params,
            )
        return [_record(r) for r in rows]

    def iter_gallery(
        self, tenant_id: str, modality: Modality, model_id: str, channel: str = "", batch: int = 1000
    ) -> Iterator[list[TemplateRecord]]:
        # Keyset pagination: each batch is one short indexed read, so neither memory nor a
        # connection is held while the caller scores the batch.
        after = ""
        while True:
            with self._db.read() as s:
                rows = s.all(
                    f"SELECT {_COLS} FROM templates WHERE tenant_id = ? AND modality = ?"
                    " AND model_id = ? AND channel = ? AND id > ? ORDER BY id LIMIT ?",
                    (tenant_id, modality, model_id, channel, after, batch),
                )
            if not rows:
                return
            yield [_record(r) for r in rows]
            if len(rows) < batch:
                return
            after = rows[-1][0]

    def count_gallery(
        self, tenant_id: str, modality: Modality, model_id: str, channel: str = ""
    ) -> int:
        with self._db.read() as s:
            return s.one(
                "SELECT COUNT(*) FROM templates WHERE tenant_id = ? AND modality = ?"
                " AND model_id = ? AND channel = ?",
                (tenant_id, modality, model_id, channel),
            )[0]

    def delete_for_subject(
        self, tenant_id: str, subject_id: str, modality: Modality | None = None
    ) -> int:
        where, params = _subject_filter(tenant_id, subject_id, modality)
        with self._db.transaction() as s:
            return s.count(f"DELETE FROM templates WHERE {where}", params)

    def iter_for_rewrap(
        self, exclude_key_id: str, batch: int, after_id: str = ""
    ) -> list[TemplateRecord]:
        with self._db.read() as s:
            rows = s.all(
                f"SELECT {_COLS} FROM templates WHERE key_id <> ? AND id > ? ORDER BY id LIMIT ?",
                (exclude_key_id, after_id, batch),
            )
        return [_record(r) for r in rows]

    def replace_envelope(
        self,
        id: str,
        expected_key_id: str,
        new_envelope: bytes,
        new_key_id: str,
        expected_envelope: bytes | None = None,
    ) -> bool:
        return self._swap_envelope(
            "UPDATE templates SET envelope = ?, key_id = ? WHERE id = ? AND key_id = ?",
            (new_envelope, new_key_id, id, expected_key_id),
            "envelope",
            expected_envelope,
        )


def _subject_filter(
    tenant_id: str, subject_id: str, modality: Modality | None
) -> tuple[str, tuple[Any, ...]]:
    if modality is None:
        return "tenant_id = ? AND subject_id = ?", (tenant_id, subject_id)
    return "tenant_id = ? AND subject_id = ? AND modality = ?", (tenant_id, subject_id, modality)
