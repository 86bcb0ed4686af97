"""Races between threads and processes: single use, atomic counters, compare-and-swap, migrations."""

from __future__ import annotations

import subprocess
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from services.common import metrics
from services.common.storage import (
    AuditAppend,
    AuditHead,
    AuditRow,
    ChallengeRecord,
    ChallengeUsedError,
    MigrationError,
    SqlStorage,
    StorageError,
    TemplateRecord,
    open_storage,
)
from services.common.storage.migrate import load_migrations, migrate
from tests.conftest import race

T = "bank-a"
THREADS = 8


def test_challenge_consumed_by_exactly_one_thread(storage: SqlStorage) -> None:
    for _ in range(3):
        ch = storage.challenges.create(
            ChallengeRecord(T, "s1", "liveness", {"k": 1}, datetime.now(timezone.utc) + timedelta(minutes=1))
        )

        def consume(i: int, nonce: str = ch.nonce) -> object:
            return storage.challenges.consume(nonce, T, "s1", "liveness")

        results = race(THREADS, consume)
        assert sum(r == {"k": 1} for r in results) == 1, results
        assert sum(isinstance(r, ChallengeUsedError) for r in results) == THREADS - 1, results


def test_rate_limit_hits_are_atomic(storage: SqlStorage) -> None:
    now = datetime(2031, 5, 4, 12, 0, 10, tzinfo=timezone.utc)
    per_thread, limit = 10, 25
    results = race(THREADS, lambda i: [storage.rate_limits.hit("login:s1", 3600, limit, now) for _ in range(per_thread)])
    hits = [h for r in results for h in r]  # type: ignore[union-attr]
    assert sorted(count for _, count in hits) == list(range(1, THREADS * per_thread + 1))
    assert sum(allowed for allowed, _ in hits) == limit


def test_envelope_swap_has_one_winner(storage: SqlStorage) -> None:
    rec = storage.templates.put(TemplateRecord(T, "s1", "face", "m", "", b"e", "k1", 1))
    results = race(THREADS, lambda i: storage.templates.replace_envelope(rec.id, "k1", f"e{i}".encode(), f"k2-{i}"))
    assert results.count(True) == 1 and results.count(False) == THREADS - 1
    winner = results.index(True)
    got = storage.templates.get(T, "s1", "face", "m")
    assert got is not None and (got.envelope, got.key_id) == (f"e{winner}".encode(), f"k2-{winner}")


def test_audit_appends_from_threads_form_one_chain(storage: SqlStorage) -> None:
    def build(seq: int, prev: str | None) -> AuditAppend:
        return AuditAppend(AuditRow(seq, datetime.now(timezone.utc), "e", "a", T, None, "{}", prev, f"h{seq}"))

    race(THREADS, lambda i: [storage.audit.append(build) for _ in range(5)])
    rows = list(storage.audit.iter_records())
    assert [r.seq for r in rows] == list(range(1, THREADS * 5 + 1))
    assert all(r.prev_hash == (f"h{r.seq - 1}" if r.seq > 1 else None) for r in rows)


def held_audit_lock(storage: SqlStorage):
    """A thread holding the audit append lock (on SQLite the database's write lock) until the event is set."""
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with storage.db.transaction() as s:
            storage.db.lock(s, "audit_append")
            held.set()
            release.wait(30)

    t = threading.Thread(target=hold)
    t.start()
    assert held.wait(10)
    return t, release


def grouped_appends(storage: SqlStorage, builds: list) -> list[AuditRow | Exception | None]:
    """The first append waits on the held lock; the rest queue behind it; then the lock goes."""
    holder, release = held_audit_lock(storage)
    results: list[AuditRow | Exception | None] = [None] * len(builds)

    def run(i: int) -> None:
        try:
            results[i] = storage.audit.append(builds[i])
        except Exception as exc:  # collected for the assertions
            results[i] = exc

    threads = [threading.Thread(target=run, args=(0,))]
    threads[0].start()
    for _ in range(1000):  # the first is writing (blocked on the lock): the others must queue
        if storage.audit.writing:
            break
        time.sleep(0.01)
    threads += [threading.Thread(target=run, args=(i,)) for i in range(1, len(builds))]
    for t in threads[1:]:
        t.start()
    for _ in range(1000):
        if storage.audit.waiting == len(builds) - 1:
            break
        time.sleep(0.01)
    queued = storage.audit.waiting
    release.set()
    holder.join(30)
    for t in threads:
        t.join(30)
    assert queued == len(builds) - 1
    return results


def test_audit_appends_that_wait_are_written_together_in_one_transaction(storage: SqlStorage) -> None:
    built_on: dict[int, int] = {}

    def build(seq: int, prev: str | None) -> AuditAppend:
        built_on[seq] = threading.get_ident()
        return AuditAppend(AuditRow(seq, datetime.now(timezone.utc), "e", "a", T, None, "{}", prev, f"h{seq}"),
                           AuditHead(seq, f"h{seq}", f"sig-{seq}".encode(), "k"))

    groups = list(metrics.AUDIT_GROUP.collect())[0]
    count_before, sum_before = (next(s.value for s in groups.samples if s.name.endswith(k)) for k in ("_count", "_sum"))
    results = grouped_appends(storage, [build] * THREADS)
    rows = list(storage.audit.iter_records())
    assert [r.seq for r in rows] == list(range(1, THREADS + 1))
    assert all(r.prev_hash == (f"h{r.seq - 1}" if r.seq > 1 else None) for r in rows)
    assert sorted(r.seq for r in results) == list(range(1, THREADS + 1))  # type: ignore[union-attr]
    # the seven that queued were built by one thread, in one transaction (one commit, one fsync)
    assert len({built_on[seq] for seq in range(2, THREADS + 1)}) == 1
    groups = list(metrics.AUDIT_GROUP.collect())[0]  # two commits: the first alone, then the seven
    assert next(s.value for s in groups.samples if s.name.endswith("_count")) == count_before + 2
    assert next(s.value for s in groups.samples if s.name.endswith("_sum")) == sum_before + THREADS
    assert storage.audit.head() == AuditHead(THREADS, f"h{THREADS}", f"sig-{THREADS}".encode(), "k")


def test_a_group_signs_only_its_last_head(storage: SqlStorage) -> None:
    signed: list[int] = []

    def build(seq: int, prev: str | None) -> AuditAppend:
        def sign() -> AuditHead:
            signed.append(seq)
            return AuditHead(seq, f"h{seq}", f"sig-{seq}".encode(), "k")

        return AuditAppend(AuditRow(seq, datetime.now(timezone.utc), "e", "a", T, None, "{}", prev, f"h{seq}"),
                           sign_head=sign)

    grouped_appends(storage, [build] * 6)
    assert signed == [1, 6]  # the first commit's head, then the group's last: not 2..5, superseded unread
    assert storage.audit.head() == AuditHead(6, "h6", b"sig-6", "k")


def test_a_failing_builder_in_a_group_fails_only_its_own_append(storage: SqlStorage) -> None:
    def build(seq: int, prev: str | None) -> AuditAppend:
        return AuditAppend(AuditRow(seq, datetime.now(timezone.utc), "e", "a", T, None, "{}", prev, f"h{seq}"))

    def failing(seq: int, prev: str | None) -> AuditAppend:
        raise RuntimeError("signer unavailable")

    results = grouped_appends(storage, [build, build, failing, build, build])
    assert isinstance(results[2], RuntimeError)
    assert [type(r) for i, r in enumerate(results) if i != 2] == [AuditRow] * 4
    rows = list(storage.audit.iter_records())
    assert [r.seq for r in rows] == [1, 2, 3, 4]
    assert all(r.prev_hash == (f"h{r.seq - 1}" if r.seq > 1 else None) for r in rows)


def test_a_group_whose_transaction_fails_fails_every_append_in_it_and_the_next_succeeds(storage: SqlStorage) -> None:
    def build(seq: int, prev: str | None) -> AuditAppend:
        return AuditAppend(AuditRow(seq, datetime.now(timezone.utc), "e", "a", T, None, "{}", prev, f"h{seq}"))

    def violating(seq: int, prev: str | None) -> AuditAppend:  # NOT NULL event_type: the insert fails
        return AuditAppend(AuditRow(seq, datetime.now(timezone.utc), None, "a", T, None, "{}", prev, f"h{seq}"))  # type: ignore[arg-type]

    results = grouped_appends(storage, [build, build, violating, build])
    assert isinstance(results[0], AuditRow)  # the first wrote alone, before the others queued
    assert all(isinstance(r, StorageError) for r in results[1:]), results
    assert [r.seq for r in storage.audit.iter_records()] == [1]
    assert storage.audit.append(build).seq == 2


# --- migrations ----------------------------------------------------------------------------------


def applied(storage: SqlStorage) -> list[int]:
    with storage.db.transaction() as s:
        return [r[0] for r in s.all("SELECT version FROM schema_versions WHERE part = 'shared' ORDER BY version")]


def test_migrations_are_idempotent(storage_dsn: str) -> None:
    versions = [m.version for m in load_migrations("sqlite")]
    assert versions == [m.version for m in load_migrations("postgres")]
    first = open_storage(storage_dsn)
    assert applied(first) == versions
    assert migrate(first.db) == []  # nothing left to apply
    first.close()
    second = open_storage(storage_dsn)
    assert applied(second) == versions
    second.close()


OPEN_AND_REPORT = """
import sys
from services.common.storage import open_storage
open_storage(sys.argv[1]).close()
print("opened")
"""


def test_migrations_from_two_processes_at_once(storage_dsn: str, python) -> None:
    procs = [python(OPEN_AND_REPORT, storage_dsn, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err for _, err in outs]
    assert all(out.strip() == "opened" for out, _ in outs)
    st = open_storage(storage_dsn)
    assert applied(st) == [m.version for m in load_migrations(st.dialect)]
    st.close()


def test_an_edited_migration_is_refused(storage_dsn: str) -> None:
    st = open_storage(storage_dsn)
    with st.db.transaction() as s:
        s.execute("UPDATE schema_versions SET checksum = 'edited' WHERE part = 'shared' AND version = 1")
    st.close()
    with pytest.raises(MigrationError, match="changed after it was applied"):
        open_storage(storage_dsn)


def test_sqlite_file_settings(tmp_path: Path) -> None:
    path = tmp_path / "new" / "dir" / "biogate.db"
    st = open_storage(f"sqlite:///{path}")
    assert path.is_file()
    with st.db.transaction() as s:
        assert s.one("PRAGMA journal_mode")[0] == "wal"
        assert s.one("PRAGMA foreign_keys")[0] == 1
        assert s.one("PRAGMA busy_timeout")[0] == 10000
        assert s.one("PRAGMA synchronous")[0] == 2  # FULL
    st.close()
