"""The MFA's own tables on SQLite and PostgreSQL: devices, OTP codes, authentication sessions,
review queue, lockout counters, subject signals; their erasure with the subject; and their
migrations, attached to the shared storage, from a database created before the MFA owned them."""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta, timezone

import pytest

from services.common.storage import (
    AlreadyExistsError,
    ConcurrentUpdateError,
    ConsentRecord,
    MigrationError,
    NotFoundError,
    open_storage,
)
from services.common.storage.db import utcnow
from services.mfa.storage import (
    AuthSessionRecord,
    DeviceRecord,
    MfaErasure,
    MfaStore,
    OtpRecord,
    ReviewRecord,
    SubjectSignalRecord,
    attach,
)
from tests.conftest import create_legacy_database, present, race, schema_of

T = "bank-a"
NOW = datetime(2031, 5, 4, 12, 0, 0, 123456, tzinfo=timezone.utc)
THREADS = 8


@pytest.fixture
def shared(storage_dsn):
    st = open_storage(storage_dsn)
    yield st
    st.close()


@pytest.fixture
def store(shared) -> MfaStore:
    return attach(shared)


# --- devices -------------------------------------------------------------------------------------


def test_devices_lifecycle(store: MfaStore) -> None:
    dev = DeviceRecord(T, "s1", "fp-abc", b"0\x82der-key", {"os": "android", "model": "x"}, "Phone", "android",
                       bound_at=NOW)
    assert store.devices.add(dev) == dev
    assert store.devices.get(T, dev.id) == dev
    assert store.devices.get("bank-b", dev.id) is None
    assert store.devices.get_by_fingerprint(T, "s1", "fp-abc") == dev
    with pytest.raises(AlreadyExistsError):
        store.devices.add(DeviceRecord(T, "s1", "fp-abc"))
    other = store.devices.add(DeviceRecord(T, "s1", "fp-def", bound_at=NOW + timedelta(seconds=1)))
    assert other.public_key is None and other.attributes == {}
    assert [d.id for d in store.devices.list_for_subject(T, "s1")] == [dev.id, other.id]

    assert store.devices.touch(T, dev.id, now=NOW + timedelta(hours=1))
    assert present(store.devices.get(T, dev.id)).last_seen_at == NOW + timedelta(hours=1)
    assert not store.devices.touch(T, "missing")
    assert store.devices.revoke(T, dev.id, now=NOW + timedelta(hours=2))
    assert not store.devices.revoke(T, dev.id)  # already revoked
    assert not store.devices.touch(T, dev.id)
    assert present(store.devices.get(T, dev.id)).revoked_at == NOW + timedelta(hours=2)
    assert store.devices.get_by_fingerprint(T, "s1", "fp-abc") is None
    assert [d.id for d in store.devices.list_for_subject(T, "s1")] == [other.id]
    assert len(store.devices.list_for_subject(T, "s1", include_revoked=True)) == 2

    rebound = store.devices.add(DeviceRecord(T, "s1", "fp-abc"))  # the same phone, bound again
    assert store.devices.get_by_fingerprint(T, "s1", "fp-abc") == rebound
    assert store.devices.delete_for_subject(T, "s1") == 3
    assert store.devices.list_for_subject(T, "s1", include_revoked=True) == []


# --- OTP -----------------------------------------------------------------------------------------


def otp(session: str = "sess-1", sent: datetime = NOW, max_attempts: int = 3) -> OtpRecord:
    return OtpRecord(session, T, "s1", hashlib.sha256(b"123456").hexdigest(), sent + timedelta(minutes=5),
                     max_attempts=max_attempts, sent_at=sent)


def test_otp_attempts_consume_and_expiry(store: MfaStore) -> None:
    old = store.otp.create(otp(sent=NOW))
    new = store.otp.create(otp(sent=NOW + timedelta(seconds=30)))
    with pytest.raises(AlreadyExistsError):
        store.otp.create(new)
    assert store.otp.get(old.id) == old
    assert store.otp.get_active_for_session("sess-1", NOW + timedelta(minutes=1)) == new
    assert store.otp.get_active_for_session("sess-2", NOW) is None

    t = NOW + timedelta(minutes=1)
    assert [present(store.otp.record_attempt(new.id, t)).attempts for _ in range(3)] == [1, 2, 3]
    assert store.otp.record_attempt(new.id, t) is None  # budget spent
    assert present(store.otp.get(new.id)).attempts == 3
    assert store.otp.get_active_for_session("sess-1", t) == old  # the exhausted one is skipped

    assert store.otp.consume(old.id, t) is True
    assert store.otp.consume(old.id, t) is False
    assert present(store.otp.get(old.id)).consumed_at == t
    assert store.otp.record_attempt(old.id, t) is None
    assert store.otp.get_active_for_session("sess-1", t) is None

    late = store.otp.create(otp(session="sess-3"))
    expired_at = late.expires_at
    assert store.otp.get_active_for_session("sess-3", expired_at) is None
    assert store.otp.record_attempt(late.id, expired_at) is None
    assert store.otp.consume(late.id, expired_at) is False
    assert store.otp.delete_for_subject(T, "s1") == 3
    assert store.otp.get(late.id) is None


# --- auth sessions -------------------------------------------------------------------------------


def test_auth_session_optimistic_concurrency(store: MfaStore) -> None:
    rec = AuthSessionRecord(T, "s1", {"step": "start", "factors": []}, NOW + timedelta(minutes=10),
                            created_at=NOW)
    assert store.auth_sessions.create(rec) == rec
    with pytest.raises(AlreadyExistsError):
        store.auth_sessions.create(rec)
    assert store.auth_sessions.get(rec.id) == rec
    assert store.auth_sessions.get("missing") is None

    v2 = store.auth_sessions.update(rec.id, 1, {"step": "face", "factors": ["face"]})
    assert (v2.version, v2.state, v2.expires_at) == (2, {"step": "face", "factors": ["face"]}, rec.expires_at)
    with pytest.raises(ConcurrentUpdateError):
        store.auth_sessions.update(rec.id, 1, {"step": "lost update"})
    v3 = store.auth_sessions.update(rec.id, 2, {"step": "done"}, expires_at=NOW + timedelta(minutes=1))
    assert (v3.version, v3.expires_at) == (3, NOW + timedelta(minutes=1))
    assert store.auth_sessions.get(rec.id) == v3
    with pytest.raises(NotFoundError):
        store.auth_sessions.update("missing", 1, {})
    assert store.auth_sessions.delete_for_subject(T, "s1") == 1
    assert store.auth_sessions.get(rec.id) is None



def test_session_update_has_one_winner_per_version(store: MfaStore) -> None:
    rec = store.auth_sessions.create(AuthSessionRecord(T, "s1", {"n": 0}, datetime.now(timezone.utc)))
    results = race(THREADS, lambda i: store.auth_sessions.update(rec.id, 1, {"n": i}))
    winners = [r for r in results if isinstance(r, AuthSessionRecord)]
    assert len(winners) == 1 and winners[0].version == 2
    assert all(isinstance(r, ConcurrentUpdateError) for r in results if r is not winners[0])
    assert store.auth_sessions.get(rec.id) == winners[0]


def test_otp_attempt_budget_holds_under_concurrency(store: MfaStore) -> None:
    now = datetime.now(timezone.utc)
    otp = store.otp.create(OtpRecord("sess", T, "s1", "h", now + timedelta(minutes=5), max_attempts=3))
    results = race(THREADS, lambda i: store.otp.record_attempt(otp.id, now))
    assert all(r is None or isinstance(r, OtpRecord) for r in results), results
    assert sorted(r.attempts for r in results if isinstance(r, OtpRecord)) == [1, 2, 3]
    assert present(store.otp.get(otp.id)).attempts == 3


# --- review queue, lockouts, signals -------------------------------------------------------------


def test_review_queue_pages_and_resolves_once(store: MfaStore) -> None:
    t0 = utcnow()
    made = [store.reviews.create(ReviewRecord("bank", f"c{i}", f"ses_{i}", "payment",
                                              (("FRAUD_SCRIPT_PHRASE", "m"),), created_at=t0 + timedelta(seconds=i)))
            for i in range(5)]
    with pytest.raises(AlreadyExistsError):
        store.reviews.create(ReviewRecord("bank", "c9", "ses_0", "login", ()))
    page1 = store.reviews.list("bank", "pending", 2)
    page2 = store.reviews.list("bank", "pending", 2, after=(page1[-1].created_at, page1[-1].id))
    page3 = store.reviews.list("bank", "pending", 2, after=(page2[-1].created_at, page2[-1].id))
    assert [r.id for r in page1 + page2 + page3] == [r.id for r in made]
    assert page1[0].reasons == (["FRAUD_SCRIPT_PHRASE", "m"],)
    done = present(store.reviews.resolve(made[0].id, "approved", "admin-1", "ok"))
    assert done.status == "approved" and done.resolved_by == "admin-1" and done.resolved_at
    assert store.reviews.resolve(made[0].id, "rejected", "admin-2", "") is None  # only once
    assert present(store.reviews.get(made[0].id)).status == "approved"
    assert store.reviews.list("other", "pending", 10) == []


def test_lockout_cost_adds_up_and_locks_at_the_limit(store: MfaStore) -> None:
    for i in range(4):
        rec = store.lockouts.record_failure("bank", "subject", "c1", "c1", 200)
        assert rec.failures == i + 1 and rec.locked_at is None
    rec = store.lockouts.record_failure("bank", "subject", "c1", "c1", 200)
    assert rec.cost == 1000 and rec.locked_at is not None
    again = store.lockouts.record_failure("bank", "subject", "c1", "c1", 200)
    assert again.locked_at == rec.locked_at  # the lock time stays the first one
    assert store.lockouts.reset("bank", "subject", "c1")
    assert store.lockouts.get("bank", "subject", "c1") is None


def test_erasure_removes_mfa_rows_of_the_subject_only(shared, store: MfaStore) -> None:
    store.devices.add(DeviceRecord("bank", "c1", "fp1"))
    store.devices.add(DeviceRecord("bank", "c2", "fp1"))
    store.otp.create(OtpRecord("ses_a", "bank", "c1", "h", NOW))
    store.auth_sessions.create(AuthSessionRecord("bank", "c1", {}, NOW))
    store.reviews.create(ReviewRecord("bank", "c1", "ses_a", "login", ()))
    store.reviews.create(ReviewRecord("bank", "c2", "ses_b", "login", ()))
    store.lockouts.record_failure("bank", "subject", "c1", "c1", 200)
    store.lockouts.record_failure("bank", "device", "fp9", "", 200)
    store.subject_signals.put(SubjectSignalRecord("bank", "c1", "CN", 31.2, 121.5))
    store.subject_signals.put(SubjectSignalRecord("bank", "c1", "DE"))
    assert present(store.subject_signals.get("bank", "c1")).country == "DE"
    assert store.erase_subject("bank", "c1") == MfaErasure(devices=1, otp=1, sessions=1, reviews=1, lockouts=1,
                                                           signals=1)
    assert [r.subject_id for r in store.reviews.list("bank", "pending", 10)] == ["c2"]
    assert store.lockouts.get("bank", "subject", "c1") is None
    assert store.lockouts.get("bank", "device", "fp9") is not None  # not the subject's data
    assert store.subject_signals.get("bank", "c1") is None
    assert [d.subject_id for d in store.devices.list_for_subject("bank", "c2")] == ["c2"]
    # With its own rows gone, the shared record goes too (the devices referred to it).
    assert shared.erase_subject("bank", "c1").consents == 0
    with shared.db.read() as s:
        assert s.one("SELECT COUNT(*) FROM subjects WHERE subject_id = 'c1'")[0] == 0
    assert store.erase_subject("bank", "c1") == MfaErasure(0, 0, 0, 0, 0, 0)


def test_naive_datetimes_are_refused(store: MfaStore) -> None:
    with pytest.raises(ValueError, match="naive"):
        store.otp.create(OtpRecord("sess", T, "s1", "h", datetime(2031, 1, 1)))


# --- ownership and migrations --------------------------------------------------------------------


def versions(shared, part: str) -> list[int]:
    with shared.db.read() as s:
        return [r[0] for r in s.all("SELECT version FROM schema_versions WHERE part = ? ORDER BY version", (part,))]


def test_the_shared_storage_alone_has_none_of_the_mfa_tables(storage_dsn) -> None:
    st = open_storage(storage_dsn)
    try:
        tables = {r[1] for r in schema_of(st) if r[0] in ("table", "column")}
        assert tables and not tables & {"devices", "otp_challenges", "auth_sessions", "mfa_reviews",
                                        "mfa_lockouts", "mfa_subject_signals"}
        assert {"subjects", "consents", "templates", "challenges", "rate_limits", "audit_records"} <= tables
        mfa = attach(st)
        assert attach(st) is mfa  # migrated once per storage
        assert versions(st, "mfa") == [1, 2, 3, 4, 5, 6, 7, 8] and versions(st, "shared") == [1, 2, 3, 4, 5]
    finally:
        st.close()


def test_a_database_created_before_the_split_migrates_forward_with_its_data(storage_dsn, other_storage_dsn) -> None:
    create_legacy_database(storage_dsn)
    legacy = open_storage(storage_dsn)  # only what came after the split runs: the rest is recorded from the legacy history
    try:
        legacy.subjects.record_consent(ConsentRecord(T, "c1", "biometric_verification", ("face",), "v1"))
        with legacy.db.transaction() as s:
            s.execute("INSERT INTO devices (id, tenant_id, subject_id, fingerprint, attributes, label, platform,"
                      " bound_at) VALUES ('dev_1', ?, 'c1', 'fp', ?, 'phone', 'android', ?)", (T, {}, NOW))
        store = attach(legacy)
        assert versions(legacy, "shared") == [1, 2, 3, 4, 5] and versions(legacy, "mfa") == [1, 2, 3, 4, 5, 6, 7, 8]
        assert present(store.devices.get(T, "dev_1")).fingerprint == "fp"
        store.reviews.create(ReviewRecord(T, "c1", "ses_x", "login", ()))
        fresh = open_storage(other_storage_dsn)
        try:
            attach(fresh)
            assert schema_of(legacy) == schema_of(fresh)  # the same tables, indexes and constraints
        finally:
            fresh.close()
    finally:
        legacy.close()


def test_a_partly_migrated_legacy_database_runs_what_it_lacks(storage_dsn) -> None:
    create_legacy_database(storage_dsn, versions=1)  # before the review queue and consent indexes
    st = open_storage(storage_dsn)
    try:
        store = attach(st)
        assert versions(st, "mfa") == [1, 2, 3, 4, 5, 6, 7, 8]
        store.reviews.create(ReviewRecord(T, "c1", "ses_x", "login", ()))  # 0002 ran: the table exists
        with st.db.read() as s:
            names = [r[0] for r in s.all(
                "SELECT name FROM sqlite_master WHERE type = 'index'" if st.dialect == "sqlite"
                else "SELECT indexname FROM pg_indexes WHERE schemaname = current_schema()")]
        assert "consents_recorded" in names and "mfa_reviews_queue" in names
    finally:
        st.close()


def test_an_edited_mfa_migration_is_refused(storage_dsn) -> None:
    st = open_storage(storage_dsn)
    attach(st)
    with st.db.transaction() as s:
        s.execute("UPDATE schema_versions SET checksum = 'edited' WHERE part = 'mfa' AND version = 2")
    st.close()
    st = open_storage(storage_dsn)  # the shared part is intact
    try:
        with pytest.raises(MigrationError, match="mfa migration 0002_reviews_lockouts was changed"):
            attach(st)
    finally:
        st.close()
