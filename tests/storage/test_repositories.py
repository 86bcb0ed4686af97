"""Every repository method, on SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import json
import traceback
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest

from services.common.storage import (
    AlreadyExistsError,
    AuditAppend,
    AuditCheckpoint,
    AuditHead,
    AuditRow,
    ChallengeExpiredError,
    ChallengeMismatchError,
    ChallengeNotFoundError,
    ChallengeRecord,
    ChallengeUsedError,
    ConsentRecord,
    ErasureCounts,
    StillReferencedError,
    SqlStorage,
    StorageError,
    TemplateRecord,
)
from services.common.storage.interfaces import Modality
from tests.conftest import present

T = "bank-a"
NOW = datetime(2031, 5, 4, 12, 0, 0, 123456, tzinfo=timezone.utc)


def template(subject: str = "s1", modality: Modality = "face", channel: str = "", model: str = "m1",
             envelope: bytes = b"env-1", key_id: str = "k1", tenant: str = T) -> TemplateRecord:
    return TemplateRecord(tenant, subject, modality, model, channel, envelope, key_id, 3, {"q": 0.9})


def consent(subject: str = "s1", purpose: str = "biometric_verification",
            modalities: tuple = ("face", "voice"), **kw) -> ConsentRecord:
    return ConsentRecord(T, subject, purpose, modalities, "2031-01", "ev-123", **kw)


# --- templates -----------------------------------------------------------------------------------


def test_template_put_get_round_trip(storage: SqlStorage) -> None:
    rec = TemplateRecord(T, "s1", "face", "arcface-r100", "", bytes(range(256)) * 8, "k1", 5,
                         {"score": 0.87, "flags": ["ok"]}, created_at=NOW, updated_at=NOW)
    stored = storage.templates.put(rec)
    assert stored == rec
    got = storage.templates.get(T, "s1", "face", "arcface-r100")
    assert got == rec
    assert got.created_at.tzinfo is not None and got.created_at.utcoffset() == timedelta(0)
    assert storage.templates.get(T, "s1", "face", "other-model") is None
    assert storage.templates.get("bank-b", "s1", "face", "arcface-r100") is None


def test_template_put_existing_raises_unless_replace(storage: SqlStorage) -> None:
    first = storage.templates.put(template(envelope=b"old"))
    with pytest.raises(AlreadyExistsError):
        storage.templates.put(template(envelope=b"new"))
    assert present(storage.templates.get(T, "s1", "face", "m1")).envelope == b"old"

    later = TemplateRecord(T, "s1", "face", "m1", "", b"new", "k2", 7, {"q": 1},
                           updated_at=first.updated_at + timedelta(seconds=5))
    replaced = storage.templates.put(later, replace=True)
    assert (replaced.id, replaced.created_at) == (first.id, first.created_at)
    assert (replaced.envelope, replaced.key_id, replaced.samples, replaced.quality) == (b"new", "k2", 7, {"q": 1})
    assert replaced.updated_at == later.updated_at
    assert storage.templates.get(T, "s1", "face", "m1") == replaced


def test_template_channels_are_separate_and_checked(storage: SqlStorage) -> None:
    wide = storage.templates.put(template(modality="voice", channel="wideband", model="ecapa", envelope=b"w"))
    tel = storage.templates.put(template(modality="voice", channel="telephone", model="ecapa", envelope=b"t"))
    assert storage.templates.get(T, "s1", "voice", "ecapa", "wideband") == wide
    assert storage.templates.get(T, "s1", "voice", "ecapa", "telephone") == tel
    assert storage.templates.get(T, "s1", "voice", "ecapa") is None
    with pytest.raises(StorageError):
        storage.templates.put(template(modality="voice", channel="", model="ecapa"))
    subject, envelope = f"subject-{7000 + 731}", "-".join(["ENVELOPE", "MARK"]).encode()
    with pytest.raises(StorageError) as caught:
        storage.templates.put(template(subject=subject, modality="face", channel="wideband", envelope=envelope))
    # The error names the constraint, never the row's values (the driver's DETAIL would).
    text = "".join(traceback.format_exception(caught.value))  # what a logger would print
    assert subject not in text and envelope.decode() not in text and envelope.hex() not in text


def test_template_list_and_delete_for_subject(storage: SqlStorage) -> None:
    storage.templates.put(template(model="m1"))
    storage.templates.put(template(model="m2"))
    storage.templates.put(template(modality="voice", channel="wideband", model="ecapa"))
    storage.templates.put(template(subject="s2"))
    assert [r.model_id for r in storage.templates.list_for_subject(T, "s1")] == ["m1", "m2", "ecapa"]
    assert len(storage.templates.list_for_subject(T, "s1", "voice")) == 1
    assert storage.templates.delete_for_subject(T, "s1", "face") == 2
    assert [r.modality for r in storage.templates.list_for_subject(T, "s1")] == ["voice"]
    assert storage.templates.delete_for_subject(T, "s1") == 1
    assert storage.templates.delete_for_subject(T, "s1") == 0
    assert len(storage.templates.list_for_subject(T, "s2")) == 1


@pytest.mark.parametrize("n", [25, 20, 0])
def test_iter_gallery_streams_in_batches(storage: SqlStorage, n: int) -> None:
    ids = {storage.templates.put(template(subject=f"s{i:03d}")).id for i in range(n)}
    storage.templates.put(template(subject="other-model", model="m2"))
    storage.templates.put(template(subject="other-tenant", tenant="bank-b"))
    storage.templates.put(template(subject="s000", modality="voice", channel="wideband"))

    batches = list(storage.templates.iter_gallery(T, "face", "m1", batch=10))
    assert [len(b) for b in batches] == [10] * (n // 10) + ([n % 10] if n % 10 else [])
    assert {r.id for b in batches for r in b} == ids
    assert storage.templates.count_gallery(T, "face", "m1") == n
    assert storage.templates.count_gallery(T, "voice", "m1", "wideband") == 1


def test_gallery_version_changes_with_enrolments_replacements_and_erasures(storage: SqlStorage) -> None:
    assert storage.templates.gallery_version(T, "face", "m1") == (0, None)
    for i in range(3):
        storage.templates.put(replace(template(subject=f"s{i}"), updated_at=NOW + timedelta(seconds=i)))
    storage.templates.put(replace(template(subject="late", model="m2"), updated_at=NOW + timedelta(days=1)))
    storage.templates.put(replace(template(subject="late", tenant="bank-b"), updated_at=NOW + timedelta(days=1)))
    storage.templates.put(replace(template(subject="late", modality="voice", channel="wideband", model="m1"),
                                  updated_at=NOW + timedelta(days=1)))
    assert storage.templates.gallery_version(T, "face", "m1") == (3, NOW + timedelta(seconds=2))

    # A re-enrolment keeps the count and moves the latest update.
    storage.templates.put(replace(template(subject="s0", envelope=b"env-2"), updated_at=NOW + timedelta(hours=1)),
                          replace=True)
    assert storage.templates.gallery_version(T, "face", "m1") == (3, NOW + timedelta(hours=1))
    storage.templates.delete_for_subject(T, "s0")
    assert storage.templates.gallery_version(T, "face", "m1") == (2, NOW + timedelta(seconds=2))
    assert storage.templates.gallery_version(T, "voice", "m1", "wideband") == (1, NOW + timedelta(days=1))


def test_gallery_of_subjects_consenting_to_identification(storage: SqlStorage) -> None:
    ident = "biometric_identification"
    for subject in ("both", "verify-only", "voice-only", "withdrawn", "none", "other-tenant-consent"):
        storage.templates.put(template(subject=subject))
    storage.templates.put(template(subject="both", modality="voice", channel="wideband"))
    storage.subjects.record_consent(consent("both", ident, ("face", "voice"), recorded_at=NOW))
    storage.subjects.record_consent(consent("verify-only", modalities=("face",), recorded_at=NOW))
    storage.subjects.record_consent(consent("voice-only", ident, ("voice",), recorded_at=NOW))
    storage.subjects.record_consent(consent("withdrawn", ident, ("face",), recorded_at=NOW))
    storage.subjects.withdraw_consent(T, "withdrawn", ident, now=NOW + timedelta(hours=1))
    storage.subjects.record_consent(replace(consent("other-tenant-consent", ident, ("face",)), tenant_id="bank-b"))

    def gallery(modality="face", channel=""):
        return {r.subject_id for b in storage.templates.iter_gallery(T, modality, "m1", channel, 2, ident) for r in b}

    assert gallery() == {"both"} and gallery("voice", "wideband") == {"both"}
    assert storage.templates.count_gallery(T, "face", "m1", consent=ident) == 1
    assert storage.templates.count_gallery(T, "face", "m1") == 6  # without a purpose: every template
    everyone = ["both", "verify-only", "voice-only", "withdrawn", "none", "other-tenant-consent", "unknown"]
    assert storage.subjects.consenting(T, ident, "face", everyone) == {"both"}
    assert storage.subjects.consenting(T, ident, "voice", everyone) == {"both", "voice-only"}
    assert storage.subjects.consenting(T, ident, "face", []) == set()
    assert storage.subjects.consent_changed_at(T, ident) == NOW + timedelta(hours=1)  # the withdrawal

    # A grant and a withdrawal each move the latest change; erasure leaves the gallery.
    storage.subjects.record_consent(consent("verify-only", ident, ("face",), recorded_at=NOW + timedelta(hours=2)))
    assert gallery() == {"both", "verify-only"}
    assert storage.subjects.consent_changed_at(T, ident) == NOW + timedelta(hours=2)
    storage.subjects.withdraw_consent(T, "both", ident, now=NOW + timedelta(hours=3))
    assert gallery() == {"verify-only"} and gallery("voice", "wideband") == set()
    assert storage.subjects.consent_changed_at(T, ident) == NOW + timedelta(hours=3)
    storage.templates.delete_for_subject(T, "verify-only")  # the face service's erasure, then the record's
    storage.erase_subject(T, "verify-only")
    assert gallery() == set() and storage.templates.count_gallery(T, "face", "m1", consent=ident) == 0
    assert storage.subjects.consent_changed_at("bank-c", ident) is None


def test_template_rewrap_compare_and_swap(storage: SqlStorage) -> None:
    recs = [storage.templates.put(template(subject=f"s{i}", envelope=f"e{i}".encode())) for i in range(5)]
    storage.templates.put(template(subject="fresh", key_id="k2"))

    # Walk the pending rows with the keyset cursor, rewrapping each.
    seen, after = [], ""
    while batch := storage.templates.iter_for_rewrap("k2", batch=2, after_id=after):
        assert all(r.key_id == "k1" for r in batch)
        seen += batch
        after = batch[-1].id
    assert sorted(r.id for r in seen) == sorted(r.id for r in recs)

    r0, r1 = recs[0], recs[1]
    assert storage.templates.replace_envelope(r0.id, "k9", b"x", "k2") is False  # wrong key id
    assert storage.templates.replace_envelope(r0.id, "k1", b"x", "k2", expected_envelope=b"stale") is False
    assert storage.templates.replace_envelope(r0.id, "k1", b"e0-k2", "k2", expected_envelope=b"e0") is True
    assert storage.templates.replace_envelope(r0.id, "k1", b"again", "k2") is False  # already swapped
    assert storage.templates.replace_envelope("no-such-id", "k1", b"x", "k2") is False
    # A concurrent re-enrolment under the new key is never overwritten by a late rewrap.
    storage.templates.put(template(subject="s1", envelope=b"re-enrolled", key_id="k2"), replace=True)
    assert storage.templates.replace_envelope(r1.id, "k1", b"e1-k2", "k2") is False
    got = present(storage.templates.get(T, "s0", "face", "m1"))
    assert (got.envelope, got.key_id, got.updated_at) == (b"e0-k2", "k2", r0.updated_at)
    assert present(storage.templates.get(T, "s1", "face", "m1")).envelope == b"re-enrolled"
    assert len(storage.templates.iter_for_rewrap("k2", batch=100)) == 3


# --- subjects: consent and contact ---------------------------------------------------------------


def test_consent_record_get_and_active(storage: SqlStorage) -> None:
    rec = consent(recorded_at=NOW)
    assert storage.subjects.record_consent(rec) == rec
    storage.subjects.record_consent(consent(purpose="biometric_identification", modalities=("face",)))
    got = storage.subjects.get_consents(T, "s1")
    assert [c.purpose for c in got] == ["biometric_identification", "biometric_verification"]
    assert got[1] == rec and got[1].modalities == ("face", "voice")
    assert storage.subjects.has_active_consent(T, "s1", "biometric_verification", "voice")
    assert storage.subjects.has_active_consent(T, "s1", "biometric_identification", "face")
    assert not storage.subjects.has_active_consent(T, "s1", "biometric_identification", "voice")
    assert not storage.subjects.has_active_consent(T, "s2", "biometric_verification", "face")
    assert storage.subjects.get_consents(T, "s2") == []


def test_consent_withdraw_and_grant_again(storage: SqlStorage) -> None:
    storage.subjects.record_consent(consent())
    withdrawn = storage.subjects.withdraw_consent(T, "s1", "biometric_verification", now=NOW)
    assert withdrawn is not None and not withdrawn.granted and withdrawn.withdrawn_at == NOW
    assert not storage.subjects.has_active_consent(T, "s1", "biometric_verification", "face")
    again = storage.subjects.withdraw_consent(T, "s1", "biometric_verification", now=NOW + timedelta(days=1))
    assert present(again).withdrawn_at == NOW  # the first withdrawal time is kept
    assert storage.subjects.withdraw_consent(T, "s1", "other_purpose") is None

    regranted = storage.subjects.record_consent(consent(modalities=("voice",)))
    assert regranted.granted and regranted.withdrawn_at is None
    assert storage.subjects.has_active_consent(T, "s1", "biometric_verification", "voice")
    assert not storage.subjects.has_active_consent(T, "s1", "biometric_verification", "face")
    refused = storage.subjects.record_consent(consent(granted=False))
    assert not refused.granted
    assert not storage.subjects.has_active_consent(T, "s1", "biometric_verification", "voice")


def test_phone_envelope_and_rewrap(storage: SqlStorage) -> None:
    assert storage.subjects.get_phone(T, "s1") is None
    storage.subjects.record_consent(consent())  # subject row exists without a phone
    assert storage.subjects.get_phone(T, "s1") is None
    storage.subjects.set_phone(T, "s1", b"enc-phone-1", "k1")
    storage.subjects.set_phone(T, "s2", b"enc-phone-2", "k1")
    storage.subjects.set_phone(T, "s3", b"enc-phone-3", "k2")
    assert storage.subjects.get_phone(T, "s1") == (b"enc-phone-1", "k1")

    first = storage.subjects.iter_phones_for_rewrap("k2", batch=1)
    assert [(p.subject_id, p.envelope) for p in first] == [("s1", b"enc-phone-1")]
    rest = storage.subjects.iter_phones_for_rewrap("k2", batch=10, after=(T, "s1"))
    assert [p.subject_id for p in rest] == ["s2"]

    assert storage.subjects.replace_phone_envelope(T, "s1", "k9", b"x", "k2") is False
    assert storage.subjects.replace_phone_envelope(T, "s1", "k1", b"x", "k2", expected_envelope=b"old") is False
    assert storage.subjects.replace_phone_envelope(T, "s1", "k1", b"enc-1-k2", "k2", expected_envelope=b"enc-phone-1")
    assert storage.subjects.replace_phone_envelope(T, "s1", "k1", b"again", "k2") is False
    storage.subjects.set_phone(T, "s2", b"new-number", "k2")  # a concurrent change of number
    assert storage.subjects.replace_phone_envelope(T, "s2", "k1", b"old-number-rewrapped", "k2") is False
    assert storage.subjects.get_phone(T, "s2") == (b"new-number", "k2")
    assert storage.subjects.iter_phones_for_rewrap("k2", batch=10) == []


def test_envelopes_counted_per_key_id(storage: SqlStorage) -> None:
    assert storage.templates.count_by_key() == {} and storage.subjects.count_phones_by_key() == {}
    recs = [storage.templates.put(template(subject=f"s{i}", key_id="k1")) for i in range(3)]
    storage.templates.put(template(subject="s0", modality="voice", channel="wideband", key_id="k2"))
    storage.templates.put(template(subject="b0", tenant="bank-b", key_id="k2"))
    storage.subjects.set_phone(T, "s0", b"p0", "k1")
    storage.subjects.set_phone(T, "s1", b"p1", "k3")
    storage.subjects.record_consent(consent("no-phone"))  # a subject row without a phone envelope
    assert storage.templates.count_by_key() == {"k1": 3, "k2": 2}
    assert storage.subjects.count_phones_by_key() == {"k1": 1, "k3": 1}

    assert storage.templates.replace_envelope(recs[0].id, "k1", b"e", "k3")
    assert storage.subjects.replace_phone_envelope(T, "s0", "k1", b"p", "k3")
    assert storage.templates.count_by_key() == {"k1": 2, "k2": 2, "k3": 1}
    assert storage.subjects.count_phones_by_key() == {"k3": 2}
    storage.templates.delete_for_subject(T, "s1")
    storage.erase_subject(T, "s1")
    assert storage.templates.count_by_key() == {"k1": 1, "k2": 2, "k3": 1}
    assert storage.subjects.count_phones_by_key() == {"k3": 1}


# --- rate limits ---------------------------------------------------------------------------------


def test_rate_limit_fixed_window(storage: SqlStorage) -> None:
    base = datetime(2031, 5, 4, 12, 0, 0, tzinfo=timezone.utc)  # a window boundary for 60 s
    hits = [storage.rate_limits.hit("otp:s1", 60, 3, base + timedelta(seconds=i)) for i in range(5)]
    assert hits == [(True, 1), (True, 2), (True, 3), (False, 4), (False, 5)]
    assert storage.rate_limits.hit("otp:s2", 60, 3, base) == (True, 1)  # keys are independent
    # A hit stamped in the previous window (a lagging clock) counts in the current one.
    assert storage.rate_limits.hit("otp:s1", 60, 3, base - timedelta(seconds=1)) == (False, 6)
    assert storage.rate_limits.hit("otp:s1", 60, 3, base + timedelta(seconds=60)) == (True, 1)
    assert storage.rate_limits.reset("otp:s1") is True
    assert storage.rate_limits.reset("otp:s1") is False
    assert storage.rate_limits.hit("otp:s1", 60, 3, base + timedelta(seconds=61)) == (True, 1)
    with pytest.raises(ValueError):
        storage.rate_limits.hit("otp:s1", 0, 3)


def test_a_rate_limit_count_is_read_in_the_current_window_only(storage: SqlStorage) -> None:
    """What Verify reads before comparing (services/common/modality/attempts.py): the current
    window's hits, 0 for a key never hit or hit only in an earlier window, and reading counts none."""
    base = datetime(2031, 5, 4, 12, 0, 0, tzinfo=timezone.utc)
    assert storage.rate_limits.count("face:verify:p", 60, base) == 0
    storage.rate_limits.hit("face:verify:p", 60, 2, base)
    storage.rate_limits.hit("face:verify:p", 60, 2, base + timedelta(seconds=1))
    assert storage.rate_limits.count("face:verify:p", 60, base + timedelta(seconds=2)) == 2
    assert storage.rate_limits.count("face:verify:p", 60, base + timedelta(seconds=2)) == 2
    assert storage.rate_limits.count("face:verify:q", 60, base + timedelta(seconds=2)) == 0
    assert storage.rate_limits.count("face:verify:p", 60, base + timedelta(seconds=60)) == 0  # the next window
    assert storage.rate_limits.hit("face:verify:p", 60, 2, base + timedelta(seconds=61)) == (True, 1)


# --- challenges ----------------------------------------------------------------------------------


def test_challenge_single_use_and_errors(storage: SqlStorage) -> None:
    ch = storage.challenges.create(
        ChallengeRecord(T, "s1", "liveness", {"actions": ["blink", "turn_left"]}, NOW + timedelta(minutes=2),
                        created_at=NOW)
    )
    with pytest.raises(AlreadyExistsError):
        storage.challenges.create(ch)
    with pytest.raises(ChallengeNotFoundError):
        storage.challenges.consume("nope", T, "s1", "liveness", NOW)
    for tenant, subject, kind in [("bank-b", "s1", "liveness"), (T, "s2", "liveness"), (T, "s1", "digits")]:
        with pytest.raises(ChallengeMismatchError):
            storage.challenges.consume(ch.nonce, tenant, subject, kind, NOW)
    assert storage.challenges.consume(ch.nonce, T, "s1", "liveness", NOW) == {"actions": ["blink", "turn_left"]}
    with pytest.raises(ChallengeUsedError):
        storage.challenges.consume(ch.nonce, T, "s1", "liveness", NOW)

    digits = storage.challenges.create(ChallengeRecord(T, "", "digits", {"digits": "4711"}, NOW + timedelta(seconds=30)))
    with pytest.raises(ChallengeExpiredError):
        storage.challenges.consume(digits.nonce, T, "", "digits", NOW + timedelta(seconds=30))
    assert storage.challenges.delete_for_subject(T, "s1") == 1
    assert storage.challenges.delete_for_subject(T, "") == 1


# --- audit ---------------------------------------------------------------------------------------


def chain_builder(event: str, sign_every: int = 3):
    def build(seq: int, prev: str | None) -> AuditAppend:
        details = json.dumps({"event": event, "n": seq}, sort_keys=True)
        digest = hashlib.sha256(f"{seq}|{prev}|{details}".encode()).hexdigest()
        row = AuditRow(seq, NOW + timedelta(seconds=seq), event, "tester", T, "psn-1", details, prev, digest)
        sig = f"sig-{seq}".encode()
        cp = AuditCheckpoint(seq, digest, sig, "audit-k1", row.ts) if seq % sign_every == 0 else None
        return AuditAppend(row, AuditHead(seq, digest, sig, "audit-k1"), cp)

    return build


def test_audit_checkpoints_read_in_batches_and_the_newest_one_by_time(storage: SqlStorage) -> None:
    """What the anchor checks read instead of every checkpoint: the times of checkpoints need not
    follow their seqs (replicas' clocks differ), and the one by time is the highest seq at or before it."""
    at = {3: 50, 6: 10, 9: 30, 12: 40}

    def skewed(seq: int, prev: str | None) -> AuditAppend:
        a = chain_builder("skew")(seq, prev)
        return a if a.checkpoint is None else replace(a, checkpoint=replace(a.checkpoint, ts=NOW + timedelta(seconds=at[seq])))

    assert list(storage.audit.iter_checkpoints()) == [] and storage.audit.checkpoint_before(NOW) is None
    for _ in range(13):
        storage.audit.append(skewed)
    every = storage.audit.checkpoints()
    assert [c.seq for c in every] == [3, 6, 9, 12]
    assert list(storage.audit.iter_checkpoints(batch=1)) == every
    assert list(storage.audit.iter_checkpoints(after_seq=3, batch=2)) == every[1:]
    assert list(storage.audit.iter_checkpoints(after_seq=12)) == []
    for s in (9, 10, 29, 30, 39, 40, 49, 50, 60):
        due = NOW + timedelta(seconds=s)
        newest = max((c for c in every if c.ts <= due), key=lambda c: c.seq, default=None)
        assert storage.audit.checkpoint_before(due) == newest, s


def test_audit_append_and_read(storage: SqlStorage) -> None:
    assert storage.audit.last() is None and storage.audit.head() is None
    assert list(storage.audit.iter_records()) == [] and storage.audit.checkpoints() == []

    seen: list[tuple[int, str | None]] = []

    def recording(seq: int, prev: str | None) -> AuditAppend:
        seen.append((seq, prev))
        return chain_builder("login")(seq, prev)

    rows = [storage.audit.append(recording) for _ in range(7)]
    assert seen[0] == (1, None) and all(seen[i] == (i + 1, rows[i - 1].hash) for i in range(1, 7))
    assert storage.audit.last() == rows[-1]
    assert list(storage.audit.iter_records()) == rows
    assert list(storage.audit.iter_records(from_seq=3, batch=2)) == rows[2:]
    assert [c.seq for c in storage.audit.checkpoints()] == [3, 6]
    assert storage.audit.checkpoints()[0].signature == b"sig-3"
    assert storage.audit.head() == AuditHead(7, rows[-1].hash, b"sig-7", "audit-k1")
    # A builder may return a bare row: no head or checkpoint change.
    bare = storage.audit.append(lambda seq, prev: chain_builder("x")(seq, prev).row)
    assert bare.seq == 8 and present(storage.audit.head()).seq == 7


def test_audit_rejects_a_wrong_row_and_rolls_back(storage: SqlStorage) -> None:
    storage.audit.append(chain_builder("a"))

    def wrong_seq(seq: int, prev: str | None) -> AuditAppend:
        out = chain_builder("b")(seq + 1, prev)
        return out

    with pytest.raises(ValueError):
        storage.audit.append(wrong_seq)

    def failing(seq: int, prev: str | None) -> AuditAppend:
        raise RuntimeError("signer unavailable")

    with pytest.raises(RuntimeError):
        storage.audit.append(failing)
    assert [r.seq for r in storage.audit.iter_records()] == [1]


def test_audit_records_are_append_only(storage: SqlStorage) -> None:
    storage.audit.append(chain_builder("a"))
    for stmt in ("UPDATE audit_records SET actor = 'mallory'", "DELETE FROM audit_records"):
        with pytest.raises(StorageError, match="append-only"):
            with storage.db.transaction() as s:
                s.execute(stmt)
    assert present(storage.audit.last()).actor == "tester"


# --- transactions, erasure, housekeeping ---------------------------------------------------------


def test_transaction_spans_repositories_and_rolls_back(storage: SqlStorage) -> None:
    with pytest.raises(RuntimeError):
        with storage.transaction() as tx:
            tx.subjects.record_consent(consent())
            tx.templates.put(template())
            with tx.transaction():  # nested blocks join the outer transaction
                tx.challenges.create(ChallengeRecord(T, "s1", "liveness", {}, NOW))
            raise RuntimeError("enrolment failed half-way")
    assert storage.subjects.get_consents(T, "s1") == []
    assert storage.templates.list_for_subject(T, "s1") == []
    with storage.db.read() as s:
        assert s.one("SELECT COUNT(*) FROM challenges")[0] == 0

    with storage.transaction() as tx:
        tx.subjects.record_consent(consent())
        tx.templates.put(template())
        assert tx.templates.get(T, "s1", "face", "m1") is not None  # reads see the open transaction
    assert len(storage.templates.list_for_subject(T, "s1")) == 1


def populate(storage: SqlStorage, subject: str) -> None:
    storage.subjects.record_consent(consent(subject))
    storage.subjects.record_consent(consent(subject, purpose="biometric_identification"))
    storage.subjects.set_phone(T, subject, b"enc", "k1")
    storage.templates.put(template(subject))
    storage.templates.put(template(subject, modality="voice", channel="wideband"))
    storage.challenges.create(ChallengeRecord(T, subject, "liveness", {}, NOW))


def test_erase_subject_removes_the_shared_record_once_the_templates_are_gone(storage: SqlStorage) -> None:
    populate(storage, "s1")
    populate(storage, "s2")
    with pytest.raises(StillReferencedError, match="2 template"):  # the modality services erase those
        storage.erase_subject(T, "s1")
    assert len(storage.subjects.get_consents(T, "s1")) == 2  # nothing was erased
    storage.templates.delete_for_subject(T, "s1", "face")
    storage.templates.delete_for_subject(T, "s1", "voice")
    counts = storage.erase_subject(T, "s1")
    assert counts == ErasureCounts(challenges=1, consents=2, contact_erased=True)
    assert storage.subjects.get_consents(T, "s1") == []
    assert storage.subjects.get_phone(T, "s1") is None
    with storage.db.transaction() as s:
        for table in ("subjects", "challenges", "consents"):
            assert s.one(f"SELECT COUNT(*) FROM {table} WHERE subject_id = 's1'")[0] == 0
            assert s.one(f"SELECT COUNT(*) FROM {table} WHERE subject_id = 's2'")[0] >= 1
    assert len(storage.templates.list_for_subject(T, "s2")) == 2
    assert storage.erase_subject(T, "s1") == ErasureCounts(0, 0, False)


def test_naive_datetimes_are_refused(storage: SqlStorage) -> None:
    with pytest.raises(ValueError, match="naive"):
        storage.challenges.create(ChallengeRecord(T, "s1", "digits", {}, datetime(2031, 1, 1)))
