"""`biogate purge` over a backlog of expired MFA sessions: its wall time and its longest batch, against
the one-statement purge it replaced (one DELETE of every expired row in one transaction).

    .venv/bin/python -m bench.retention [--sessions 200000] [--batch 1000] [--dsn DSN]

The sessions are written straight into ``auth_sessions`` (a JSON state of the size a decided
session has, ~600 bytes) on SQLite in a temporary directory unless ``--dsn`` names another
database, one in ten under a review (half pending, which the purge keeps), plus 1,000 live ones.
The batched run goes through ``services.commands.retention.run`` (lock, every kind, its audit
record); a batch's time is the interval between the commits of two batches (its SELECT, DELETE and
COMMIT). The same database is then refilled and the old single statement timed. The CPU time is
this process's (on SQLite the database's work, in process; on PostgreSQL only the client's): on a
shared machine it varies less than the wall time.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path

from services.commands import retention
from services.common.crypto.backend import open_audit_signer
from services.common.storage import open_storage
from services.common.storage.db import to_json, utcnow
from services.mfa.storage import attach
from services.settings import load_config

STATE = {"nonce": "n" * 32, "action": "payment", "factors": [{"kind": "face", "result": "passed", "score": 0.71}] * 3,
         "decision": {"outcome": "allow", "reasons": ["FACE_MATCH", "DEVICE_BOUND"], "token": "t" * 300},
         "payee_hash": "p" * 64, "device_id": "d" * 32}


def fill(storage, n: int, now) -> None:
    expired, live = now - timedelta(days=400), now + timedelta(minutes=10)
    rows: list[tuple] = []
    reviews: list[tuple] = []
    for i in range(n + 1000):
        sid = uuid.uuid4().hex
        rows.append((sid, "bank-a", f"c{i}", to_json(STATE), expired, expired if i < n else live, 3))
        if i < n and i % 10 == 0:
            pending = i % 20 == 0
            reviews.append(("rev_" + sid, "bank-a", f"c{i}", sid, "payment", "[]",
                            "pending" if pending else "approved", expired, None if pending else expired, "", ""))
    with storage.db.transaction() as s:
        for chunk in range(0, len(rows), 5000):
            for r in rows[chunk:chunk + 5000]:
                s.execute("INSERT INTO auth_sessions (id, tenant_id, subject_id, state, created_at, expires_at, version)"
                          " VALUES (?, ?, ?, ?, ?, ?, ?)", r)
        for r in reviews:
            s.execute("INSERT INTO mfa_reviews (id, tenant_id, subject_id, session_id, action, reasons, status,"
                      " created_at, resolved_at, resolved_by, note) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", r)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=200_000)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--dsn", default="")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        dsn = a.dsn or f"sqlite:///{Path(tmp) / 'bench.db'}"
        settings = load_config(None, data_dir=tmp, storage={"dsn": dsn})
        open_audit_signer(settings)
        storage = open_storage(dsn, settings.storage)
        attach(storage)
        now = utcnow()
        fill(storage, a.sessions, now)
        marks = [time.perf_counter()]
        cpu = time.process_time()
        deleted = retention.run(settings, storage, "bench", now, a.batch,
                                on_batch=lambda kind, n: marks.append(time.perf_counter()))
        cpu = time.process_time() - cpu
        total = marks[-1] - marks[0]
        longest = max(b - c for b, c in zip(marks[1:], marks[:-1], strict=True))
        print(f"batched: {deleted['auth_sessions']} sessions deleted in {total:.2f} s ({cpu:.2f} s of this"
              f" process's CPU), {len(marks) - 1} batches of <= {a.batch}, longest batch {longest * 1000:.1f} ms")

        with storage.db.transaction() as s:  # back to the same backlog
            s.execute("DELETE FROM mfa_reviews")
            s.execute("DELETE FROM auth_sessions")
        fill(storage, a.sessions, now)
        t0, cpu = time.perf_counter(), time.process_time()
        with storage.db.transaction() as s:
            n = s.count("DELETE FROM auth_sessions WHERE expires_at <= ?", (now - timedelta(days=30),))
        print(f"one statement: {n} sessions deleted in one transaction of {time.perf_counter() - t0:.2f} s"
              f" ({time.process_time() - cpu:.2f} s CPU; the pending reviews' sessions with them)")
        storage.close()


if __name__ == "__main__":
    main()
