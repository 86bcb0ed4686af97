"""`biogate audit ...` handlers, called as services/cli.py calls them."""

import argparse

import pytest

from services.common.audit import AuditLog
from services.commands import audit as audit_cli
from services.common.config import load_config
from services.common.crypto import open_keyring
from services.common.storage import open_storage


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
    assert _run(settings, ["audit", "export-public-key", "--out", str(pub)]) == 0
    assert pub.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")

    storage = open_storage(settings.storage_dsn)
    log = AuditLog.from_settings(settings, storage, open_keyring(settings))
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
