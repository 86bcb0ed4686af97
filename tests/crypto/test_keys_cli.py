"""`biogate keys ...` handlers, called as services/cli.py calls them."""

import argparse
import json

import pytest

from services.common.audit import AuditSigner, verify
from services.common.crypto import EnvelopeCrypto, LocalKeyring, TemplateBinding, envelope_key_id, open_keyring
from services.commands import keys as keys_cli
from services.common.storage import TemplateRecord, open_storage


def _parse(argv):
    parser = argparse.ArgumentParser(prog="biogate")
    keys_cli.register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def _run(settings, argv) -> int:
    args = _parse(argv)
    return args.func(settings, args)


def test_keys_commands_end_to_end(settings, capsys):
    assert _run(settings, ["keys", "init"]) == 0
    assert "created" in capsys.readouterr().out
    assert _run(settings, ["keys", "init"]) == 0
    assert "exists" in capsys.readouterr().out

    keyring = open_keyring(settings)
    first = keyring.primary_key_id()
    crypto = EnvelopeCrypto(keyring)
    b = TemplateBinding("bank-a", "cust-1", "face", "arcface-r100")
    env = crypto.encrypt_template(b, b"template")
    storage = open_storage(settings.storage_dsn)
    storage.templates.put(TemplateRecord("bank-a", "cust-1", "face", "arcface-r100", "", env, envelope_key_id(env), 1))
    storage.subjects.set_phone("bank-a", "cust-1", crypto.encrypt_contact("bank-a", "cust-1", "+8613800138000"), first)

    assert _run(settings, ["keys", "list"]) == 0
    out = capsys.readouterr().out
    assert first in out and "yes" in out and out.rstrip().endswith("2")

    assert _run(settings, ["keys", "retire", first]) == 1
    assert "still wraps 2 record(s)" in capsys.readouterr().err

    assert _run(settings, ["keys", "rotate", "--cipher", "SM4-GCM", "--batch", "1"]) == 0
    out = capsys.readouterr().out
    new = open_keyring(settings).primary_key_id()  # the CLI rotated in its own keyring instance
    assert new != first and f"new primary key {new}" in out and "1 templates and 1 phone numbers" in out

    assert _run(settings, ["keys", "retire", first]) == 0
    assert f"retired key {first}" in capsys.readouterr().out
    rec = storage.templates.get("bank-a", "cust-1", "face", "arcface-r100")
    assert crypto.decrypt_template(b, rec.envelope) == b"template"

    # Key operations are in the audit trail, and the trail verifies.
    events = [(r.event_type, json.loads(r.details).get("key")) for r in storage.audit.iter_records()]
    assert events == [("keys.added", "audit-signing"),  # `keys init` on a new deployment makes every key
                      ("keys.adding", "kek"), ("keys.adding", "pseudonym"), ("keys.added", "kek"),
                      ("keys.added", "pseudonym"),
                      ("keys.adding", "kek"), ("keys.added", "kek"), ("keys.rotate", None), ("keys.retire", None)]
    assert verify(storage.audit, AuditSigner.load(settings.audit_signing_key_file).public_key).ok
    storage.close()


def test_list_flags_records_under_a_key_the_keyring_lost(settings, capsys, tmp_path):
    storage = open_storage(settings.storage_dsn)
    foreign = EnvelopeCrypto(LocalKeyring(tmp_path / "elsewhere.json"))
    env = foreign.encrypt_template(TemplateBinding("bank-a", "c", "face", "m"), b"x")
    storage.templates.put(TemplateRecord("bank-a", "c", "face", "m", "", env, envelope_key_id(env), 1))
    storage.close()
    assert _run(settings, ["keys", "init"]) == 0
    assert _run(settings, ["keys", "list"]) == 1
    assert "MISSING" in capsys.readouterr().out


def test_retire_unknown_key(settings, capsys):
    _run(settings, ["keys", "init"])
    assert _run(settings, ["keys", "retire", "k-nope"]) == 1
    assert "not in the keyring" in capsys.readouterr().err


def test_subcommand_is_required():
    with pytest.raises(SystemExit):
        _parse(["keys"])


def test_rotation_rewraps_voice_replay_fingerprints_and_retire_waits_for_any_left(settings, capsys):
    """The replay cache seals each accepted capture's fingerprint under the primary of the day and keeps
    it voice.replay_retention_s. Rotation re-wrapped templates and phone numbers only, and retire
    counted only those: retiring the old key made every voice verification of a subject with a
    retained capture fail (the key gone) until the capture expired."""
    import numpy as np

    from services.voice.replay import DatabaseReplayStore, Fingerprint, ReplayCache
    from tests.crypto.conftest import Pinned

    assert _run(settings, ["keys", "init"]) == 0
    keyring = open_keyring(settings)
    first = keyring.primary_key_id()
    storage = open_storage(settings.storage_dsn)
    store = DatabaseReplayStore(storage, settings.voice.replay_retention_s, 20)

    def cache(crypto):
        return ReplayCache(store, crypto.seal, crypto.open, lambda tenant, subject: f"ps_{subject}")

    fp = Fingerprint(np.random.default_rng(0).integers(-60, 60, (32, 200)).astype(np.int8))
    cache(EnvelopeCrypto(keyring)).remember("bank-a", "cust-1", fp)
    assert _run(settings, ["keys", "rotate"]) == 0
    assert "0 templates, 0 phone numbers and 1 voice replay fingerprint(s)" in capsys.readouterr().out
    new = open_keyring(settings).primary_key_id()
    assert store.key_usage() == {new: 1}

    # A capture accepted just before the rotation added the new primary, stored after its last pass.
    cache(EnvelopeCrypto(Pinned(keyring, first))).remember("bank-a", "cust-2", fp)
    assert _run(settings, ["keys", "retire", first]) == 1
    err = capsys.readouterr().err
    assert f"key {first!r} still seals 1 voice replay fingerprint(s)" in err and "voice.replay_retention_s" in err
    assert _run(settings, ["keys", "rewrap"]) == 0
    assert _run(settings, ["keys", "retire", first]) == 0
    for subject in ("cust-1", "cust-2"):  # the voice service still reads every one
        assert cache(EnvelopeCrypto(open_keyring(settings))).best_match("bank-a", subject, fp) > 0.99
    storage.close()
