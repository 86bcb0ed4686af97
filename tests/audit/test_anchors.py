"""Anchors read back from the write-once store are authenticated (services/common/audit/anchor.py):
each vouches for its (seq, hash) only with the audit key's signature over exactly that, current key
or an earlier one; real storage (SQLite and PostgreSQL) and a real directory store."""

from __future__ import annotations

import json
import os

from services.common.audit import AuditLog, AuditSigner, verify
from services.common.audit.anchor import DirectoryStore, anchor, anchored


def _legacy(store_dir, name: str) -> None:
    """The anchor as versions before the checkpoint's time was anchored wrote it."""
    path = store_dir / name
    doc = json.loads(path.read_bytes())
    doc.pop("ts")
    os.chmod(path, 0o644)
    path.write_text(json.dumps(doc))


def test_anchors_of_an_earlier_audit_key_and_from_before_the_checkpoint_time_was_kept_verify(
        storage, signer, pseudonymizer, fill, tmp_path):
    worm = tmp_path / "worm"
    store = DirectoryStore(worm)
    fill(AuditLog(storage.audit, signer, pseudonymizer, checkpoint_every=5), 6)
    assert anchor(storage.audit, store, signer.public_key).problems == []
    assert json.loads((worm / "checkpoint-000000000005.json").read_bytes())["ts"]  # self-contained
    assert "ts" not in json.loads((worm / "head-000000000006.json").read_bytes())

    new = AuditSigner.load_or_create(tmp_path / "new" / "audit-ed25519.pem")  # the key changed
    fill(AuditLog(storage.audit, new, pseudonymizer, checkpoint_every=5, previous_keys=[signer.public_key]), 5)
    keys = [new.public_key, signer.public_key]
    report = anchor(storage.audit, store, keys)
    assert report.problems == [] and report.written == ["checkpoint-000000000010.json", "head-000000000011.json"]

    _legacy(worm, "checkpoint-000000000005.json")
    found = anchored(store, keys, storage.audit)  # its time is taken from the database's checkpoint
    assert found.problems == []
    vouched = dict(found.checkpoints)
    assert sorted(vouched) == [5, 6, 10, 11]
    assert vouched[5] == storage.audit.checkpoints()[0].hash and vouched[11] == storage.audit.head().hash
    assert verify(storage.audit, keys, known_checkpoints=found.checkpoints).ok

    # Without the earlier key its anchors vouch for nothing, and say why.
    only_new = anchored(store, [new.public_key], storage.audit)
    assert sorted(seq for seq, _ in only_new.checkpoints) == [10, 11]
    assert any(p.startswith("checkpoint-000000000005.json: signed with unknown key") and
               "audit.previous_public_keys" in p for p in only_new.problems)
    # Without the database (or with its checkpoint gone) a legacy anchor cannot be authenticated.
    assert any(p.startswith("checkpoint-000000000005.json: written without its checkpoint's time")
               for p in anchored(store, keys).problems)


def test_a_legacy_anchors_time_is_read_from_its_one_checkpoint(storage, signer, pseudonymizer, fill, tmp_path,
                                                               attacker, monkeypatch):
    """A multi-year trail has millions of checkpoints: an anchor without its time reads the one it needs."""
    worm = tmp_path / "worm"
    store = DirectoryStore(worm)
    fill(AuditLog(storage.audit, signer, pseudonymizer, checkpoint_every=5), 11)
    assert anchor(storage.audit, store, signer.public_key).problems == []
    _legacy(worm, "checkpoint-000000000005.json")
    _legacy(worm, "checkpoint-000000000010.json")

    def everything():
        raise AssertionError("every checkpoint read at once")

    monkeypatch.setattr(storage.audit, "checkpoints", everything)
    found = anchored(store, signer.public_key, storage.audit, full=True)
    assert found.problems == [] and sorted(seq for seq, _ in found.checkpoints) == [5, 10, 11]
    attacker.execute("DELETE FROM audit_checkpoints WHERE seq = 5")  # the next one is not its time
    assert [p.split(":")[0] for p in anchored(store, signer.public_key, storage.audit).problems] == [
        "checkpoint-000000000005.json"]


def test_an_anchor_copied_under_another_seqs_name_vouches_for_nothing(storage, signer, pseudonymizer, fill,
                                                                      tmp_path):
    worm = tmp_path / "worm"
    store = DirectoryStore(worm)
    fill(AuditLog(storage.audit, signer, pseudonymizer, checkpoint_every=5), 6)
    anchor(storage.audit, store, signer.public_key)
    (worm / "checkpoint-000000000007.json").write_bytes((worm / "checkpoint-000000000005.json").read_bytes())
    found = anchored(store, signer.public_key, storage.audit)
    assert [p.split(":")[0] for p in found.problems] == ["checkpoint-000000000007.json"]
    assert "names a checkpoint at seq 5" in found.problems[0]
    assert sorted(seq for seq, _ in found.checkpoints) == [5, 6]


def _tamper(store_dir, name: str, **changed) -> None:
    path = store_dir / name
    doc = {**json.loads(path.read_bytes()), **changed}
    os.chmod(path, 0o644)
    path.write_text(json.dumps(doc))


def test_reading_anchors_back_checks_only_the_signatures_that_decide_and_a_full_check_checks_all(
        storage, signer, pseudonymizer, fill, tmp_path, attacker):
    """A year of anchors is ~35,000 signatures to check on each `audit anchor` and `verify --anchors`
    (seconds; bench/anchors.py): one the trail agrees with is left to a sample. What the anchors
    prove stays: a forged anchor that would vouch for another hash, and a rollback, are caught with
    no sample at all; a forged anchor that agrees with the trail, by a full check."""
    worm = tmp_path / "worm"
    store = DirectoryStore(worm)
    log = AuditLog(storage.audit, signer, pseudonymizer, checkpoint_every=5)
    fill(log, 11)
    assert anchor(storage.audit, store, signer.public_key).problems == []
    _tamper(worm, "checkpoint-000000000005.json", signature="00" * 64)  # agrees with the trail, not signed
    _tamper(worm, "checkpoint-000000000010.json", hash="0" * 64)  # vouches for another hash
    forged_head = {"kind": "head", "seq": 3, "hash": "1" * 64, "key_id": signer.key_id, "signature": "00" * 64}
    (worm / "head-000000000003.json").write_text(json.dumps(forged_head))

    fast = anchored(store, signer.public_key, storage.audit, sample=0)
    assert [p.split(":")[0] for p in fast.problems] == ["checkpoint-000000000010.json", "head-000000000003.json"]
    assert all("bad signature" in p for p in fast.problems)
    assert sorted(seq for seq, _ in fast.checkpoints) == [5, 11]
    full = anchored(store, signer.public_key, storage.audit, full=True)
    assert [p.split(":")[0] for p in full.problems] == ["checkpoint-000000000005.json", "checkpoint-000000000010.json",
                                                        "head-000000000003.json"]
    assert sorted(seq for seq, _ in full.checkpoints) == [11]
    report = anchor(storage.audit, store, signer.public_key, sample=0)
    assert [p.split(":")[0] for p in report.problems] == ["checkpoint-000000000010.json"]
    assert [p.split(":")[0] for p in anchor(storage.audit, store, signer.public_key, full=True).problems] == [
        "checkpoint-000000000005.json", "checkpoint-000000000010.json"]

    # Rolled back to seq 7 and written on: the anchors the trail now contradicts are authenticated and
    # vouch for the old hashes, with no sample.
    kept = storage.audit.hashes([11])[11]
    attacker.execute("DELETE FROM audit_checkpoints WHERE seq > 7")
    attacker.execute("DELETE FROM audit_records WHERE seq > 7")
    attacker.execute("DELETE FROM audit_head")
    found = anchored(store, signer.public_key, storage.audit, sample=0)
    assert (11, kept) in found.checkpoints
    assert not verify(storage.audit, signer.public_key, known_checkpoints=found.checkpoints).ok


def test_the_hashes_of_the_records_at_given_seqs(storage, signer, pseudonymizer, fill):
    fill(AuditLog(storage.audit, signer, pseudonymizer, checkpoint_every=5), 1200)
    rows = {r.seq: r.hash for r in storage.audit.iter_records()}
    wanted = [1, 600, 1200, 1201, 0, *range(2, 1100, 2)]  # more than one statement's worth
    assert storage.audit.hashes(wanted) == {s: rows[s] for s in wanted if s in rows}
