"""Fixed-window counters, one row per key, incremented atomically by a single upsert."""

from __future__ import annotations

from datetime import datetime

from .db import Database, utcnow


class SqlRateLimitRepository:
    def __init__(self, db: Database) -> None:
        self._db = db

    def hit(
        self, key: str, window_s: int, limit: int, now: datetime | None = None
    ) -> tuple[bool, int]:
        if window_s <= 0:
            raise ValueError("window_s must be positive")
        epoch = int((now or utcnow()).timestamp())
        start = epoch - epoch % window_s
        with self._db.transaction() as s:
            count = s.one(
                "INSERT INTO rate_limits (key, window_start, window_end, count) VALUES (?, ?, ?, 1)"
                " ON CONFLICT (key) DO UPDATE SET"
                # a new window restarts the count; a hit stamped with an older window (a replica's
                # clock lagging) counts in the current one rather than moving the window back
                " count = CASE WHEN excluded.window_start > rate_limits.window_start"
                " THEN 1 ELSE rate_limits.count + 1 END,"
                " window_start = CASE WHEN excluded.window_start > rate_limits.window_start"
                " THEN excluded.window_start ELSE rate_limits.window_start END,"
                " window_end = CASE WHEN excluded.window_start > rate_limits.window_start"
                " THEN excluded.window_end ELSE rate_limits.window_end END"
                " RETURNING count",
                (key, start, start + window_s),
            )[0]
        return count <= limit, count

    def count(self, key: str, window_s: int, now: datetime | None = None) -> int:
        """Events counted in key's current fixed window (a read: no write lock taken)."""
        epoch = int((now or utcnow()).timestamp())
        with self._db.transaction(write=False) as s:
            row = s.one("SELECT count FROM rate_limits WHERE key = ? AND window_start >= ?",
                        (key, epoch - epoch % window_s))
        return int(row[0]) if row else 0

    def reset(self, key: str) -> bool:
        with self._db.transaction() as s:
            return s.count("DELETE FROM rate_limits WHERE key = ?", (key,)) == 1
