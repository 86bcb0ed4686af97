"""Biometric templates (envelopes encrypted by the caller), by subject and as 1:N galleries."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Any

from .db import from_ts
from .interfaces import Modality, TemplateRecord
from .repository import Repository
from .rows import insert_sql, to_record, values
from .subjects import ensure_subject

_KEY = "tenant_id = ? AND subject_id = ? AND modality = ? AND model_id = ? AND channel = ?"
_GALLERY = "tenant_id = ? AND modality = ? AND model_id = ? AND channel = ?"


class SqlTemplateRepository(Repository[TemplateRecord]):
    table = "templates"
    record = TemplateRecord

    def put(self, rec: TemplateRecord, replace: bool = False) -> TemplateRecord:
        conflict = (
            f"a {rec.modality} template for model {rec.model_id!r} channel {rec.channel!r}"
            " already exists for this subject (or the id is taken)"
        )
        with self._db.transaction() as s:
            ensure_subject(s, rec.tenant_id, rec.subject_id, rec.created_at)
            if not replace:
                return self._insert_new(rec, conflict)
            # Same key: a new envelope, keeping the row's id and created_at.
            stored = self._returning(
                s,
                insert_sql(self.table, self.record)
                + " ON CONFLICT (tenant_id, subject_id, modality, model_id, channel)"
                " DO UPDATE SET envelope = excluded.envelope, key_id = excluded.key_id,"
                " samples = excluded.samples, quality = excluded.quality,"
                " updated_at = excluded.updated_at",
                values(rec),
            )
        assert stored is not None
        return stored

    def get(
        self, tenant_id: str, subject_id: str, modality: Modality, model_id: str, channel: str = ""
    ) -> TemplateRecord | None:
        return self._select_one(_KEY, (tenant_id, subject_id, modality, model_id, channel))

    def list_for_subject(
        self, tenant_id: str, subject_id: str, modality: Modality | None = None
    ) -> list[TemplateRecord]:
        where, params = _subject_filter(tenant_id, subject_id, modality)
        return self._select(where, params, "ORDER BY modality, model_id, channel")

    def iter_gallery(
        self,
        tenant_id: str,
        modality: Modality,
        model_id: str,
        channel: str = "",
        batch: int = 1000,
        consent: str | None = None,
    ) -> Iterator[list[TemplateRecord]]:
        where, params = self._gallery(tenant_id, modality, model_id, channel, consent)
        return self._pages(where, params, batch)

    def iter_all(self, batch: int = 1000) -> Iterator[list[TemplateRecord]]:
        """Every template, in batches ordered by id."""
        return self._pages("1 = 1", (), batch)

    def _pages(self, where: str, params: tuple[Any, ...], batch: int) -> Iterator[list[TemplateRecord]]:
        # Keyset pagination: each batch is one short indexed read, so neither memory nor a
        # connection is held while the caller works on the batch.
        after = ""
        while True:
            found = self._select(where + " AND id > ?", (*params, after, batch), "ORDER BY id LIMIT ?")
            if found:
                yield found
            if len(found) < batch:
                return
            after = found[-1].id

    def count_gallery(
        self,
        tenant_id: str,
        modality: Modality,
        model_id: str,
        channel: str = "",
        consent: str | None = None,
    ) -> int:
        where, params = self._gallery(tenant_id, modality, model_id, channel, consent)
        with self._db.read() as s:
            return s.one(f"SELECT COUNT(*) FROM templates WHERE {where}", params)[0]

    def gallery_version(
        self, tenant_id: str, modality: Modality, model_id: str, channel: str = ""
    ) -> tuple[int, datetime | None]:
        # The count uses the gallery index; the latest updated_at reads the gallery's rows.
        with self._db.read() as s:
            count, latest = s.one(
                f"SELECT COUNT(*), MAX(updated_at) FROM templates WHERE {_GALLERY}",
                (tenant_id, modality, model_id, channel),
            )
        return int(count), from_ts(latest)

    def _gallery(
        self, tenant_id: str, modality: Modality, model_id: str, channel: str, consent: str | None
    ) -> tuple[str, tuple[Any, ...]]:
        """The WHERE clause of a gallery; with `consent` (a purpose), only the templates of
        subjects whose active consent of that purpose lists the gallery's modality."""
        params: tuple[Any, ...] = (tenant_id, modality, model_id, channel)
        if consent is None:
            return _GALLERY, params
        lists_modality = (
            "EXISTS (SELECT 1 FROM json_each(c.modalities) WHERE json_each.value = ?)"
            if self._db.dialect.name == "sqlite"
            else "c.modalities @> jsonb_build_array(?::text)"
        )
        where = (
            f"{_GALLERY} AND EXISTS (SELECT 1 FROM consents c WHERE c.tenant_id = templates.tenant_id"
            " AND c.subject_id = templates.subject_id AND c.purpose = ? AND c.granted = ?"
            f" AND c.withdrawn_at IS NULL AND {lists_modality})"
        )
        return where, (*params, consent, True, modality)

    def delete_for_subject(
        self, tenant_id: str, subject_id: str, modality: Modality | None = None
    ) -> int:
        return len(self.erase_for_subject(tenant_id, subject_id, modality))

    def erase_for_subject(
        self, tenant_id: str, subject_id: str, modality: Modality | None = None
    ) -> list[TemplateRecord]:
        where, params = _subject_filter(tenant_id, subject_id, modality)
        with self._db.transaction() as s:
            if self._db.dialect.name == "postgres":
                # An enrolment of this subject not yet committed holds a key-share lock on the subject
                # row (its template's foreign key): waiting for it here makes the DELETE see its row.
                # Without it the DELETE missed that row, yet its audit record came after the
                # enrolment's: a trail saying "erased" over a template that is there.
                s.execute("SELECT 1 FROM subjects WHERE tenant_id = ? AND subject_id = ? FOR UPDATE",
                          (tenant_id, subject_id))
            rows = s.all(f"DELETE FROM templates WHERE {where} RETURNING {self._cols}", params)
        return [to_record(TemplateRecord, r) for r in rows]

    def get_for_update(self, id: str) -> TemplateRecord | None:
        """The template of row ``id``, which no other transaction changes until this one ends (call it
        inside ``Storage.transaction()``; SQLite's write transaction excludes every other writer)."""
        lock = " FOR UPDATE" if self._db.dialect.name == "postgres" else ""
        with self._db.transaction() as s:
            row = s.one(f"SELECT {self._cols} FROM templates WHERE id = ?{lock}", (id,))
        return to_record(TemplateRecord, row) if row else None

    def iter_for_rewrap(
        self, exclude_key_id: str, batch: int, after_id: str = ""
    ) -> list[TemplateRecord]:
        return self._select(
            "key_id <> ? AND id > ?", (exclude_key_id, after_id, batch), "ORDER BY id LIMIT ?"
        )

    def count_by_key(self) -> dict[str, int]:
        with self._db.read() as s:
            return {key_id: int(n) for key_id, n in s.all("SELECT key_id, COUNT(*) FROM templates GROUP BY key_id")}

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
