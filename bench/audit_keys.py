"""The key-trust lookup on a year's trail: what a service does, under the audit lock, the first time
it meets a head signed by a key the trail introduces (``AuditLog._check_tail`` ->
``continuity.trail_keys`` -> ``AuditRepository.checkpointed``).

    .venv/bin/python -m bench.audit_keys [--records 1000000] [--backends sqlite postgres] [--rounds 3]

The trail: ``--records`` Verify-like records chained with the real hash (``chain.record_hash``) and a
checkpoint every 100 (the default ``audit.checkpoint_every``) signed with the real Ed25519 key, written
in bulk (executemany) into SQLite in a temporary directory under var/ or the local PostgreSQL in a
schema of its own (dropped afterwards); then ``biogate audit new-key``'s record (the real
``AuditLog`` appending ``introduction_details``, checkpoint included) and one record signed by the
new key before each round, so the head is the new key's. Timed, ``--rounds`` times: ``trail_keys`` alone, and the first
append of a fresh ``AuditLog`` that knows only the old key (the lookup runs inside it, under the
lock) against its second append. The lookup's query plan is printed.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psycopg

from services.common.audit import AuditLog, AuditSigner
from services.common.audit.chain import checkpoint_message, head_message, record_hash
from services.common.audit.continuity import INTRODUCED, introduction_details, trail_keys
from services.common.config import StorageConfig
from services.common.privacy import Pseudonymizer
from services.common.storage import open_storage
from services.common.storage.audit import checkpointed_sql
from services.common.storage.interfaces import AuditCheckpoint, AuditHead, AuditRow
from services.common.storage.rows import insert_sql, values

PG = os.environ.get("BIOGATE_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/test")
EVERY = 100


def populate(storage, signer, n: int, every: int = EVERY) -> None:
    db = storage.audit._db
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    prev = None
    rows: list[AuditRow] = []
    cps: list[AuditCheckpoint] = []
    with db.transaction() as s:
        def flush() -> None:
            for table, cls, items in (("audit_records", AuditRow, rows), ("audit_checkpoints", AuditCheckpoint, cps)):
                if items:
                    s._conn.cursor().executemany(s.dialect.sql(insert_sql(table, cls)),
                                        [[s.dialect.value(v) for v in values(x)] for x in items])
                    items.clear()

        for seq in range(1, n + 1):
            ts = t0 + timedelta(seconds=seq * 30)
            details = '{"decision":"accept"}'
            pseudonym = f"{seq % 50000:064x}"
            h = record_hash(seq, ts, "face.verified", "service:face", "bank-a", pseudonym, details, prev)
            rows.append(AuditRow(seq, ts, "face.verified", "service:face", "bank-a", pseudonym, details, prev, h))
            if seq % every == 0:
                cps.append(AuditCheckpoint(seq, h, signer.sign(checkpoint_message(seq, h, ts)), signer.key_id, ts))
            prev = h
            if len(rows) == 20000:
                flush()
        flush()
        assert prev is not None
        s.execute("INSERT INTO audit_head (id, seq, hash, signature, key_id) VALUES (1, ?, ?, ?, ?)",
                  values(AuditHead(n, prev, signer.sign(head_message(n, prev)), signer.key_id)))


def plan(storage) -> list[str]:
    db = storage.audit._db
    sql = checkpointed_sql(INTRODUCED)
    with db.read() as s:
        if s.dialect.sql("?") == "?":
            return [str(r[-1]) for r in s.all("EXPLAIN QUERY PLAN " + sql)]
        return [str(r[0]) for r in s.all("EXPLAIN ANALYZE " + sql)]


def one(backend: str, n: int, rounds: int, tmp: Path) -> None:
    schema = None
    if backend == "sqlite":
        storage = open_storage(f"sqlite:///{tmp}/bench.db", StorageConfig(sqlite_synchronous="NORMAL"))
    else:
        schema = f"bench_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(PG, autocommit=True) as c:
            c.execute(f"CREATE SCHEMA {schema}")
        storage = open_storage(f"{PG}?options=-csearch_path%3D{schema}")
    try:
        old = AuditSigner.load_or_create(tmp / f"{backend}-old.pem")
        new = AuditSigner.load_or_create(tmp / f"{backend}-new.pem")
        pseudo = Pseudonymizer(b"p" * 32)
        t = time.perf_counter()
        populate(storage, old, n)
        AuditLog(storage.audit, old, pseudo).append(INTRODUCED, "cli:bench", None,
                                                   details=introduction_details(new, old), checkpoint=True)
        switched = AuditLog(storage.audit, new, pseudo, previous_keys=[old.public_key])
        if schema:
            with psycopg.connect(f"{PG}?options=-csearch_path%3D{schema}", autocommit=True) as c:
                c.execute("ANALYZE")  # as autovacuum would have by then
        print(f"{backend}: {n:,} records, {n // EVERY:,} checkpoints made in {time.perf_counter() - t:.0f} s")
        print("  plan: " + " | ".join(plan(storage)))
        lookups: list[float] = []
        firsts: list[float] = []
        seconds: list[float] = []
        for _ in range(rounds):
            switched.append("face.verified", "svc", "bank-a")  # the head is the new key's again
            t = time.perf_counter()
            found = trail_keys(storage.audit, [old.public_key])
            lookups.append(time.perf_counter() - t)
            assert new.key_id in found.keys and not found.problems
            log = AuditLog(storage.audit, old, pseudo)  # a service not restarted since the switch
            for out in (firsts, seconds):
                t = time.perf_counter()
                log.append("face.verified", "svc", "bank-a")
                out.append(time.perf_counter() - t)
        ms = lambda xs: f"{min(xs) * 1000:.1f}-{max(xs) * 1000:.1f} ms"  # noqa: E731
        print(f"  trail_keys {ms(lookups)}; first append (the lookup under the lock) {ms(firsts)}, "
              f"second append {ms(seconds)}")
    finally:
        storage.close()
        if schema:
            with psycopg.connect(PG, autocommit=True) as c:
                c.execute(f"DROP SCHEMA {schema} CASCADE")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--backends", nargs="+", default=["sqlite", "postgres"])
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=Path.cwd() / "var") as tmp:
        for backend in a.backends:
            one(backend, a.records, a.rounds, Path(tmp))


if __name__ == "__main__":
    main()
