"""What the anchor checks cost on a multi-year trail: a checkpoint every few minutes per replica, all
of them anchored (hundreds of thousands), time and peak RSS of what ``biogate audit anchor`` (the
CronJob's ``anchor()``) and ``biogate audit verify --anchors`` (``anchored()`` and the check that a
checkpoint older than ``audit.anchor_max_age_s`` is anchored, ``_unanchored``) do beside the walk
of the trail.

    .venv/bin/python -m bench.anchors_scale [--checkpoints 200000] [--backends sqlite postgres] [--rounds 3]
        [--arms open verify anchor walk export] [--baseline DIR]

The trail: ``--checkpoints`` records, each with a checkpoint, chained with the real hash and signed
with the real Ed25519 key, written in bulk (``bench.audit_keys.populate``) into SQLite in a temporary
directory under var/ or the local PostgreSQL in a schema of its own (dropped afterwards); anchored
by the real ``anchor()`` into a ``DirectoryStore`` (created without fsync, to make it in minutes).
Each run is a process of its own (``--child``), after one new record to anchor: the time of the
work once the storage is open, and the process's peak RSS (``VmHWM``), beside that of a process
that only opens the storage. ``walk``: ``verify()``, the walk of the whole trail that ``biogate audit
verify`` does; ``export``: ``biogate audit export-checkpoints`` (its output discarded).
``--baseline DIR``: also run each arm with the code of another checkout (``git archive REV | tar -x
-C DIR``), alternating with this one's, to compare a change on the same machine at the same time.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import psycopg

from bench.audit_keys import PG, populate
from services.common.audit import AuditLog, AuditSigner
from services.common.audit.anchor import DirectoryStore, anchor, anchored
from services.common.privacy import Pseudonymizer
from services.common.config import StorageConfig
from services.common.storage import open_storage
from services.common.audit import verify as verify_trail
from services.commands import audit as audit_cli
from services.commands.audit import _unanchored
from services.settings import Settings


class _Unsynced(DirectoryStore):
    """Makes the store of the anchors the bench starts from without an fsync per object."""

    def put(self, name: str, data: bytes) -> None:
        with open(self.path / name, "xb") as f:
            f.write(data)


def child(arm: str, dsn: str, path: str, key: str) -> None:
    """One run in a fresh process: what the command does once its storage is open."""
    storage = open_storage(dsn)
    public_key = AuditSigner.load_or_create(Path(key)).public_key
    store = DirectoryStore(path)
    t = time.perf_counter()
    if arm == "verify":
        found = anchored(store, public_key, storage.audit)
        problems = found.problems + _unanchored(Settings(), Path(path), storage, found)
    elif arm == "walk":
        problems = verify_trail(storage.audit, public_key).problems
    elif arm == "export":
        audit_cli._storage = lambda settings: storage  # the bench's storage, not the settings'
        with open(os.devnull, "w") as out, contextlib.redirect_stdout(out):
            problems = [] if audit_cli.cmd_export_checkpoints(Settings(), argparse.Namespace()) == 0 else ["failed"]
        storage = open_storage(dsn)  # the command closed its own
    elif arm == "anchor":
        problems = anchor(storage.audit, store, public_key).problems
    else:  # "open": the process alone, the baseline of the peak RSS
        problems = []
    secs = time.perf_counter() - t
    storage.close()
    # VmHWM: this process image's own peak (ru_maxrss also counts the parent's pages before the exec).
    hwm = next(ln.split()[1] for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith("VmHWM:"))
    print(secs, len(problems), hwm)


def in_child(arm: str, dsn: str, path: Path, key: Path, code: Path) -> tuple[float, int]:
    """(seconds, peak RSS in MB of the whole process) of one run of ``arm`` with the code under ``code``."""
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child", arm, dsn, str(path), str(key)],
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(code)})
    out = proc.stdout.read() if proc.stdout else ""
    status = proc.wait()
    secs, problems, hwm_kb = out.split()
    assert status == 0 and problems == "0", (status, out)
    return float(secs), int(hwm_kb) // 1024


ARMS = {"open": "process alone (open storage)", "verify": "verify --anchors (anchored + _unanchored)",
        "anchor": "anchor (the CronJob)", "walk": "verify() (the walk of the trail)",
        "export": "export-checkpoints"}


def run(backend: str, n: int, rounds: int, tmp: Path, arms: list[str], baseline: Path | None) -> None:
    schema = f"bench_anchors_{uuid.uuid4().hex[:8]}"
    dsn = (f"sqlite:///{tmp}/bench.db" if backend == "sqlite"
           else f"{PG}?options=-csearch_path%3D{schema}")
    if backend == "postgres":
        with psycopg.connect(PG, autocommit=True) as c:
            c.execute(f"CREATE SCHEMA {schema}")
    storage = open_storage(dsn, StorageConfig(sqlite_synchronous="NORMAL"))
    try:
        signer = AuditSigner.load_or_create(tmp / f"audit-{backend}.pem")
        t = time.perf_counter()
        populate(storage, signer, n, every=1)
        made = time.perf_counter() - t
        path = tmp / f"worm-{backend}"
        path.mkdir()
        written = len(anchor(storage.audit, _Unsynced(path), signer.public_key).written) if (
            {"verify", "anchor"} & set(arms)) else 0
        store = DirectoryStore(path)
        print(f"{backend}: {n} records and checkpoints in {made:.0f} s, {written} anchors in "
              f"{time.perf_counter() - t - made:.0f} s")
        log = AuditLog(storage.audit, signer, Pseudonymizer(b"p" * 32), checkpoint_every=1)

        key = tmp / f"audit-{backend}.pem"
        codes = {"": Path.cwd()} | ({" (baseline)": baseline} if baseline else {})
        for arm in arms:
            runs: dict[str, list[tuple[float, int]]] = {label: [] for label in codes}
            for _ in range(rounds):
                log.append("face.verified", "service:bench", "bank-a", "s1", {"decision": "accept"})
                for label, code in codes.items():
                    runs[label].append(in_child(arm, dsn, path, key, code))
            for label, done in runs.items():
                secs, rss = [s for s, _ in done], [m for _, m in done]
                print(f"{backend} {ARMS[arm]}{label}: {min(secs):.2f}-{max(secs):.2f} s, peak RSS {min(rss)}-{max(rss)} "
                      f"MB over {rounds} runs ({len(store.names())} objects)")
    finally:
        storage.close()
        if backend == "postgres":
            with psycopg.connect(PG, autocommit=True) as c:
                c.execute(f"DROP SCHEMA {schema} CASCADE")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", nargs=4, metavar=("ARM", "DSN", "STORE", "KEY"), help=argparse.SUPPRESS)
    ap.add_argument("--checkpoints", type=int, default=200000)
    ap.add_argument("--backends", nargs="+", default=["sqlite", "postgres"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--arms", nargs="+", choices=list(ARMS), default=["open", "verify", "anchor"])
    ap.add_argument("--baseline", type=Path, help="another checkout's code to run each arm with too, alternating")
    a = ap.parse_args()
    if a.child:
        child(*a.child)
        return
    settings = Settings()
    print(f"now {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, audit.anchor_max_age_s {settings.audit.anchor_max_age_s}")
    for backend in a.backends:
        with tempfile.TemporaryDirectory(dir=Path.cwd() / "var") as tmp:
            run(backend, a.checkpoints, a.rounds, Path(tmp), a.arms, a.baseline.resolve() if a.baseline else None)


if __name__ == "__main__":
    main()
