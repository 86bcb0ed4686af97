"""The MFA tables of migration 0002 on SQLite and PostgreSQL: review queue, lockout counters,
subject signals, and their erasure with the subject."""

from __future__ import annotations

from datetime import timedelta

import pytest

from services.common.storage import AlreadyExistsError, DeviceRecord, open_storage
from services.common.storage.db import utcnow
from services.common.storage.mfa_records import ReviewRecord, SubjectSignalRecord


@pytest.fixture
def store(storage_dsn):
    st = open_storage(storage_dsn)
    yield st
    st.close()


def test_review_queue_pages_and_resolves_once(store):
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
    done = store.reviews.resolve(made[0].id, "approved", "admin-1", "ok")
    assert done.status == "approved" and done.resolved_by == "admin-1" and done.resolved_at
    assert store.reviews.resolve(made[0].id, "rejected", "admin-2", "") is None  # only once
    assert store.reviews.get(made[0].id).status == "approved"
    assert store.reviews.list("other", "pending", 10) == []


def test_lockout_cost_adds_up_and_locks_at_the_limit(store):
    for i in range(4):
        rec = store.lockouts.record_failure("bank", "subject", "c1", "c1", 200)
        assert rec.failures == i + 1 and rec.locked_at is None
    rec = store.lockouts.record_failure("bank", "subject", "c1", "c1", 200)
    assert rec.cost == 1000 and rec.locked_at is not None
    again = store.lockouts.record_failure("bank", "subject", "c1", "c1", 200)
    assert again.locked_at == rec.locked_at  # the lock time stays the first one
    assert store.lockouts.reset("bank", "subject", "c1")
    assert store.lockouts.get("bank", "subject", "c1") is None


def test_erasure_removes_mfa_rows_of_the_subject_only(store):
    store.devices.add(DeviceRecord("bank", "c1", "fp1"))
    store.reviews.create(ReviewRecord("bank", "c1", "ses_a", "login", ()))
    store.reviews.create(ReviewRecord("bank", "c2", "ses_b", "login", ()))
    store.lockouts.record_failure("bank", "subject", "c1", "c1", 200)
    store.lockouts.record_failure("bank", "device", "fp1", "", 200)
    store.subject_signals.put(SubjectSignalRecord("bank", "c1", "CN", 31.2, 121.5))
    store.subject_signals.put(SubjectSignalRecord("bank", "c1", "DE"))
    assert store.subject_signals.get("bank", "c1").country == "DE"
    store.erase_subject("bank", "c1")
    assert store.reviews.list("bank", "pending", 10)[0].subject_id == "c2"
    assert len(store.reviews.list("bank", "pending", 10)) == 1
    assert store.lockouts.get("bank", "subject", "c1") is None
    assert store.lockouts.get("bank", "device", "fp1") is not None  # not the subject's data
    assert store.subject_signals.get("bank", "c1") is None
