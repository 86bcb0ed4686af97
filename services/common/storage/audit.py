"""Raw access to the audit tables. The hash chain and signatures are computed by the caller's
builder; this module only guarantees that appends are serialised and written atomically."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from .db import Database, from_ts
from .interfaces import AuditAppend, AuditBuilder, AuditCheckpoint, AuditHead, AuditRow

_COLS = "seq, ts, event_type, actor, tenant_id, subject_pseudonym, details, prev_hash, hash"


def _row(r: Any) -> AuditRow:
    return AuditRow(
        seq=int(r[0]),
        ts=from_ts(r[1]),
        event_type=r[2],
        actor=r[3],
        tenant_id=r[4],
        subject_pseudonym=r[5],
        details=r[6],
        prev_hash=r[7],
        hash=r[8],
    )


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
            row = out.row
            if row.seq != next_seq or row.prev_hash != prev_hash:
                raise ValueError(
                    f"audit builder returned seq {row.seq} / prev_hash {row.prev_hash!r},"
                    f" expected {next_seq} / {prev_hash!r}"
                )
            s.execute(
                f"INSERT INTO audit_records ({_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    row.seq, row.ts, row.event_type, row.actor, row.tenant_id,
                    row.subject_pseudonym, row.details, row.prev_hash, row.hash,
                ),
            )
            if out.checkpoint is not None:
                c = out.checkpoint
                s.execute(
                    "INSERT INTO audit_checkpoints (seq, hash, signature, key_id, ts)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (c.seq, c.hash, c.signature, c.key_id, c.ts),
                )
            if out.head is not None:
                h = out.head
                s.execute(
                    "INSERT INTO audit_head (id, seq, hash, signature, key_id) VALUES (1, ?, ?, ?, ?)"
                    " ON CONFLICT (id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash,"
                    " signature = excluded.signature, key_id = excluded.key_id",
                    (h.seq, h.hash, h.signature, h.key_id),
                )
        return row

    def last(self) -> AuditRow | None:
        with self._db.read() as s:
            r = s.one(f"SELECT {_COLS} FROM audit_records ORDER BY seq DESC LIMIT 1")
        return _row(r) if r else None

    def head(self) -> AuditHead | None:
        with self._db.read() as s:
            r = s.one("SELECT seq, hash, signature, key_id FROM audit_head WHERE id = 1")
        return AuditHead(int(r[0]), r[1], bytes(r[2]), r[3]) if r else None

    def checkpoints(self) -> list[AuditCheckpoint]:
        with self._db.read() as s:
            rows = s.all("SELECT seq, hash, signature, key_id, ts FROM audit_checkpoints ORDER BY seq")
        return [AuditCheckpoint(int(r[0]), r[1], bytes(r[2]), r[3], from_ts(r[4])) for r in rows]

    def iter_records(self, from_seq: int = 1, batch: int = 1000) -> Iterator[AuditRow]:
        after = from_seq - 1
        while True:
            with self._db.read() as s:
                rows = s.all(
                    f"SELECT {_COLS} FROM audit_records WHERE seq > ? ORDER BY seq LIMIT ?",
                    (after, batch),
                )
            yield from (_row(r) for r in rows)
            if len(rows) < batch:
                return
            after = int(rows[-1][0])
