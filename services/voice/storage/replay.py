"""Sealed voice-capture fingerprints of the replay cache (services/voice/replay.py), per tenant and
pseudonymised subject, kept for a retention window and capped per subject."""

from __future__ import annotations

from collections import Counter
from typing import NamedTuple

from services.common.crypto.rotation import sealed_key_id as _key_id
from services.common.storage.db import Database
from services.common.storage.retention import Expiry


class SealedRow(NamedTuple):
    id: int
    envelope: bytes  # the sealed fingerprint


class SqlReplayRepository:
    def __init__(self, db: Database) -> None:
        self._db = db

    def recent(self, tenant_id: str, subject_key: str, since: float) -> list[bytes]:
        with self._db.read() as s:
            rows = s.all(
                "SELECT record FROM voice_replay WHERE tenant_id = ? AND subject_key = ? AND accepted_at >= ?"
                " ORDER BY accepted_at, id",
                (tenant_id, subject_key, since),
            )
        return [bytes(r[0]) for r in rows]

    def add(self, tenant_id: str, subject_key: str, record: bytes, at: float, keep: int, expired_before: float) -> None:
        """Insert, keep the subject's newest ``keep`` records and drop everyone's expired ones."""
        with self._db.transaction() as s:
            s.execute(
                "INSERT INTO voice_replay (tenant_id, subject_key, accepted_at, record) VALUES (?, ?, ?, ?)",
                (tenant_id, subject_key, at, record),
            )
            s.execute(
                "DELETE FROM voice_replay WHERE tenant_id = ? AND subject_key = ? AND id NOT IN ("
                " SELECT id FROM voice_replay WHERE tenant_id = ? AND subject_key = ?"
                " ORDER BY accepted_at DESC, id DESC LIMIT ?)",
                (tenant_id, subject_key, tenant_id, subject_key, keep),
            )
            s.execute("DELETE FROM voice_replay WHERE accepted_at < ?", (expired_before,))

    def count_by_key(self, since: float) -> Counter[str]:
        """How many records accepted since ``since`` are sealed under each key id (from each envelope's
        header; one that has none counts under "")."""
        counts: Counter[str] = Counter()
        with self._db.read() as s:
            for (record,) in s.all("SELECT record FROM voice_replay WHERE accepted_at >= ?", (since,)):
                counts[_key_id(bytes(record))] += 1
        return counts

    def iter_for_rewrap(self, exclude_key_id: str, batch: int, after_id: int | None) -> list[SealedRow]:
        """The next rows in id order after ``after_id`` whose envelope is not under
        ``exclude_key_id`` (the key id is in each envelope's header, not in a column)."""
        after = after_id or 0
        while True:
            with self._db.read() as s:
                rows = [SealedRow(int(i), bytes(r)) for i, r in s.all(
                    "SELECT id, record FROM voice_replay WHERE id > ? ORDER BY id LIMIT ?", (after, batch))]
            todo = [row for row in rows if _key_id(row.envelope) != exclude_key_id]
            if todo or len(rows) < batch:
                return todo
            after = rows[-1].id

    def replace_record(self, row: SealedRow, record: bytes) -> bool:
        """Compare-and-swap: the record of ``row`` replaced if it is still the one read."""
        with self._db.transaction() as s:
            return s.count("UPDATE voice_replay SET record = ? WHERE id = ? AND record = ?",
                           (record, row.id, row.envelope)) == 1

    def expiries(self, retention_s: float, now: float) -> list[Expiry]:
        """Fingerprints past voice.replay_retention_s: add() drops them only when a capture is accepted."""
        return [Expiry("replay_fingerprints", "voice_replay", "accepted_at < ?", (now - retention_s,),
                       order="accepted_at")]

    def erase(self, tenant_id: str, subject_key: str) -> int:
        with self._db.transaction() as s:
            return s.count(
                "DELETE FROM voice_replay WHERE tenant_id = ? AND subject_key = ?", (tenant_id, subject_key)
            )
