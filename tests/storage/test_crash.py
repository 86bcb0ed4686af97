"""A writer killed with SIGKILL mid-enrolment loses nothing it reported and leaves no half enrolment."""

from __future__ import annotations

import hashlib
import random
import signal
import subprocess
import time
from pathlib import Path

from services.common.storage import open_storage

CHILD = Path(__file__).with_name("crash_child.py")
TENANT = "crash-bank"
KILLS = 3


def blob(i: int) -> bytes:  # as crash_child.blob
    return hashlib.shake_256(f"crash-test-{i}".encode()).digest(64 * 1024 + i % 97)


def run_and_kill(python, dsn: str, first: int, rng: random.Random) -> list[str]:
    """Start the enroller at index `first`, SIGKILL it after a random number of commits."""
    proc = python(CHILD, dsn, TENANT, str(first), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wanted = rng.randint(5, 30)
    reported: list[str] = []
    deadline = time.monotonic() + 120
    try:
        while len(reported) < wanted:
            line = proc.stdout.readline()
            if not line:
                raise AssertionError(f"enroller exited early: {proc.stderr.read()[-2000:]}")
            reported.append(line.strip())
            assert time.monotonic() < deadline, "enroller too slow"
        time.sleep(rng.uniform(0, 0.02))  # land the kill at varying points of the next enrolment
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    # Ids printed after the ones read above count as reported too (a cut-off line does not).
    rest = proc.stdout.read()
    reported += [line for line in rest.split("\n")[:-1] if line]
    return reported


def test_sigkill_mid_enrolment_loses_nothing_reported(storage_dsn: str, python) -> None:
    rng = random.Random()
    reported: list[str] = []
    first = 0
    for round_ in range(1, KILLS + 1):
        reported += run_and_kill(python, storage_dsn, first, rng)
        st = open_storage(storage_dsn)
        try:
            templates = [r for b in st.templates.iter_gallery(TENANT, "face", "crash-model", batch=7) for r in b]
            with st.db.transaction() as s:
                consents = dict(
                    s.all("SELECT subject_id, evidence_ref FROM consents WHERE tenant_id = ?", (TENANT,))
                )
                if st.dialect == "sqlite":
                    assert s.one("PRAGMA integrity_check")[0] == "ok"
        finally:
            st.close()

        by_id = {r.id: r for r in templates}
        assert set(reported) <= set(by_id), "a reported enrolment is missing after the crash"
        # Only the enrolment in flight at each kill may have committed without being reported.
        assert 0 <= len(by_id) - len(reported) <= round_
        for rec in templates:
            i = rec.quality["i"]
            digest = hashlib.sha256(rec.envelope).hexdigest()
            assert rec.envelope == blob(i) and digest == rec.quality["sha256"], f"template {i} is damaged"
            assert consents.get(rec.subject_id) == f"sha256:{digest}", f"template {i} has no consent row"
        assert set(consents) == {r.subject_id for r in templates}, "a consent row without its template"
        first = max((r.quality["i"] for r in templates), default=-1) + 1
    assert len(reported) >= KILLS * 5
