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
