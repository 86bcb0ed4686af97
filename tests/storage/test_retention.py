"""Storage limitation (GDPR art. 5(1)(e)): `biogate purge` deletes what every part keeps past its
retention, in bounded batches, with one audit record, on SQLite and PostgreSQL; what is still
needed (within its period, a session under a pending review, a code its session may still answer
with, a counter holding a lock) stays, and so does a row a concurrent write made live again."""

from __future__ import annotations

import argparse
import json
import threading
import time
from datetime import datetime, timedelta, timezone

import pytest

from services.commands import retention as retention_cli
from services.common.crypto.backend import open_audit_signer
from services.common.storage import ChallengeRecord, SqlStorage, open_storage
from services.common.storage.db import SqliteDatabase, utcnow
from services.common.storage.retention import Expiry, Pages, purge
from services.mfa.storage import AuthSessionRecord, DeviceRecord, OtpRecord, ReviewRecord, WebhookEventRecord
from services.mfa.storage import attach as attach_mfa
from services.settings import load_config
from services.voice.storage import attach as attach_voice
from tests.conftest import present

T = "bank-a"
NOW = datetime(2031, 5, 4, 12, 0, 0, tzinfo=timezone.utc)
HOUR, DAY = timedelta(hours=1), timedelta(days=1)


@pytest.fixture
def settings(tmp_path, storage_dsn):
    s = load_config(None, data_dir=str(tmp_path / "data"), storage={"dsn": storage_dsn})
    open_audit_signer(s)  # the key `biogate migrate` makes
    return s


@pytest.fixture
def storage(settings):
    st = open_storage(settings.storage_dsn, settings.storage)
    yield st
    st.close()


def _cli(settings, *argv: str) -> int:
    parser = argparse.ArgumentParser(prog="biogate")
    retention_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["purge", *argv])
    return args.func(settings, args)


def _count(storage: SqlStorage, table: str, where: str = "1 = 1") -> int:
    with storage.db.read() as s:
        return s.one(f"SELECT COUNT(*) FROM {table} WHERE {where}")[0]


def _purge_records(storage: SqlStorage) -> list[tuple]:
    with storage.db.read() as s:
        return s.all("SELECT actor, tenant_id, subject_pseudonym, details FROM audit_records"
                     " WHERE event_type = 'retention.purged' ORDER BY seq")


def _session(mfa, subject: str, expires_at: datetime) -> str:
    return mfa.auth_sessions.create(AuthSessionRecord(T, subject, {"nonce": "n"}, expires_at)).id


def test_the_cli_deletes_every_kind_past_retention_keeps_the_rest_and_audits_the_counts(settings, storage, capsys):
    """Nothing ran the purges in a deployment: each of these tables grew forever."""
    now, r = utcnow(), settings.retention
    mfa, voice = attach_mfa(storage), attach_voice(storage)
    old, fresh = "s-old", "s-fresh"
    storage.challenges.create(ChallengeRecord(T, old, "digits", {}, now - HOUR - timedelta(seconds=r.challenges_s)))
    storage.challenges.create(ChallengeRecord(T, fresh, "digits", {}, now - timedelta(minutes=1)))  # within grace
    storage.rate_limits.hit("old-window", 60, 5, now - 2 * HOUR - timedelta(seconds=r.rate_limits_s))
    storage.rate_limits.hit("live-window", 3600, 5, now)
    gone = _session(mfa, old, now - DAY - timedelta(seconds=r.sessions_s))
    kept = _session(mfa, fresh, now - DAY)  # expired, within its dispute period
    mfa.otp.create(OtpRecord(gone, T, old, "h", now - 2 * HOUR - timedelta(seconds=r.otp_s)))
    mfa.otp.create(OtpRecord(kept, T, fresh, "h", now + HOUR))
    mfa.reviews.create(ReviewRecord(T, old, "sess-x", "payment", (), status="approved",
                                    resolved_at=now - DAY - timedelta(seconds=r.reviews_s)))
    mfa.reviews.create(ReviewRecord(T, fresh, "sess-y", "payment", (), status="rejected", resolved_at=now - DAY))
    keep_s = settings.mfa.reviews.webhook.keep_s
    for age, nxt in ((timedelta(seconds=keep_s) + DAY, None), (DAY, None), (timedelta(seconds=keep_s) + DAY, now)):
        mfa.webhooks.add(WebhookEventRecord(T, "review.closed", "{}", nxt, created_at=now - age))
    mfa.lockouts.record_failure(T, "device", "fp-stale", old, 100, now - DAY - timedelta(seconds=r.lockouts_s))
    mfa.lockouts.record_failure(T, "device", "fp-locked", old, 1000, now - DAY - timedelta(seconds=r.lockouts_s))
    mfa.lockouts.record_failure(T, "device", "fp-recent", fresh, 100, now - DAY)
    for subject, fp, revoked in ((old, "d1", now - DAY - timedelta(seconds=r.revoked_devices_s)),
                                 (fresh, "d2", now - DAY), (fresh, "d3", None)):
        mfa.devices.add(DeviceRecord(T, subject, fp, revoked_at=revoked, bound_at=now - 900 * DAY))
    ts = now.timestamp()
    voice.add(T, "pseud-old", b"sealed", ts - settings.voice.replay_retention_s - 3600, 20,
              ts - 10 * settings.voice.replay_retention_s)  # a voice service that no longer accepts captures
    voice.add(T, "pseud-new", b"sealed", ts - 3600, 20, ts - 10 * settings.voice.replay_retention_s)

    assert _cli(settings) == 0
    expected = {"challenges": 1, "rate_limit_windows": 1, "sms_codes": 1, "auth_sessions": 1, "reviews": 1,
                "webhook_events": 1, "lockout_counters": 1, "revoked_devices": 1, "replay_fingerprints": 1}
    out = capsys.readouterr().out
    assert "9 row(s) deleted" in out and "auth_sessions: 1" in out
    assert _count(storage, "challenges") == 1 and _count(storage, "challenges", f"subject_id = '{fresh}'") == 1
    assert _count(storage, "rate_limits") == 1 and _count(storage, "rate_limits", "key = 'live-window'") == 1
    assert mfa.auth_sessions.get(gone) is None and mfa.auth_sessions.get(kept) is not None
    assert _count(storage, "otp_challenges") == 1 and _count(storage, "otp_challenges", f"session_id = '{kept}'") == 1
    assert [rv.subject_id for rv in mfa.reviews.list(T, "rejected", 10)] == [fresh]
    assert _count(storage, "mfa_webhook_outbox") == 2  # the recent one, and the one still to deliver
    assert _count(storage, "mfa_webhook_outbox", "next_attempt_at IS NOT NULL") == 1
    assert mfa.lockouts.get(T, "device", "fp-stale") is None
    assert mfa.lockouts.get(T, "device", "fp-locked") is not None  # a lock lapses by the tenant's policy only
    assert mfa.lockouts.get(T, "device", "fp-recent") is not None
    assert sorted(d.fingerprint for d in mfa.devices.list_for_subject(T, fresh, include_revoked=True)) == ["d2", "d3"]
    assert mfa.devices.list_for_subject(T, old, include_revoked=True) == []
    assert voice.recent(T, "pseud-old", 0) == [] and voice.recent(T, "pseud-new", 0) == [b"sealed"]

    ((actor, tenant, pseudonym, details),) = _purge_records(storage)
    assert actor.startswith("cli:") and tenant is None and pseudonym is None
    assert json.loads(details) == {"deleted": expected, "batch": r.batch, "complete": True}
    assert old not in details and "pseud" not in details  # counts, never whose rows

    assert _cli(settings) == 0  # a second run finds nothing, and says so in its own record
    assert json.loads(_purge_records(storage)[-1][3])["deleted"] == dict.fromkeys(expected, 0)


def test_a_session_under_pending_review_is_kept_and_a_resolved_one_for_its_period(settings, storage):
    """The MFA's old purge deleted a session the moment it expired: a case still waiting for a
    human (reviews last up to 30 days) lost its session, and a decided one its dispute record."""
    r = settings.retention
    mfa = attach_mfa(storage)
    long_ago = NOW - 10 * timedelta(seconds=r.sessions_s) - DAY
    pending = _session(mfa, "s1", long_ago)
    mfa.reviews.create(ReviewRecord(T, "s1", pending, "payment", (), created_at=long_ago))
    resolved = _session(mfa, "s2", long_ago)
    mfa.reviews.create(ReviewRecord(T, "s2", resolved, "payment", (), status="approved", created_at=long_ago,
                                    resolved_at=NOW - timedelta(seconds=r.sessions_s) + HOUR))
    plain = _session(mfa, "s3", long_ago)

    deleted = retention_cli.run(settings, storage, "cli:test", NOW)
    assert deleted["auth_sessions"] == 1 and mfa.auth_sessions.get(plain) is None
    assert mfa.auth_sessions.get(pending) is not None and mfa.auth_sessions.get(resolved) is not None

    later = retention_cli.run(settings, storage, "cli:test", NOW + 2 * HOUR)  # the resolved one's period is over
    assert later["auth_sessions"] == 1 and mfa.auth_sessions.get(resolved) is None
    assert mfa.auth_sessions.get(pending) is not None


def test_a_sessions_sms_codes_go_together_once_every_one_is_past_its_grace(settings, storage):
    """Deleting the newest code alone would make an older one, sent with a longer lifetime, the
    session's newest: the one that answers (services/mfa/otp.py)."""
    r = settings.retention
    mfa = attach_mfa(storage)
    grace = timedelta(seconds=r.otp_s)
    mfa.otp.create(OtpRecord("sess", T, "s1", "older", NOW + 10 * HOUR, sent_at=NOW - HOUR))
    mfa.otp.create(OtpRecord("sess", T, "s1", "newest", NOW - grace - HOUR, sent_at=NOW - HOUR + timedelta(seconds=1)))
    assert retention_cli.run(settings, storage, "cli:test", NOW)["sms_codes"] == 0
    assert present(mfa.otp.newest_for_session("sess")).code_hash == "newest"
    assert retention_cli.run(settings, storage, "cli:test", NOW + 11 * HOUR + grace)["sms_codes"] == 2


def test_each_batch_commits_on_its_own_and_deletes_at_most_the_batch(settings, storage, storage_dsn):
    """The old purges deleted every expired row in one statement of one transaction: millions of
    rows held the write lock (SQLite) or their row locks until the end."""
    for i in range(35):
        storage.challenges.create(ChallengeRecord(T, f"s{i}", "digits", {}, NOW - 2 * DAY))
    storage.challenges.create(ChallengeRecord(T, "live", "digits", {}, NOW + HOUR))
    seen: list[tuple[str, int, int]] = []
    other = open_storage(storage_dsn)  # another connection: what it sees, the batch committed
    try:
        def after(kind: str, n: int) -> None:
            seen.append((kind, n, _count(other, "challenges")))

        deleted = retention_cli.run(settings, storage, "cli:test", NOW, batch=10, on_batch=after)
    finally:
        other.close()
    assert deleted["challenges"] == 35
    assert seen == [("challenges", 10, 26), ("challenges", 10, 16), ("challenges", 10, 6), ("challenges", 5, 1)]
    assert json.loads(_purge_records(storage)[-1][3])["batch"] == 10


def test_two_purges_never_run_at_once(settings, storage, capsys):
    with storage.exclusive(retention_cli.LOCK, "another purge"):
        assert _cli(settings) == 1
    assert "another `biogate purge` runs" in capsys.readouterr().err
    assert _purge_records(storage) == []


def test_a_bad_batch_is_refused_before_anything_is_deleted(settings, storage, capsys):
    storage.challenges.create(ChallengeRecord(T, "s1", "digits", {}, NOW - 2 * DAY))
    assert _cli(settings, "--batch", "0") == 2
    assert "--batch must be at least 1" in capsys.readouterr().err
    assert _count(storage, "challenges") == 1 and _purge_records(storage) == []


def test_a_failed_batch_is_audited_as_an_incomplete_purge_with_what_was_deleted(settings, storage):
    from services.common.storage.retention import PurgeFailed

    storage.challenges.create(ChallengeRecord(T, "s1", "digits", {}, NOW - 2 * DAY))
    broken = Expiry("broken", "no_such_table", "1 = 1")
    with pytest.raises(PurgeFailed) as failed:
        purge(storage.db, [*storage.expiries(settings.retention, NOW), broken], 10)
    assert failed.value.deleted == {"challenges": 1, "rate_limit_windows": 0, "broken": 0}


def test_a_session_made_live_while_the_purge_picked_it_is_kept(tmp_path, pg_dsn):
    """PostgreSQL: the purge's batch is chosen from a snapshot; a session whose expiry a concurrent
    transaction moved on (the purge waits for its row lock) is re-read, found live and kept.
    (SQLite runs one writer at a time: the purge's batch and the write never interleave.)"""
    settings = load_config(None, data_dir=str(tmp_path / "data"), storage={"dsn": pg_dsn},
                           retention={"sessions_s": 0})
    open_audit_signer(settings)
    storage = open_storage(pg_dsn)
    mfa = attach_mfa(storage)
    sid = _session(mfa, "s1", NOW - timedelta(seconds=1))
    writing, done = threading.Event(), threading.Event()

    def extend() -> None:
        with storage.transaction():
            mfa.auth_sessions.update(sid, 1, {"nonce": "n", "step": 2}, expires_at=NOW + HOUR)
            writing.set()
            done.wait(60)

    writer = threading.Thread(target=extend)
    writer.start()
    assert writing.wait(30)
    result: dict[str, int] = {}
    purger = threading.Thread(target=lambda: result.update(retention_cli.run(settings, storage, "cli:test", NOW)))
    purger.start()
    try:
        deadline = datetime.now() + timedelta(seconds=60)
        while datetime.now() < deadline:  # until the purge waits for the writer's row lock
            time.sleep(0.05)
            with storage.db.read() as s:
                if s.one("SELECT COUNT(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                         " AND query LIKE 'DELETE FROM auth_sessions%'")[0]:
                    break
        else:
            pytest.fail("the purge never reached the session")
    finally:
        done.set()
        writer.join()
        purger.join()
    try:
        assert result["auth_sessions"] == 0
        assert present(mfa.auth_sessions.get(sid)).expires_at == NOW + HOUR
    finally:
        storage.close()


def test_the_retention_section_is_typed():
    assert load_config(None, retention={"sessions_s": 86400}).retention.sessions_s == 86400
    with pytest.raises(ValueError, match="session_s"):
        load_config(None, retention={"session_s": 86400})
    with pytest.raises(ValueError, match="batch"):
        load_config(None, retention={"batch": 0})


class _CountingSqlite(SqliteDatabase):
    """SQLite whose ``expired(keep)`` counts each row the purge's predicate looks at."""

    looked = 0

    def _connect(self):
        conn = super()._connect()
        conn.create_function("expired", 1, self._expired)
        return conn

    def _expired(self, keep: int) -> int:
        self.looked += 1
        return int(not keep)


def test_each_batch_resumes_after_the_last_row_it_saw_instead_of_rewalking_the_kept_ones(tmp_path):
    """Each batch's LIMIT walked the table from its start, past every row the predicate keeps (the
    sessions under a pending review): 10,000 kept x 200 batches in bench/retention.py."""
    db = _CountingSqlite(tmp_path / "t.db", 1, 10.0, "FULL")
    try:
        with db.transaction() as s:
            s.execute("CREATE TABLE t (id TEXT PRIMARY KEY, at INTEGER NOT NULL, keep INTEGER NOT NULL)")
            s.execute("CREATE INDEX t_at ON t (at)")
            for i in range(600):  # the kept rows are the oldest: every batch's walk starts among them
                s.execute("INSERT INTO t VALUES (?, ?, ?)", (f"r{i:04d}", i // 7, int(i < 100)))
        e = Expiry("rows", "t", "at <= ? AND expired(keep)", (10_000,), order="at")
        assert purge(db, [e], 10) == {"rows": 500}
        # each row is looked at by one batch only: its choice, its DELETE's range and its re-check (6,100 before)
        assert db.looked <= 3 * 600
        with db.read() as s:
            assert s.one("SELECT COUNT(*), MIN(keep) FROM t") == (100, 1)
    finally:
        db.close()


def test_every_kinds_batch_seeks_an_index_on_sqlite(tmp_path):
    """`revoked_at`, `updated_at` and `resolved_at` had no index: each batch scanned (and sorted)
    the whole table of devices, lockout counters or reviews. (SQLite's plans depend on the schema
    alone; PostgreSQL's on its statistics, and are not asserted.)"""
    settings = load_config(None, data_dir=str(tmp_path / "data"))
    storage = open_storage(f"sqlite:///{tmp_path / 'plans.db'}")
    try:
        attach_mfa(storage), attach_voice(storage)
        plans = {}
        with storage.db.read() as s:
            for e in retention_cli.expiries(settings, storage, NOW):
                for q in Pages(e, "sqlite").queries():
                    params = (*e.params, *[0] * (q.count("?") - len(e.params)))
                    plans[(e.kind, q)] = [r[3] for r in s.all("EXPLAIN QUERY PLAN " + q, params)]
        walks = {k: p for k, p in plans.items() if any(d.startswith(f"SCAN {k[1].split(' FROM ')[1].split()[0]}")
                                                       or "TEMP B-TREE" in d for d in p)}
        assert {kind for kind, _ in walks} == set(), walks
        assert len({kind for kind, _ in plans}) == 9
    finally:
        storage.close()
