"""The audit trail on real SQLite and PostgreSQL: an intact chain verifies; every kind of
tampering is caught by ``verify`` and named with its sequence number."""

from __future__ import annotations

import stat
import threading
from datetime import timedelta
from itertools import pairwise

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from services.common.audit import AuditDataError, AuditIntegrityError, AuditLog, AuditSigner, verify
from services.common.audit.chain import record_hash
from services.common.audit.verify import verify_after
from services.common.storage.interfaces import AuditRow

N = 12  # checkpoints at 5 and 10, head at 12


def _verify(storage, signer, **kw):
    return verify(storage.audit, signer.public_key, **kw)


def _problems_text(report) -> str:
    return "\n".join(report.problems)


def test_intact_chain_verifies(fill, storage, signer, audit_log):
    assert _verify(storage, signer).ok  # empty trail
    fill(audit_log, N)
    report = _verify(storage, signer, checkpoint_every=5)
    assert report.ok, report.render()
    assert (report.records_checked, report.checkpoints_checked, report.head_seq) == (N, 2, N)
    rows = list(storage.audit.iter_records())
    assert rows[0].prev_hash is None and all(r.prev_hash == p.hash for p, r in pairwise(rows))
    assert [c.seq for c in storage.audit.checkpoints()] == [5, 10]


def test_subjects_appear_only_as_pseudonyms(storage, audit_log, pseudonymizer):
    row = audit_log.append("mfa.otp.sent", "mfa", "bank-a", "cust-0042", {"channel": "sms", "masked_phone": "+86 *** **** 5678"})
    assert row.subject_pseudonym == pseudonymizer.pseudonymize("bank-a", "cust-0042")
    stored = storage.audit.last()
    assert "cust-0042" not in repr(stored)
    assert stored.details == '{"channel":"sms","masked_phone":"+86 *** **** 5678"}'  # canonical JSON
    assert audit_log.append("admin.login", "ops", None).subject_pseudonym is None


@pytest.mark.parametrize(
    "details",
    [
        {"phone": "+86 *** **** 5678"},
        {"id_number": "x"},
        {"probe": {"embedding": [0.1, 0.2]}},
        {"face_image": "..."},
        {"audio": None},
        {"note": "customer called from 13800138000"},
        {"note": "身份证 11010519491231002X"},
        {"note": "mail li.lei@example.cn"},
        {"account": 6217000010001234569},
        {"v": [0.01 * i for i in range(16)]},
        {"v": [[0.1, 0.2, 0.3]] * 2 + [0.1] * 9},
        {"blob": b"\x89PNG"},
        {"big": "A" * 5000},
        {"x": float("nan")},
        {"x": object()},
        {"13800138000": True},
        {"key_id": "13800138000"},  # a key id field is no hiding place
        {"kid": "ed25519:4173006917545076 13800138000"},
        {"note": "ed25519:4173006917545076"},  # our key-id form, but not under a key-id field
    ],
)
def test_personal_or_biometric_details_are_refused(storage, audit_log, details):
    audit_log.append("ok", "svc", "bank-a")
    before = storage.audit.last()
    with pytest.raises(AuditDataError):
        audit_log.append("face.verify", "svc", "bank-a", "cust-1", details)
    assert storage.audit.last() == before  # nothing written


@pytest.mark.parametrize("key_id", ["ed25519:4173006917545076", "p256:8770745018065487", "8770745018065487",
                                    "k20261206T091358123456-0a1b2c", "mfa-0123456789012345"])
def test_our_key_ids_are_recorded_even_when_their_hex_is_all_decimal(audit_log, key_id):
    """One fingerprint in ~1,500 is 16 decimal digits (seen in CI: the audit key's own record,
    'ed25519:4173006917545076', refused a service's first start)."""
    assert audit_log.append("keys.added", "service:face", None, details={"key": "audit-signing", "key_id": key_id})
    assert audit_log.append("keys.added", "service:mfa", None, details={"kid": key_id})


def test_actor_and_event_are_checked_too(audit_log):
    with pytest.raises(AuditDataError):
        audit_log.append("face.verify", "13800138000", "bank-a")
    with pytest.raises(AuditDataError):
        audit_log.append("", "svc", "bank-a")


def test_ordinary_details_pass(audit_log):
    row = audit_log.append(
        "voice.verify", "ivr", "bank-a", "cust-1",
        {"decision": "reject", "score": 0.4123, "threshold": 0.55, "model_id": "ecapa-tdnn-v1",
         "reasons": ["LOW_SCORE", "SPOOF_SUSPECTED"], "pad": {"layers": {"aasist": 0.91, "replay": 0.12}},
         "request_id": "req-8f3a2c", "template_id": "5f0c2d8e9a7b4c1d8e9f0a1b2c3d4e5f", "samples": 3,
         "image_quality": 0.8, "latency_ms": 41, "ts_ms": 1714566645123},
    )  # fmt: skip
    assert row.seq == 1


@pytest.mark.parametrize(
    "column,value",
    [
        ("event_type", "face.enroll"),
        ("actor", "someone-else"),
        ("tenant_id", "bank-b"),
        ("subject_pseudonym", "ps1_00000000000000000000000000000000"),
        ("details", '{"decision":"accept","n":6,"score":0.56}'),
        ("prev_hash", "0" * 64),
        ("hash", "f" * 64),
        ("ts", None),
    ],
)
def test_modified_record_is_detected(fill, storage, signer, audit_log, attacker, column, value):
    fill(audit_log, N)
    if column == "ts":
        row = next(r for r in storage.audit.iter_records() if r.seq == 7)
        value = attacker.ts(row.ts + timedelta(seconds=1))
    attacker.execute(f"UPDATE audit_records SET {column} = ? WHERE seq = 7", (value,))
    report = _verify(storage, signer)
    assert not report.ok
    assert "seq 7" in _problems_text(report) or "seq 8" in _problems_text(report), report.render()


def test_rewritten_chain_is_caught_by_the_signed_head(fill, storage, signer, audit_log, attacker):
    """The attacker edits seq 7 and recomputes every hash after it: only the key could re-sign."""
    fill(audit_log, N)
    rows = {r.seq: r for r in storage.audit.iter_records()}
    prev = rows[6].hash
    for seq in range(7, N + 1):
        r = rows[seq]
        details = '{"decision":"accept","n":6,"score":0.99}' if seq == 7 else r.details
        h = record_hash(seq, r.ts, r.event_type, r.actor, r.tenant_id, r.subject_pseudonym, details, prev)
        attacker.execute("UPDATE audit_records SET details = ?, prev_hash = ?, hash = ? WHERE seq = ?", (details, prev, h, seq))
        prev = h
    report = _verify(storage, signer)
    text = _problems_text(report)
    assert "checkpoint names another hash" in text and f"head seq {N}: names another hash" in text
    # ... and pointing the head (and checkpoint) at the forged hash breaks their signatures.
    attacker.execute("UPDATE audit_head SET hash = ?", (prev,))
    attacker.execute("UPDATE audit_checkpoints SET hash = ? WHERE seq = 10", (_hash_at(storage, 10),))
    text = _problems_text(_verify(storage, signer))
    assert f"head seq {N}: bad signature" in text and "checkpoint seq 10: bad signature" in text


def _hash_at(storage, seq):
    return next(r.hash for r in storage.audit.iter_records() if r.seq == seq)


def test_deleted_record_is_detected(fill, storage, signer, audit_log, attacker):
    fill(audit_log, N)
    attacker.execute("DELETE FROM audit_records WHERE seq = 7")
    text = _problems_text(_verify(storage, signer))
    assert "seq 8: records 7..7 are missing" in text and "seq 8: prev_hash" in text


def test_reordered_records_are_detected(fill, storage, signer, audit_log, attacker):
    fill(audit_log, N)
    attacker.execute("UPDATE audit_records SET seq = 1000 WHERE seq = 6")
    attacker.execute("UPDATE audit_records SET seq = 6 WHERE seq = 7")
    attacker.execute("UPDATE audit_records SET seq = 7 WHERE seq = 1000")
    text = _problems_text(_verify(storage, signer))
    assert "seq 6: content does not match" in text and "seq 7: content does not match" in text


def test_dropped_first_records_are_detected(fill, storage, signer, audit_log, attacker):
    fill(audit_log, N)
    attacker.execute("DELETE FROM audit_records WHERE seq <= 2")
    text = _problems_text(_verify(storage, signer))
    assert "seq 3: the trail starts here; records 1..2 were dropped" in text


def test_dropped_last_records_are_detected(fill, storage, signer, audit_log, attacker):
    fill(audit_log, N)
    attacker.execute("DELETE FROM audit_records WHERE seq > 10")
    text = _problems_text(_verify(storage, signer))
    assert f"head seq {N}: the trail ends at seq 10; the last record(s) were dropped" in text
    attacker.execute("DELETE FROM audit_head")
    assert "seq 10: there is no signed head" in _problems_text(_verify(storage, signer))


def test_all_records_dropped(fill, storage, signer, audit_log, attacker):
    fill(audit_log, 3)
    attacker.execute("DELETE FROM audit_records")
    assert "the trail is empty" in _problems_text(_verify(storage, signer))


def test_truncation_with_a_replayed_older_head_needs_external_checkpoints(fill, storage, signer, audit_log, attacker):
    """The documented residual risk, and its mitigation."""
    fill(audit_log, 10)
    old_head = storage.audit.head()
    fill(audit_log, 2)
    shipped = storage.audit.head()  # what the operator shipped to WORM storage
    attacker.execute("DELETE FROM audit_records WHERE seq > 10")
    attacker.execute("UPDATE audit_head SET seq = ?, hash = ?, signature = ?", (old_head.seq, old_head.hash, old_head.signature))
    assert _verify(storage, signer).ok  # undetectable from the database alone
    report = _verify(storage, signer, known_checkpoints=[(shipped.seq, shipped.hash)])
    assert "seq 12: an externally kept checkpoint is beyond the end of the trail" in _problems_text(report)


def test_bad_checkpoint_signature(fill, storage, signer, audit_log, attacker):
    fill(audit_log, N)
    cp = storage.audit.checkpoints()[0]
    forged = bytes([cp.signature[0] ^ 1]) + cp.signature[1:]
    attacker.execute("UPDATE audit_checkpoints SET signature = ? WHERE seq = ?", (forged, cp.seq))
    assert _problems_text(_verify(storage, signer)) == "checkpoint seq 5: bad signature"


def test_checkpoint_for_another_hash(fill, storage, signer, audit_log, attacker):
    fill(audit_log, N)
    attacker.execute("UPDATE audit_checkpoints SET hash = ? WHERE seq = 5", ("a" * 64,))
    text = _problems_text(_verify(storage, signer))
    assert "seq 5: the checkpoint names another hash" in text and "checkpoint seq 5: bad signature" in text


def test_missing_checkpoint(fill, storage, signer, audit_log, attacker):
    fill(audit_log, N)
    attacker.execute("DELETE FROM audit_checkpoints WHERE seq = 5")
    assert _verify(storage, signer).ok  # spacing not asserted
    assert "seq 5: its checkpoint is missing" in _problems_text(_verify(storage, signer, checkpoint_every=5))


def test_checkpoints_are_read_a_batch_at_a_time(fill, storage, signer, audit_log, attacker, monkeypatch):
    """A multi-year trail has millions of checkpoints: verify pages through them beside the records,
    and finds the same problems whichever batch falls on which checkpoint."""
    fill(audit_log, N)
    attacker.execute("DELETE FROM audit_records WHERE seq = 7")
    attacker.execute("UPDATE audit_checkpoints SET hash = ? WHERE seq = 5", ("a" * 64,))
    attacker.execute("DELETE FROM audit_records WHERE seq > 10")
    whole = _verify(storage, signer, checkpoint_every=5).render()

    def everything():
        raise AssertionError("every checkpoint read at once")

    monkeypatch.setattr(storage.audit, "checkpoints", everything)
    for batch in (1, 2, 3):
        assert _verify(storage, signer, checkpoint_every=5, batch=batch).render() == whole
    assert "seq 5: the checkpoint names another hash" in whole and "seq 8: records 7..7 are missing" in whole


def test_bad_head_signature(fill, storage, signer, audit_log, attacker):
    fill(audit_log, N)
    head = storage.audit.head()
    attacker.execute("UPDATE audit_head SET signature = ?", (bytes(64),))
    assert _problems_text(_verify(storage, signer)) == f"head seq {head.seq}: bad signature"


def test_signatures_by_another_key(fill, storage, signer, audit_log):
    fill(audit_log, N)
    other = Ed25519PrivateKey.generate().public_key()
    report = verify(storage.audit, other)
    assert len(report.problems) == 3 and all("unknown key" in p for p in report.problems)
    assert verify(storage.audit, [other, signer.public_key]).ok


def test_concurrent_appends_stay_one_chain(storage, signer, audit_log):
    errors = []

    def work(t):
        try:
            for i in range(8):
                audit_log.append("svc.event", f"worker-{t}", "bank-a", f"cust-{i}", {"i": i})
        except Exception as exc:  # noqa: BLE001
            errors.append(repr(exc))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    report = _verify(storage, signer, checkpoint_every=5)
    assert report.ok and report.records_checked == 32 and report.head_seq == 32, report.render()


def test_signing_key_file(tmp_path):
    path = tmp_path / "k" / "audit.pem"
    a = AuditSigner.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    b = AuditSigner.load_or_create(path)
    assert a.key_id == b.key_id and a.key_id.startswith("ed25519:")
    assert a.public_key_pem().startswith(b"-----BEGIN PUBLIC KEY-----")


def _forge_next(storage, attacker, details='{"decision":"accept","n":99}'):
    """An attacker's record chained correctly after the last one: SHA-256 needs no key."""
    seq, h, _ = attacker.forge(storage, "face.verify", "teller-app", "bank-a", None, details)
    return seq, h


def _append_is_refused(storage, audit_log, match):
    before = storage.audit.last().seq
    with pytest.raises(AuditIntegrityError, match=match):
        audit_log.append("face.verify", actor="teller-app", tenant_id="bank-a", details={"decision": "accept"})
    assert storage.audit.last().seq == before  # nothing written on top of the altered trail


def test_a_record_forged_at_the_end_is_not_sealed_by_the_next_append(fill, storage, signer, audit_log, attacker):
    """Without the check the service chains its next record onto the forgery and signs a head over
    both: the forged record becomes indistinguishable from a genuine one."""
    fill(audit_log, N)
    seq, _ = _forge_next(storage, attacker)
    _append_is_refused(storage, audit_log, f"seq {seq}.*not covered by the signed head")
    assert "records after the signed head" in _problems_text(_verify(storage, signer))


def test_a_truncated_trail_is_not_resealed_by_the_next_append(fill, storage, signer, audit_log, attacker):
    fill(audit_log, N)
    attacker.execute("DELETE FROM audit_checkpoints WHERE seq > 8")
    attacker.execute("DELETE FROM audit_records WHERE seq > 8")
    _append_is_refused(storage, audit_log, f"signed head is at seq {N}.*ends at seq 8")
    assert "the last record(s) were dropped" in _problems_text(_verify(storage, signer))


def test_a_head_moved_without_the_key_is_not_resealed(fill, storage, signer, audit_log, attacker):
    fill(audit_log, N)
    seq, h = _forge_next(storage, attacker)
    attacker.execute("UPDATE audit_head SET seq = ?, hash = ?", (seq, h))  # the old signature stays
    _append_is_refused(storage, audit_log, "signature")
    attacker.execute("UPDATE audit_head SET key_id = ?", ("ed25519:0000000000000000",))
    _append_is_refused(storage, audit_log, "signed with key")
    attacker.execute("DELETE FROM audit_head")
    _append_is_refused(storage, audit_log, "no signed head")


class _AppendsWhileVerifying:
    """The storage's audit repository, with the services appending ``more`` records the moment
    verify has read the record at ``seq``: what a verify run against a live database meets."""

    def __init__(self, repo, seq, append):
        self._repo, self._seq, self._append = repo, seq, append

    def __getattr__(self, name):
        return getattr(self._repo, name)

    def iter_records(self, from_seq=1, batch=1000):
        for row in self._repo.iter_records(from_seq, batch):
            yield row
            if row.seq == self._seq:
                self._append()


@pytest.mark.parametrize("batch", [4, 1000])
def test_records_appended_while_verifying_are_no_tampering(fill, storage, signer, audit_log, batch):
    fill(audit_log, N)
    live = _AppendsWhileVerifying(storage.audit, N, lambda: fill(audit_log, 3))  # seq 15 has a checkpoint
    report = verify(live, signer.public_key, checkpoint_every=5, batch=batch)
    assert report.ok, report.render()
    assert report.head_seq in (N, N + 3) and report.records_checked == report.head_seq
    assert _verify(storage, signer, checkpoint_every=5).ok


def test_records_appended_after_a_walk_are_checked_up_to_the_head_read_after_them(fill, storage, signer, audit_log,
                                                                                  attacker):
    """verify_after (what `audit templates` judges its "written while checking" by): the records since
    the walk, those appended while it reads them included, link on and end at a signed head."""
    seen: list[AuditRow] = []
    assert verify_after(storage.audit, signer.public_key, None, seen.append).ok and not seen  # empty trail
    fill(audit_log, 2)
    walked = storage.audit.last()
    fill(audit_log, 2)
    live = _AppendsWhileVerifying(storage.audit, 4, lambda: fill(audit_log, 3))
    report = verify_after(live, signer.public_key, walked, seen.append)
    assert report.ok, report.render()
    assert [r.seq for r in seen] == [3, 4, 5, 6, 7] and report.head_seq == 7
    seen.clear()
    assert verify_after(storage.audit, signer.public_key, None, seen.append).ok and len(seen) == 7
    attacker.execute("DELETE FROM audit_head")
    assert "seq 7: there is no signed head" in verify_after(storage.audit, signer.public_key, walked, seen.append).problems


def test_a_changed_audit_key_chains_on_only_once_the_earlier_public_key_is_listed(
        fill, storage, signer, pseudonymizer, tmp_path):
    """A lost key file or a move to the token changes the audit key: the new key must not sign a head
    over a trail it cannot vouch for, until the operator lists the earlier key's public half (whose
    signatures then check the old head), and verify needs both keys afterwards."""
    fill(AuditLog(storage.audit, signer, pseudonymizer, checkpoint_every=5), N)
    new = AuditSigner.load_or_create(tmp_path / "new" / "audit-ed25519.pem")
    _append_is_refused(storage, AuditLog(storage.audit, new, pseudonymizer, checkpoint_every=5),
                       "nor one of audit.previous_public_keys")
    handed_over = AuditLog(storage.audit, new, pseudonymizer, checkpoint_every=5, previous_keys=[signer.public_key])
    fill(handed_over, 3)
    assert storage.audit.head().key_id == new.key_id
    report = verify(storage.audit, [new.public_key, signer.public_key], checkpoint_every=5)
    assert report.ok and report.head_seq == N + 3, report.render()
    assert "signed with unknown key" in _problems_text(verify(storage.audit, new.public_key))


def test_an_unreadable_previous_audit_key_names_the_setting(tmp_path):
    from services.common.audit.log import previous_audit_keys
    from services.common.config import CommonSettings

    bad = tmp_path / "old.pem"
    bad.write_text("not a key")
    settings = CommonSettings(data_dir=tmp_path, audit={"previous_public_keys": [bad]})
    with pytest.raises(ValueError, match="audit.previous_public_keys: .*old.pem"):
        previous_audit_keys(settings)


def test_a_record_whose_time_cannot_be_read_is_reported_not_a_crash(tmp_path, signer, pseudonymizer, fill):
    """SQLite keeps the time as text: an attacker's unparseable value stopped verify with a traceback
    instead of a report. (PostgreSQL's timestamptz cannot hold one.)"""
    import sqlite3

    from services.common.storage import open_storage

    path = tmp_path / "audit.db"
    storage = open_storage(f"sqlite:///{path}")
    try:
        fill(AuditLog(storage.audit, signer, pseudonymizer, checkpoint_every=5), N)
        conn = sqlite3.connect(path)
        conn.execute("DROP TRIGGER IF EXISTS audit_records_no_update")
        conn.execute("UPDATE audit_records SET ts = 'yesterday' WHERE seq = 4")
        conn.commit()
        conn.close()
        report = _verify(storage, signer)
        assert not report.ok and "the record after seq 3 cannot be read" in _problems_text(report), report.render()
    finally:
        storage.close()


@pytest.mark.parametrize("event_type, index", [("audit.key_introduced", "audit_records_key_introduced"),
                                               ("audit.key_destroyed", "audit_records_key_destroyed")])
def test_the_key_introductions_are_found_through_an_index_not_a_scan_of_the_trail(storage, audit_log, fill,
                                                                                   event_type, index):
    """A service looks the introductions up under the audit lock the first time it meets a head signed
    by a new key: on a year's trail (1,000,000 records) PostgreSQL scanned every record (~0.1 s of
    every append stalled) and SQLite every checkpoint (bench/audit_keys.py). The plan must use the
    partial index of the introductions (PostgreSQL told not to scan: a test table is small enough
    that it would). So must the destructions, which every service looks up each audit.key_check_s."""
    from services.common.storage.audit import checkpointed_sql

    fill(audit_log, 12)
    db = storage.audit._db
    with db.read() as s:
        if s.dialect.sql("?") == "?":
            plan = " | ".join(str(r[-1]) for r in s.all("EXPLAIN QUERY PLAN " + checkpointed_sql(event_type)))
        else:
            s.execute("SET LOCAL enable_seqscan = off")
            plan = " | ".join(str(r[0]) for r in s.all("EXPLAIN " + checkpointed_sql(event_type)))
    assert index in plan, plan
