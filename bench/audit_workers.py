"""Audit appends from worker processes, as a multi-worker service makes them: CPU per append, and
what SQLite settings change it.

    .venv/bin/python -m bench.audit_workers [--processes 1 2] [--rate 100] [--seconds 10]
        [--variants "" "mmap_size=268435456" "wal_autocheckpoint=0"] [--rounds 2]

Appends: the real ``AuditLog`` (Ed25519 heads, keyed pseudonyms, checkpoints every 100) over the real
SQLite storage (WAL, ``synchronous = FULL``) in a temporary directory, from ``--processes`` spawned
processes of 4 threads each, paced so that all together append ``--rate`` records/s (a face service's
Verify rate; its appends are far apart, so each commits alone). A variant is a list of PRAGMAs run on
every connection after the storage's own, separated by ";". Printed: process CPU per append (user +
system, so the fsync's kernel time too), alternated rounds; the chain is verified after each run.

Reads after another connection's commit: the same template-shaped read (BEGIN; one row by key;
COMMIT) with and without a commit by a second connection before each, and with ``mmap_size``: a
connection's page cache is dropped when the database changed under it.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sqlite3
import tempfile
import threading
import time
from pathlib import Path


def appender(path: Path, pragmas: str, rate: float, seconds: float, threads: int, out) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from services.common.audit.log import AuditLog
    from services.common.crypto.signing import KeySigner
    from services.common.privacy import Pseudonymizer
    from services.common.storage import db as dbm
    from services.common.storage import open_storage

    connect = dbm.SqliteDatabase._connect

    def with_pragmas(self):
        conn = connect(self)
        for p in filter(None, pragmas.split(";")):
            conn.execute(f"PRAGMA {p}")
        return conn

    dbm.SqliteDatabase._connect = with_pragmas  # type: ignore[method-assign]
    storage = open_storage(f"sqlite:///{path}")
    log = AuditLog(storage.audit, KeySigner(Ed25519PrivateKey.from_private_bytes(b"k" * 32)),
                   Pseudonymizer(b"p" * 32), 100)
    details = {"model_id": "mobilefacenet-arcface-192d", "threshold": 0.4284, "score": 0.6123, "llr": 3.21,
               "match": True, "live": False}
    stop = time.monotonic() + seconds
    done = [0] * threads

    def work(k: int) -> None:
        due = time.monotonic()
        while time.monotonic() < stop:
            due += threads / rate
            time.sleep(max(0.0, due - time.monotonic()))
            log.append("face.verified", "bench", "bank-a", f"s{k}", details)
            done[k] += 1

    cpu = time.process_time()
    workers = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    out.put((time.process_time() - cpu, sum(done)))
    storage.close()


def appends(processes: int, pragmas: str, rate: float, seconds: float) -> tuple[float, int, bool]:
    from services.common.audit.verify import verify
    from services.common.crypto.signing import KeySigner
    from services.common.storage import open_storage
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="audit-workers-") as tmp:
        path = Path(tmp) / "audit.db"
        open_storage(f"sqlite:///{path}").close()  # the schema, before the processes race for it
        out = ctx.Queue()
        procs = [ctx.Process(target=appender, args=(path, pragmas, rate / processes, seconds, 4, out))
                 for _ in range(processes)]
        for p in procs:
            p.start()
        results = [out.get() for _ in procs]
        for p in procs:
            p.join()
        storage = open_storage(f"sqlite:///{path}")
        key = KeySigner(Ed25519PrivateKey.from_private_bytes(b"k" * 32)).public_key
        ok = verify(storage.audit, key, checkpoint_every=100).ok
        storage.close()
    return sum(r[0] for r in results), sum(r[1] for r in results), ok


def reads(n: int = 2000) -> None:
    with tempfile.TemporaryDirectory(prefix="audit-reads-") as tmp:
        path = os.path.join(tmp, "t.db")

        def connect(*pragmas: str) -> sqlite3.Connection:
            c = sqlite3.connect(path, isolation_level=None)
            for p in ("journal_mode = WAL", "synchronous = FULL", *pragmas):
                c.execute(f"PRAGMA {p}")
            return c

        w = connect()
        w.execute("CREATE TABLE t (tenant TEXT, subject TEXT, envelope BLOB, PRIMARY KEY (tenant, subject))")
        w.execute("CREATE TABLE a (seq INTEGER PRIMARY KEY, body TEXT)")
        w.execute("BEGIN")
        w.executemany("INSERT INTO t VALUES (?, ?, ?)", (("bench", f"s{i}", os.urandom(900)) for i in range(n)))
        w.executemany("INSERT INTO a (body) VALUES (?)", (("x" * 400,) for _ in range(20000)))
        w.execute("COMMIT")
        for pragmas in ((), ("mmap_size = 268435456",)) * 2:
            r = connect(*pragmas)
            for writes in (False, True):
                spent = 0.0
                for i in range(n):
                    if writes:
                        w.execute("BEGIN IMMEDIATE")
                        w.execute("INSERT INTO a (body) VALUES (?)", ("x" * 400,))
                        w.execute("COMMIT")
                    t = time.thread_time()
                    r.execute("BEGIN")
                    r.execute("SELECT * FROM t WHERE tenant = ? AND subject = ?", ("bench", f"s{i}")).fetchall()
                    r.execute("COMMIT")
                    spent += time.thread_time() - t
                print(f"read {'after another connection commits' if writes else 'alone':36s} "
                      f"{', '.join(pragmas) or 'default':24s} {spent / n * 1e6:6.1f} us CPU", flush=True)
            r.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rate", type=float, default=100.0)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--variants", nargs="+", default=["", "mmap_size=268435456", "wal_autocheckpoint=0"])
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    print(f"load average {os.getloadavg()[0]:.1f}", flush=True)
    for r in range(args.rounds):
        for processes in args.processes if r % 2 == 0 else args.processes[::-1]:
            for pragmas in args.variants:
                cpu, n, ok = appends(processes, pragmas, args.rate, args.seconds)
                print(f"round {r + 1}, {processes} process(es), {pragmas or 'default':40s}: {n} appends, "
                      f"{cpu / n * 1000:.3f} ms CPU each, chain verifies: {ok}, load {os.getloadavg()[0]:.1f}",
                      flush=True)
    reads()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
