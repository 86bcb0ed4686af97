"""`biogate audit ...` handlers, called as services/cli.py calls them."""

import argparse

import pytest

from services.common.audit import AuditLog
from services.commands import audit as audit_cli
from services.settings import load_config
from services.common.crypto import open_keyring
from services.common.crypto.backend import open_audit_signer
from services.common.storage import open_storage


def _log(settings, storage) -> AuditLog:
    """The keys made directly, unaudited: this file checks the chain and the commands over it, and
    counts its records; tests/crypto/test_key_audit.py checks that the services audit key creation."""
    open_audit_signer(settings)
    return AuditLog.from_settings(settings, storage, open_keyring(settings))


def _run(settings, argv) -> int:
    parser = argparse.ArgumentParser(prog="biogate")
    audit_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(settings, args)


@pytest.fixture
def cli_settings(tmp_path, storage_dsn):
    return load_config(None, data_dir=str(tmp_path / "data"), storage={"dsn": storage_dsn}, audit={"checkpoint_every": 3})


def test_verify_export_and_tamper(cli_settings, attacker, tmp_path, capsys):
    settings = cli_settings
    assert _run(settings, ["audit", "verify"]) == 2  # no key yet: nothing to verify with
    assert "no public key" in capsys.readouterr().err

    pub = tmp_path / "audit.pub.pem"
    assert _run(settings, ["audit", "export-public-key", "--out", str(pub)]) == 2  # it makes no key
    assert "no audit signing key" in capsys.readouterr().err and not pub.exists()

    storage = open_storage(settings.storage_dsn)
    log = _log(settings, storage)
    assert _run(settings, ["audit", "export-public-key", "--out", str(pub)]) == 0
    assert pub.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    for i in range(7):
        log.append("face.verify", "svc", "bank-a", f"cust-{i}", {"decision": "accept"})

    assert _run(settings, ["audit", "verify", "--public-key", str(pub)]) == 0
    assert "audit trail: OK; 7 records, 2 checkpoints, head at seq 7" in capsys.readouterr().out

    assert _run(settings, ["audit", "export-checkpoints"]) == 0
    shipped = tmp_path / "checkpoints.txt"
    shipped.write_text(capsys.readouterr().out)
    assert [line.split()[0] for line in shipped.read_text().splitlines()] == ["3", "6"]

    attacker.execute("DELETE FROM audit_checkpoints WHERE seq = 6")
    attacker.execute("DELETE FROM audit_records WHERE seq >= 6")
    attacker.execute("DELETE FROM audit_head")
    assert _run(settings, ["audit", "verify", "--checkpoints", str(shipped), "--checkpoint-every", "0"]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "seq 5: there is no signed head" in out
    assert "seq 6: an externally kept checkpoint is beyond the end of the trail" in out
    storage.close()


def _enrolled_subject(settings, storage, log) -> None:
    """What an enrolment leaves: a consent and a template, each written with its audit record."""
    from services.common.storage import ConsentRecord, TemplateRecord

    with storage.transaction():
        storage.subjects.record_consent(ConsentRecord("bank-a", "cust-1", "biometric_verification", ("face",), "v1"))
        log.append("consent.recorded", "svc", "bank-a", "cust-1", {"purpose": "biometric_verification"})
    with storage.transaction():
        storage.templates.put(TemplateRecord("bank-a", "cust-1", "face", "m-1", "", b"sealed", "k1", 1))
        log.append("face.enrolled", "svc", "bank-a", "cust-1", {"model_id": "m-1"})


def test_a_wiped_trail_fails_while_audited_data_remains(cli_settings, attacker, capsys):
    settings = cli_settings
    storage = open_storage(settings.storage_dsn)
    log = _log(settings, storage)
    assert _run(settings, ["audit", "verify"]) == 0  # a new database: nothing written, nothing to audit
    _enrolled_subject(settings, storage, log)
    assert _run(settings, ["audit", "verify"]) == 0
    capsys.readouterr()
    for table in ("audit_head", "audit_checkpoints", "audit_records"):
        attacker.execute(f"DELETE FROM {table}")
    assert _run(settings, ["audit", "verify"]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "the trail is empty while the database holds 1 templates, 1 consents" in out
    storage.close()


def _seven_records(settings):
    """(storage, log, the head of seq 7): the head an attacker keeps to roll back to."""
    storage = open_storage(settings.storage_dsn)
    log = _log(settings, storage)
    for i in range(7):
        log.append("face.verify", "svc", "bank-a", f"cust-{i}", {"decision": "accept"})
    return storage, log, storage.audit.head()


def _roll_back_to(attacker, head) -> None:
    attacker.execute("DELETE FROM audit_checkpoints WHERE seq > ?", (head.seq,))
    attacker.execute("DELETE FROM audit_records WHERE seq > ?", (head.seq,))
    attacker.execute("UPDATE audit_head SET seq = ?, hash = ?, signature = ?, key_id = ?",
                     (head.seq, head.hash, bytes(head.signature), head.key_id))


def test_anchors_are_write_once_and_expose_a_rollback_to_an_old_head_and_a_wipe(cli_settings, attacker, tmp_path,
                                                                                 capsys):
    import os
    import stat

    from services.common.audit.anchor import DirectoryStore

    settings = cli_settings  # a checkpoint every 3 records
    storage, log, old_head = _seven_records(settings)
    anchors = tmp_path / "worm"
    assert _run(settings, ["audit", "anchor", "--to", str(anchors)]) == 0
    names = sorted(os.listdir(anchors))
    assert names == ["checkpoint-000000000003.json", "checkpoint-000000000006.json", "head-000000000007.json"]
    assert all(stat.S_IMODE((anchors / n).stat().st_mode) == 0o444 for n in names)
    with pytest.raises(FileExistsError):  # an anchor is never replaced
        DirectoryStore(anchors).put(names[-1], b"{}")
    for i in range(3):
        log.append("face.verify", "svc", "bank-a", f"cust-{i}", {"decision": "reject"})
    assert _run(settings, ["audit", "anchor", "--to", str(anchors)]) == 0
    assert set(os.listdir(anchors)) - set(names) == {"checkpoint-000000000009.json", "head-000000000010.json"}
    capsys.readouterr()

    # The attacker rolls the trail back to the head of seq 7 they kept: it verifies on its own...
    _roll_back_to(attacker, old_head)
    assert _run(settings, ["audit", "verify"]) == 0
    # ...not against the anchors
    assert _run(settings, ["audit", "verify", "--anchors", str(anchors)]) == 1
    assert "seq 10: an externally kept checkpoint is beyond the end of the trail (truncated)" in capsys.readouterr().out
    for table in ("audit_head", "audit_checkpoints", "audit_records"):
        attacker.execute(f"DELETE FROM {table}")
    assert _run(settings, ["audit", "verify", "--anchors", str(anchors)]) == 1
    storage.close()


def test_an_anchors_directory_that_is_missing_or_not_written_to_is_no_pass(cli_settings, storage_dsn, tmp_path,
                                                                           capsys):
    """Before, `--anchors DIR` naming a missing directory, or one that holds no anchor, checked
    nothing and passed: a CronJob mounting the wrong or an empty claim would pass for ever, and a
    rollback with it. A missing directory is a usage error; a checkpoint older than
    audit.anchor_max_age_s that no anchor reaches is a finding, a fresh one (the first anchor run
    still to come) is not."""
    settings = cli_settings  # a checkpoint every 3 records
    storage, log, _ = _seven_records(settings)  # checkpoints at 3 and 6, head at 7
    missing = tmp_path / "not-mounted"
    last = storage.audit.last().seq
    for argv in (["verify"], ["templates", "--attest-legacy"], ["destroy-key", "ed25519:0123456789abcdef"]):
        assert _run(settings, ["audit", *argv, "--anchors", str(missing)]) == 2, argv
        err = capsys.readouterr().err
        assert f"--anchors {missing}: no such directory" in err and "nothing was checked" in err
    assert not missing.exists() and storage.audit.last().seq == last

    empty = tmp_path / "empty"
    empty.mkdir()
    assert _run(settings, ["audit", "verify", "--anchors", str(empty)]) == 0  # checkpoints younger than an hour
    capsys.readouterr()
    aged = load_config(None, data_dir=str(settings.data_dir), storage={"dsn": storage_dsn},
                       audit={"checkpoint_every": 3, "anchor_max_age_s": 0})  # as if they were older
    for argv in (["verify"], ["templates"]):
        assert _run(aged, ["audit", *argv, "--anchors", str(empty)]) == 1, argv
        out = capsys.readouterr().out
        assert f"{empty}: no anchor reaches the checkpoint at seq 6" in out
        assert "the directory holds no anchor of this trail" in out

    assert _run(aged, ["audit", "anchor", "--to", str(empty)]) == 0
    assert _run(aged, ["audit", "verify", "--anchors", str(empty)]) == 0
    for i in range(3):  # the anchor runs stop: the checkpoint at seq 9 is never anchored
        log.append("face.verify", "svc", "bank-a", f"cust-{i}", {"decision": "reject"})
    capsys.readouterr()
    assert _run(aged, ["audit", "verify", "--anchors", str(empty)]) == 1
    out = capsys.readouterr().out
    assert f"{empty}: no anchor reaches the checkpoint at seq 9" in out and "the newest anchor is at seq 7" in out
    storage.close()


def test_anchoring_a_rolled_back_or_unsigned_trail_is_refused(cli_settings, attacker, tmp_path, capsys):
    """`audit anchor` runs periodically: it is where a rollback shows first, and what it copies to
    the write-once store can never be taken back, so it copies only what the audit key signed."""
    import os

    settings = cli_settings  # a checkpoint every 3 records
    storage, log, old_head = _seven_records(settings)
    for i in range(3):
        log.append("face.verify", "svc", "bank-a", f"cust-{i}", {"decision": "reject"})
    anchors = tmp_path / "worm"
    assert _run(settings, ["audit", "anchor", "--to", str(anchors)]) == 0
    capsys.readouterr()

    # Rolled back to the kept head of seq 7; the services go on appending onto it (it is genuinely signed).
    _roll_back_to(attacker, old_head)
    for i in range(4):
        log.append("face.verify", "svc", "bank-a", f"cust-{i}", {"decision": "accept"})
    names = set(os.listdir(anchors))
    assert _run(settings, ["audit", "anchor", "--to", str(anchors)]) == 1
    out = capsys.readouterr().out
    assert "checkpoint-000000000009.json: the database's checkpoint at seq 9 has another hash" in out
    assert "head-000000000010.json" not in out  # the head moved on to 11: no anchor at seq 10 is compared
    assert set(os.listdir(anchors)) - names == {"head-000000000011.json"}  # what is signed is still anchored

    # A head the key did not sign is never anchored.
    log.append("face.verify", "svc", "bank-a", "cust-9", {"decision": "accept"})
    head = storage.audit.head()
    attacker.execute("UPDATE audit_head SET signature = ?", (bytes(64),))
    assert _run(settings, ["audit", "anchor", "--to", str(anchors)]) == 1
    assert f"head at seq {head.seq}: bad signature; not anchored" in capsys.readouterr().out
    assert f"head-{head.seq:012d}.json" not in os.listdir(anchors)
    storage.close()


def _rewrite(anchors, name: str, **changed) -> None:
    """Someone (or a storage fault) changes an anchor in the write-once store."""
    import json
    import os

    path = anchors / name
    doc = {**json.loads(path.read_bytes()), **changed}
    os.chmod(path, 0o644)
    path.write_text(json.dumps(doc))


def _plant(anchors, name: str, doc: dict) -> None:
    import json

    (anchors / name).write_text(json.dumps(doc))


def test_a_forged_or_corrupted_anchor_is_a_finding_of_its_own_not_a_rollback(cli_settings, tmp_path, capsys):
    """Anchors were read back without their signatures checked: an anchor file changed in the store
    made `audit verify --anchors` and `audit anchor` report a rollback of a trail nobody touched."""
    settings = cli_settings  # a checkpoint every 3 records
    storage, _, _ = _seven_records(settings)
    anchors = tmp_path / "worm"
    assert _run(settings, ["audit", "anchor", "--to", str(anchors)]) == 0
    capsys.readouterr()
    _rewrite(anchors, "checkpoint-000000000006.json", hash="0" * 64)  # a forged hash under the old signature
    _plant(anchors, "head-000000000005.json",  # an anchor nobody signed
           {"kind": "head", "seq": 5, "hash": "1" * 64, "key_id": "ed25519-forged", "signature": "00" * 64})
    _plant(anchors, "checkpoint-000000000003.json.bak", {})  # not an anchor's name: ignored

    assert _run(settings, ["audit", "verify", "--anchors", str(anchors)]) == 1
    out = capsys.readouterr().out
    assert "does not match the externally kept checkpoint" not in out  # no rollback is claimed
    assert "checkpoint-000000000006.json: bad signature; not the audit key's anchor (forged or corrupted)" in out
    assert "head-000000000005.json: signed with unknown key 'ed25519-forged'" in out
    assert "records, 2 checkpoints, head at seq 7" in out

    assert _run(settings, ["audit", "anchor", "--to", str(anchors)]) == 1
    out = capsys.readouterr().out
    assert "rolled back" not in out
    assert "checkpoint-000000000006.json: bad signature; not the audit key's anchor (forged or corrupted)" in out
    storage.close()


def _anchored_then_rolled_back(settings, attacker, anchors, more: int, rewritten: int):
    """Seven records and ``more``, anchored; then rolled back to seq 7 and ``rewritten`` records
    appended by the services onto it (signed: the key signs what follows a genuine head)."""
    storage, log, old_head = _seven_records(settings)
    for i in range(more):
        log.append("face.verify", "svc", "bank-a", f"cust-{i}", {"decision": "reject"})
    assert _run(settings, ["audit", "anchor", "--to", str(anchors)]) == 0
    _roll_back_to(attacker, old_head)
    for i in range(rewritten):
        log.append("face.verify", "svc", "bank-a", f"cust-{i}", {"decision": "accept"})
    return storage


def test_a_forged_anchor_is_never_a_known_checkpoint(cli_settings, attacker, tmp_path, capsys):
    """The attacker who rolled the trail back and let the services write on, and who can add a file
    to the anchor store, adds one vouching for the rewritten seq: it must not be trusted."""
    settings = cli_settings  # a checkpoint every 3 records
    anchors = tmp_path / "worm"
    storage = _anchored_then_rolled_back(settings, attacker, anchors, 2, 2)  # anchored: checkpoints 3, 6, 9; head 9
    rewritten = storage.audit.head()
    assert rewritten.seq == 9
    import os

    for name in ("checkpoint-000000000009.json", "head-000000000009.json"):  # the genuine ones go
        os.chmod(anchors / name, 0o644)
        (anchors / name).unlink()
    _plant(anchors, "head-000000000009.json", {"kind": "head", "seq": 9, "hash": rewritten.hash,
                                               "key_id": rewritten.key_id, "signature": "00" * 64})
    capsys.readouterr()
    assert _run(settings, ["audit", "verify", "--anchors", str(anchors)]) == 1
    out = capsys.readouterr().out
    assert "head-000000000009.json: bad signature; not the audit key's anchor (forged or corrupted)" in out
    storage.close()


def test_two_signed_anchors_at_one_seq_that_disagree_are_a_rollback(cli_settings, attacker, tmp_path, capsys):
    """A rollback the services signed on can leave the key's signature on two hashes at one seq (the
    old checkpoint anchored, then the new head): either one that differs from the trail is a finding,
    whichever file is read last, and `audit anchor` never adds the contradicting one."""
    import os

    settings = cli_settings
    anchors = tmp_path / "worm"
    storage = _anchored_then_rolled_back(settings, attacker, anchors, 3, 2)  # anchored: checkpoints 3, 6, 9; head 10
    capsys.readouterr()
    assert _run(settings, ["audit", "anchor", "--to", str(anchors)]) == 1
    out = capsys.readouterr().out
    assert "checkpoint-000000000009.json: the database's checkpoint at seq 9 has another hash" in out
    assert "head-000000000009.json" not in os.listdir(anchors)  # the contradiction is not anchored
    assert _run(settings, ["audit", "verify", "--anchors", str(anchors)]) == 1
    assert "seq 9: does not match the externally kept checkpoint" in capsys.readouterr().out
    storage.close()


def test_export_checkpoints_and_verify_never_read_every_checkpoint_at_once(cli_settings, capsys, monkeypatch):
    """A multi-year trail has millions of checkpoints: both commands read them a batch at a time."""
    settings = cli_settings  # a checkpoint every 3 records
    storage, _, _ = _seven_records(settings)

    def everything(self):
        raise AssertionError("every checkpoint read at once")

    monkeypatch.setattr(type(storage.audit), "checkpoints", everything)
    storage.close()
    assert _run(settings, ["audit", "export-checkpoints"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == ["3", "6"]
    assert _run(settings, ["audit", "verify"]) == 0
    assert "audit trail: OK; 7 records, 2 checkpoints, head at seq 7" in capsys.readouterr().out


def test_a_forged_checkpoint_line_is_a_finding_of_its_own_never_a_known_checkpoint(cli_settings, tmp_path, capsys):
    """`verify --checkpoints` took every 'SEQ HASH' line on trust: a line edited (or added) in the
    file reported a rollback or a truncation that never happened, and could stand in for a genuine one.
    Each line's signature is checked now, as an anchor's is."""
    settings = cli_settings  # a checkpoint every 3 records
    storage, log, _ = _seven_records(settings)
    assert _run(settings, ["audit", "export-checkpoints"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["3", "6"]
    kept = tmp_path / "checkpoints.txt"
    kept.write_text("\n".join(lines) + "\n")
    assert _run(settings, ["audit", "verify", "--checkpoints", str(kept)]) == 0
    capsys.readouterr()

    seq, hash_, ts, key_id, signature = lines[1].split()
    edited = f"{seq} {'0' * 64} {ts} {key_id} {signature}"  # the signature no longer covers it
    beyond = f"40 {hash_} {ts} {key_id} {signature}"  # a checkpoint past the end: a truncation?
    plain = f"{lines[0].split()[0]} {'1' * 64}"  # the bare form, which nothing authenticates
    kept.write_text("\n".join([lines[0], edited, beyond, plain]) + "\n")
    assert _run(settings, ["audit", "verify", "--checkpoints", str(kept)]) == 1
    out = capsys.readouterr().out
    assert "checkpoints.txt line 2: bad signature; not the audit key's checkpoint (forged or corrupted), not used as " \
           "a checkpoint" in out
    assert "checkpoints.txt line 3: bad signature" in out
    assert "checkpoints.txt line 4: not 'SEQ HASH TS KEY_ID SIGNATURE'" in out
    assert "externally kept checkpoint" not in out  # no rollback, no truncation: only the file's own findings
    storage.close()


def test_a_full_anchor_check_finds_a_forged_anchor_the_trail_agrees_with(cli_settings, tmp_path, capsys,
                                                                          monkeypatch):
    """By default a run checks only a sample of the signatures of anchors the trail agrees with
    (services/common/audit/anchor.py; here none): `--full-anchor-check` checks them all."""
    from services.common.audit import anchor as anchor_module

    settings = cli_settings  # a checkpoint every 3 records
    storage, _, _ = _seven_records(settings)
    anchors = tmp_path / "worm"
    assert _run(settings, ["audit", "anchor", "--to", str(anchors)]) == 0
    _rewrite(anchors, "checkpoint-000000000003.json", signature="00" * 64)
    monkeypatch.setattr(anchor_module, "SAMPLE", 0)
    capsys.readouterr()
    assert _run(settings, ["audit", "verify", "--anchors", str(anchors)]) == 0
    assert _run(settings, ["audit", "anchor", "--to", str(anchors)]) == 0
    assert "checkpoint-000000000003.json" not in capsys.readouterr().out
    for command in (["verify", "--anchors"], ["anchor", "--to"]):
        assert _run(settings, ["audit", *command, str(anchors), "--full-anchor-check"]) == 1
        assert "checkpoint-000000000003.json: bad signature; not the audit key's anchor" in capsys.readouterr().out
    storage.close()
