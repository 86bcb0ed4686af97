"""Raw access to the audit tables. The hash chain and signatures are computed by the caller's
builder; this module only guarantees that appends are serialised and written atomically."""

from __future__ import annotations

from collections.abc import Iterator

from .db import Database
from .interfaces import AuditAppend, AuditBuilder, AuditCheckpoint, AuditHead, AuditRow
from .rows import columns, insert_sql, to_record, values


class SqlAuditRepository:
    def __init__(self, db: Database) -> None:
        self._db = db

    def append(self, build: AuditBuilder) -> AuditRow:
        with self._db.transaction() as s:
            self._db.lock(s, "audit_append")
            last = s.one("SELECT seq, hash FROM audit_records ORDER BY seq DESC LIMIT 1")
            next_seq, prev_hash = (1, None) if last is None else (int(last[0]) + 1, last[1])
            built = build(next_seq, prev_hash)
            out = built if isinstance(built, AuditAppend) else AuditAppend(row=built)
            if out.row.seq != next_seq or out.row.prev_hash != prev_hash:
                raise ValueError(
                    f"audit builder returned seq {out.row.seq} / prev_hash {out.row.prev_hash!r},"
                    f" expected {next_seq} / {prev_hash!r}"
                )
            s.execute(insert_sql("audit_records", AuditRow), values(out.row))
            if out.checkpoint is not None:
                s.execute(insert_sql("audit_checkpoints", AuditCheckpoint), values(out.checkpoint))
            if out.head is not None:
                s.execute(
                    "INSERT INTO audit_head (id, seq, hash, signature, key_id) VALUES (1, ?, ?, ?, ?)"
                    " ON CONFLICT (id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash,"
                    " signature = excluded.signature, key_id = excluded.key_id",
                    values(out.head),
                )
        return out.row

    def last(self) -> AuditRow | None:
        with self._db.read() as s:
            r = s.one(f"SELECT {columns(AuditRow)} FROM audit_records ORDER BY seq DESC LIMIT 1")
        return to_record(AuditRow, r) if r else None

    def head(self) -> AuditHead | None:
        with self._db.read() as s:
            r = s.one(f"SELECT {columns(AuditHead)} FROM audit_head WHERE id = 1")
        return to_record(AuditHead, r) if r else None

    def checkpoints(self) -> list[AuditCheckpoint]:
        with self._db.read() as s:
            rows = s.all(f"SELECT {columns(AuditCheckpoint)} FROM audit_checkpoints ORDER BY seq")
        return [to_record(AuditCheckpoint, r) for r in rows]

    def iter_records(self, from_seq: int = 1, batch: int = 1000) -> Iterator[AuditRow]:
        after = from_seq - 1
        while True:
            with self._db.read() as s:
                rows = s.all(
                    f"SELECT {columns(AuditRow)} FROM audit_records WHERE seq > ? ORDER BY seq LIMIT ?",
                    (after, batch),
                )
            yield from (to_record(AuditRow, r) for r in rows)
            if len(rows) < batch:
                return
            after = int(rows[-1][0])
