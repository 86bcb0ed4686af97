"""The audit anchors' cost on a year of them: ``anchored()`` (what ``biogate audit verify --anchors``
reads) and ``anchor()`` (``biogate audit anchor``, the CronJob's run every 15 minutes: ~35,000 anchor
objects a year).

    .venv/bin/python -m bench.anchors [--anchors 35000] [--rounds 3]

The trail is made by the real ``AuditLog`` (Ed25519 signatures, pseudonymised subjects) on SQLite in a
temporary directory under var/, with a checkpoint on every record, and anchored by the real
``anchor()`` into a real ``DirectoryStore``: ``--anchors`` checkpoint anchors and one head. (A
year of the CronJob is mostly head anchors and one checkpoint per 100 records; here every anchor
has a checkpoint in the database, the most ``anchor()`` compares.) Then, ``--rounds`` times each:
``anchored()`` as the CLI calls it (the signatures of anchors the trail agrees with sampled),
``anchored(full=True)`` (every signature: ``--full-anchor-check``, and what every run did before), and
``anchor()`` with one new record to anchor.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from services.common.audit import AuditLog, AuditSigner
from services.common.audit.anchor import DirectoryStore, anchor, anchored
from services.common.privacy import Pseudonymizer
from services.common.config import StorageConfig
from services.common.storage import open_storage


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--anchors", type=int, default=35000)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=Path.cwd() / "var") as tmp:
        storage = open_storage(f"sqlite:///{tmp}/bench.db", StorageConfig(sqlite_synchronous="NORMAL"))
        signer = AuditSigner.load_or_create(Path(tmp) / "audit-ed25519.pem")
        log = AuditLog(storage.audit, signer, Pseudonymizer(b"p" * 32), checkpoint_every=1)
        t = time.perf_counter()
        for i in range(a.anchors):
            log.append("face.verified", "service:bench", "bank-a", f"s{i % 5000}", {"decision": "accept"})
        store = DirectoryStore(Path(tmp) / "worm")
        first = anchor(storage.audit, store, signer.public_key)
        print(f"made {a.anchors} records and {len(first.written)} anchors in {time.perf_counter() - t:.0f} s")
        arms: dict[str, Callable[[], Any]] = {
            "anchored (verify --anchors)": lambda: anchored(store, signer.public_key, storage.audit),
            "anchored full": lambda: anchored(store, signer.public_key, storage.audit, full=True),
            "anchor (the CronJob)": lambda: anchor(storage.audit, store, signer.public_key),
        }
        for name, fn in arms.items():
            secs = []
            for _ in range(a.rounds):
                log.append("face.verified", "service:bench", "bank-a", "s1", {"decision": "accept"})
                t = time.perf_counter()
                out = fn()
                secs.append(time.perf_counter() - t)
                assert not out.problems, out.problems[:3]
            print(f"{name}: {min(secs):.2f}-{max(secs):.2f} s over {a.rounds} runs ({len(store.names())} objects)")
        storage.close()


if __name__ == "__main__":
    main()
