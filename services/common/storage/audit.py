"""Raw access to the audit tables. The hash chain and signatures are computed by the caller's
builder; this module only guarantees that appends are serialised and written atomically."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import TypeVar

from services.common import metrics

from .db import Database, Session
from .errors import StorageError
from .interfaces import AuditAppend, AuditBuilder, AuditCheckpoint, AuditHead, AuditRow, AuditTailCheck
from .rows import columns, insert_sql, to_record, values


_R = TypeVar("_R", AuditRow, AuditCheckpoint)
_EVENT_TYPE = re.compile(r"[a-z0-9_]+(\.[a-z0-9_]+)*")
_TAIL = ("SELECT r.seq, r.hash, h.seq, h.hash, h.signature, h.key_id FROM (SELECT 1 AS one) AS o"
         " LEFT JOIN (SELECT seq, hash FROM audit_records ORDER BY seq DESC LIMIT 1) AS r ON 1 = 1"
         " LEFT JOIN audit_head AS h ON h.id = 1")


def checkpointed_sql(event_type: str) -> str:
    """The records of ``event_type`` with a checkpoint at their seq, each with it. The event type is
    written into the statement: a partial index (``audit_records_key_introduced``, ``_key_destroyed``)
    serves a query only where the planner sees its condition, and SQLite plans before it sees a bound
    value."""
    if not _EVENT_TYPE.fullmatch(event_type):
        raise ValueError(f"not an audit event type: {event_type!r}")
    record = ", ".join(f"r.{c.strip()}" for c in columns(AuditRow).split(","))
    checkpoint = ", ".join(f"c.{c.strip()}" for c in columns(AuditCheckpoint).split(","))
    return (f"SELECT {record}, {checkpoint} FROM audit_checkpoints AS c"
            f" JOIN audit_records AS r ON r.seq = c.seq WHERE r.event_type = '{event_type}' ORDER BY r.seq")


class SqlAuditRepository:
    """Appends made outside a write transaction are committed in groups: while one caller's
    transaction writes, the appends that arrive meanwhile wait and go together, in arrival order, in
    the next one (one pass of the audit lock, one commit and its fsync for them all). Each append
    still returns only once its record is durable. One commit per record capped every service
    sharing a database at its commit rate whatever their cores (the local PostgreSQL: ~800 records/s
    from 8-32 threads, against 1,800-2,800 grouped; bench/RESULTS.md), and left SQLite's sleeping
    busy handler to stall one append in a thousand for 0.7-5 s. An append inside a caller's
    transaction joins it: the write and its record commit together."""

    MAX_GROUP = 256

    def __init__(self, db: Database) -> None:
        self._db = db
        self._cv = threading.Condition()
        self._waiting: list[_Pending] = []
        self._writing = False

    @property
    def writing(self) -> bool:
        """Whether a group of appends is being written (its transaction open) now."""
        with self._cv:
            return self._writing

    @property
    def waiting(self) -> int:
        """Appends queued behind the one being written."""
        with self._cv:
            return len(self._waiting)

    def append(self, build: AuditBuilder, check_tail: AuditTailCheck | None = None) -> AuditRow:
        if self._db.in_transaction():
            with self._db.transaction() as s:
                only = _Pending(build, check_tail)
                self._write(s, [only])
                return only.result()
        mine = _Pending(build, check_tail)
        with self._cv:
            self._waiting.append(mine)
            while True:
                while self._writing and not mine.done:
                    self._cv.wait()
                if mine.done:
                    return mine.result()
                # Nobody is writing: this caller writes what waits (its own record among them,
                # unless more than a group waited ahead of it: then it writes again).
                self._writing = True
                group, self._waiting = self._waiting[: self.MAX_GROUP], self._waiting[self.MAX_GROUP :]
                self._cv.release()
                try:
                    try:
                        with self._db.transaction() as s:
                            self._write(s, group)
                        metrics.AUDIT_GROUP.observe(len(group))
                    except BaseException as exc:  # noqa: BLE001 - every record of the group was lost with it
                        for p in group:
                            p.fail(exc, p is mine)
                finally:
                    self._cv.acquire()
                    self._writing = False
                    for p in group:
                        p.done = True
                    self._cv.notify_all()

    def _write(self, s: Session, group: list[_Pending]) -> None:
        self._db.lock(s, "audit_append")
        # The last record and the signed head in one round trip: it is made under the audit lock.
        tail = s.one(_TAIL)
        next_seq, prev_hash = (1, None) if tail[0] is None else (int(tail[0]) + 1, tail[1])
        stored = None if tail[2] is None else to_record(AuditHead, tail[2:])
        self._check_tail(group, stored, next_seq - 1, prev_hash)
        head = None
        for p in group:
            if p.error is not None:
                continue
            try:  # a builder's own failure is its caller's alone: the others' records go on
                built = p.build(next_seq, prev_hash)
                out = built if isinstance(built, AuditAppend) else AuditAppend(row=built)
                if out.row.seq != next_seq or out.row.prev_hash != prev_hash:
                    raise ValueError(
                        f"audit builder returned seq {out.row.seq} / prev_hash {out.row.prev_hash!r},"
                        f" expected {next_seq} / {prev_hash!r}"
                    )
            except Exception as exc:  # noqa: BLE001 - raised to the caller whose builder it was
                p.error = exc
                continue
            s.execute(insert_sql("audit_records", AuditRow), values(out.row))
            if out.checkpoint is not None:
                s.execute(insert_sql("audit_checkpoints", AuditCheckpoint), values(out.checkpoint))
            head = out.head or out.sign_head or head
            p.row = out.row
            next_seq, prev_hash = next_seq + 1, out.row.hash
        if head is not None:  # the group's last head: the earlier ones are superseded in this commit
            if callable(head):
                head = head()
            s.execute(
                "INSERT INTO audit_head (id, seq, hash, signature, key_id) VALUES (1, ?, ?, ?, ?)"
                " ON CONFLICT (id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash,"
                " signature = excluded.signature, key_id = excluded.key_id",
                values(head),
            )

    @staticmethod
    def _check_tail(group: list[_Pending], stored: AuditHead | None, last_seq: int, last_hash: str | None) -> None:
        """Each distinct check once per group (every log of a process shares it): the group is chained
        onto the tail read here, the records after it onto the group's own."""
        checks = {p.check_tail for p in group if p.check_tail is not None}
        for check in checks:
            try:
                check(stored, last_seq, last_hash)
            except Exception as exc:  # noqa: BLE001 - refused to the callers that asked for this check
                for p in group:
                    if p.check_tail == check:
                        p.error = exc

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

    def iter_checkpoints(self, after_seq: int = 0, batch: int = 1000) -> Iterator[AuditCheckpoint]:
        return self._walk(AuditCheckpoint, "audit_checkpoints", after_seq, batch)

    def checkpoint_before(self, ts: datetime) -> AuditCheckpoint | None:
        # The primary key read backwards to the first match: the checkpoints younger than ``ts``.
        with self._db.read() as s:
            r = s.one(f"SELECT {columns(AuditCheckpoint)} FROM audit_checkpoints WHERE ts <= ?"
                      " ORDER BY seq DESC LIMIT 1", (ts,))
        return to_record(AuditCheckpoint, r) if r else None

    def checkpointed(self, event_type: str) -> list[tuple[AuditRow, AuditCheckpoint]]:
        n = len(columns(AuditRow).split(","))
        with self._db.read() as s:
            rows = s.all(checkpointed_sql(event_type))
        return [(to_record(AuditRow, r[:n]), to_record(AuditCheckpoint, r[n:])) for r in rows]

    def hashes(self, seqs: Iterable[int]) -> dict[int, str]:
        wanted, out = sorted(set(seqs)), dict[int, str]()
        with self._db.read() as s:
            for i in range(0, len(wanted), 500):
                part = wanted[i : i + 500]
                rows = s.all(f"SELECT seq, hash FROM audit_records WHERE seq IN ({', '.join('?' * len(part))})",
                             tuple(part))
                out.update((int(seq), str(h)) for seq, h in rows)
        return out

    def iter_records(self, from_seq: int = 1, batch: int = 1000) -> Iterator[AuditRow]:
        return self._walk(AuditRow, "audit_records", from_seq - 1, batch)

    def _walk(self, cls: type[_R], table: str, after: int, batch: int) -> Iterator[_R]:
        """The table's rows after seq ``after`` in seq order, ``batch`` at a time (a read each)."""
        while True:
            with self._db.read() as s:
                rows = s.all(f"SELECT {columns(cls)} FROM {table} WHERE seq > ? ORDER BY seq LIMIT ?",  # type: ignore[arg-type]  # mypy: a class is not Hashable
                             (after, batch))
            yield from (to_record(cls, r) for r in rows)
            if len(rows) < batch:
                return
            after = int(rows[-1][0])


@dataclass(eq=False)
class _Pending:
    """One caller's append: its builder, then its written row or the error that stopped it."""

    build: AuditBuilder
    check_tail: AuditTailCheck | None = None
    row: AuditRow | None = None
    error: BaseException | None = None
    done: bool = False

    def fail(self, exc: BaseException, own: bool) -> None:
        if self.error is None:
            # Another caller's transaction failed: a StorageError of its own for this caller (one
            # exception object raised in several threads would have its traceback rewritten by each).
            self.error = exc if own or not isinstance(exc, StorageError) else StorageError(str(exc))
            self.row = None

    def result(self) -> AuditRow:
        if self.error is not None:
            raise self.error
        if self.row is None:
            raise StorageError("the audit record was not written")
        return self.row
