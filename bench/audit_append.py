"""Audit appends from many threads: one transaction per record against the grouped commit.

    .venv/bin/python -m bench.audit_append [--threads 1 8 32] [--seconds 5] [--backends sqlite postgres]

The real ``AuditLog`` (Ed25519 head signatures, keyed subject pseudonyms, checkpoints every 100) over
the real storage: SQLite in WAL with ``synchronous = FULL`` (the default) in a temporary directory
on this disk, and the local PostgreSQL in a schema of its own. Each thread appends Verify-like
records as fast as it can for ``--seconds``. Two arms, alternated:

* ``one by one``: every append inside a transaction of its own (an append inside a caller's
  transaction joins it, so this is how every append was written before the grouped commit);
* ``grouped``: plain ``AuditLog.append`` (appends that arrive while one commits go together).

Printed per arm and thread count: records/s, p50/p99/p99.9 and mean of an append's wall time,
signatures per record (heads and checkpoints; a group signs only its last head), and
the chain checked afterwards (``biogate audit verify``'s own check, checkpoints included).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bench.harness import pct
from services.common.audit.log import AuditLog
from services.common.audit.verify import verify
from services.common.crypto.signing import KeySigner
from services.common.privacy import Pseudonymizer
from services.common.storage import open_storage

PG = os.environ.get("BIOGATE_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/test")


class Counting(KeySigner):
    """Counts signatures: with a network HSM each is a round trip made while the other appends wait."""

    def __init__(self) -> None:
        super().__init__(Ed25519PrivateKey.generate())
        self.count = 0

    def sign(self, message: bytes) -> bytes:
        self.count += 1
        return super().sign(message)


def run(log: AuditLog, db, threads: int, seconds: float, one_by_one: bool) -> tuple[int, list[float]]:
    lat: list[float] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds
    start = threading.Barrier(threads)

    def worker(k: int) -> None:
        mine: list[float] = []
        start.wait()
        while time.monotonic() < stop:
            t = time.perf_counter()
            if one_by_one:
                with db.transaction():
                    log.append("face.verified", "bench", "bank-a", f"s{k}", {"score": 0.61, "match": True})
            else:
                log.append("face.verified", "bench", "bank-a", f"s{k}", {"score": 0.61, "match": True})
            mine.append(time.perf_counter() - t)
        with lock:
            lat.extend(mine)

    ts = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return len(lat), lat


def backend(name: str, tmp: Path):
    if name == "sqlite":
        return open_storage(f"sqlite:///{tmp / 'audit.db'}"), None
    import psycopg

    schema = f"bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG, autocommit=True) as c:
        c.execute(f"CREATE SCHEMA {schema}")
    return open_storage(f"{PG}?options=-csearch_path%3D{schema}"), schema


def drop(schema: str | None) -> None:
    if schema:
        import psycopg

        with psycopg.connect(PG, autocommit=True) as c:
            c.execute(f"DROP SCHEMA {schema} CASCADE")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--backends", nargs="+", default=["sqlite", "postgres"])
    ap.add_argument("--rounds", type=int, default=2, help="alternations of the two arms")
    args = ap.parse_args()
    signer = Counting()
    print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}", flush=True)
    for name in args.backends:
        with tempfile.TemporaryDirectory(prefix="audit-bench-") as tmp:
            storage, schema = backend(name, Path(tmp))
            try:
                log = AuditLog(storage.audit, signer, Pseudonymizer(os.urandom(32)), 100)
                for threads in args.threads:
                    for r in range(args.rounds):
                        for one_by_one in (True, False) if r % 2 == 0 else (False, True):
                            signed = signer.count
                            n, lat = run(log, storage.db, threads, args.seconds, one_by_one)
                            print(f"{name} threads {threads:3d} {'one by one' if one_by_one else 'grouped   '}: "
                                  f"{n / args.seconds:8.1f} records/s, p50 {pct(lat, 50):7.2f} ms, "
                                  f"p99 {pct(lat, 99):7.2f} ms, p99.9 {pct(lat, 99.9):7.2f} ms, "
                                  f"mean {statistics.fmean(lat) * 1000:7.2f} ms, signatures per record "
                                  f"{(signer.count - signed) / max(1, n):.2f}",
                                  flush=True)
                report = verify(storage.audit, signer.public_key, checkpoint_every=100)
                print(f"{name}: chain of {storage.audit.last().seq} records verified: {report.ok} "
                      f"{'' if report.ok else report.render()}", flush=True)
            finally:
                storage.close()
                drop(schema)
    print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
