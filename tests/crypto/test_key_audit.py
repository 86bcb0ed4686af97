"""Key events in the audit trail, and the primary a running service seals under, on every key store
(file, SoftHSM2 token) and database (SQLite, PostgreSQL), through `biogate keys ...` in this
process and in others."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import textwrap

import pytest
import yaml

from services.cli import main as biogate
from services.common.audit import verify
from services.common.config import PROJECT_ROOT
from services.common.crypto import EnvelopeCrypto, TemplateBinding, envelope_key_id, hsm, open_keyring
from services.common.crypto.backend import open_audit_signer
from services.common.crypto.keyring import ENV_VAR, LocalKeyring
from services.common.crypto.rotation import key_usage
from services.common.storage import TemplateRecord, open_storage
from services.settings import load_config
from tests.conftest import present
from tests.crypto.conftest import Pinned

# Everything a key record may say: kinds, ids, ciphers and algorithms, counts, outcomes, error class names.
KEY_DETAILS = {"key", "key_id", "cipher", "algorithm", "purpose", "backend", "outcome", "templates_rewrapped",
               "phones_rewrapped", "others_rewrapped", "failures", "error"}


@pytest.fixture
def deployment(backend, storage_dsn, tmp_path):
    """The configuration file every process of one deployment reads: its key store and database."""
    config = tmp_path / "biogate.yaml"
    config.write_text(yaml.safe_dump({
        "data_dir": str(backend.data_dir), "storage": {"dsn": storage_dsn}, "keys": backend.keys_config,
        "models": {"cache_dir": str(PROJECT_ROOT / "var" / "models")},
    }))  # fmt: skip
    return config


def keys(config, *argv: str) -> int:
    return biogate(["--config", str(config), "keys", *argv])


def in_another_process(config, script: str = "", argv: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """`biogate keys ARGV` (or ``script``, given the config path as sys.argv[1]) in a process of its own."""
    cmd = [sys.executable, "-c", textwrap.dedent(script), str(config)] if script else \
        [sys.executable, "-m", "services.cli", "--config", str(config), "keys", *argv]
    return subprocess.run(cmd, cwd=PROJECT_ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=300)


def trail(settings) -> list[tuple[str, str, dict]]:
    """(event, actor, details) of every audit record, after checking that the trail verifies."""
    st = open_storage(settings.storage_dsn)
    try:
        report = verify(st.audit, open_audit_signer(settings, create=False).public_key)
        assert report.ok, report.render()
        return [(r.event_type, r.actor, json.loads(r.details)) for r in st.audit.iter_records()]
    finally:
        st.close()


def events(settings) -> list[tuple[str, dict]]:
    return [(event, details) for event, _, details in trail(settings)]


def assert_no_key_material(settings, rows, actor: str = "cli:") -> None:
    for event, who, details in rows:
        assert event.startswith("keys.") and who.startswith(actor), (event, who)
        assert set(details) <= KEY_DETAILS, details
    path = settings.keyring_file
    if path.exists():  # the file backend: no key or pseudonym key in any encoding in the trail
        doc = json.loads(path.read_text())
        secrets = [doc["pseudonym_key"]] + [k["material"] for k in doc["keys"]]
        text = json.dumps(rows)
        for secret in secrets:
            raw = base64.b64decode(secret)
            assert secret not in text and raw.hex() not in text


def enrol(storage, crypto, subject: str) -> str:
    b = TemplateBinding("bank-a", subject, "face", "arcface-r100")
    env = crypto.encrypt_template(b, b"template of " + subject.encode())
    storage.templates.put(TemplateRecord("bank-a", subject, "face", "arcface-r100", "", env, envelope_key_id(env), 1),
                          replace=True)
    return envelope_key_id(env)


def initialised(config):
    """After `keys init`: the settings, the keyring and the storage (closed by the caller)."""
    settings = load_config(str(config))
    assert keys(config, "init") == 0
    return settings, open_keyring(settings, create=False), open_storage(settings.storage_dsn)


def backend_name(backend) -> str:
    return "file" if backend.kind == "file" else "pkcs11"


def first_keys(settings, backend, primary: str | None = None) -> list[tuple[str, dict]]:
    """The records of a first start, `keys init` or `migrate` on an empty key store, in their order:
    the audit signing key (made first; its record is the first it signs), then the first KEK, and
    the pseudonym key (the file keyring's in the same write as the KEK; the token's an object of
    its own). ``primary``: the first KEK, when a rotation has made another since."""
    name = backend_name(backend)
    signer = open_audit_signer(settings, create=False)
    keyring = open_keyring(settings, create=False)
    kek = {"key": "kek", "key_id": primary or keyring.primary_key_id(), "cipher": settings.keys.cipher, "purpose": "init",
           "backend": name}
    rows = [("keys.added", {"key": "audit-signing", "key_id": signer.key_id, "algorithm": "EdDSA", "purpose": "init",
                            "backend": name})]
    if backend.kind == "file":
        pseudonym = {"key": "pseudonym", "purpose": "init", "backend": name}
        return rows + [("keys.adding", kek), ("keys.adding", pseudonym), ("keys.added", kek), ("keys.added", pseudonym)]
    assert isinstance(keyring, hsm.Pkcs11Keyring)
    pseudonym = {"key": "pseudonym", "key_id": present(keyring.pseudonym_key_id()), "algorithm": "HMAC-SHA256",
                 "purpose": "init", "backend": name}
    return rows + [("keys.adding", kek), ("keys.added", kek), ("keys.adding", pseudonym), ("keys.added", pseudonym)]


def test_keys_init_audits_the_first_key_and_only_when_it_makes_one(deployment, backend, capsys):
    settings = load_config(str(deployment))
    assert keys(deployment, "init") == 0
    assert "created" in capsys.readouterr().out
    keyring = open_keyring(settings, create=False)
    primary = keyring.key_info(keyring.primary_key_id())
    assert keys(deployment, "init") == 0  # the keyring exists: no key made, nothing to audit
    assert "exists" in capsys.readouterr().out
    rows = trail(settings)
    assert primary.cipher == settings.keys.cipher
    assert [(event, details) for event, _, details in rows] == first_keys(settings, backend)
    assert_no_key_material(settings, rows)


def test_a_rotation_killed_mid_way_has_audited_its_new_key_first(deployment, backend):
    """The key is audited before it exists; the process dies during the re-wrap (here after the first
    batch committed): the trail names the new primary, and says no rotation finished."""
    settings, keyring, storage = initialised(deployment)
    old = keyring.primary_key_id()
    try:
        for i in range(6):
            enrol(storage, EnvelopeCrypto(keyring), f"cust-{i}")
        killed = in_another_process(deployment, """
            import os, sys
            from services.cli import main
            from services.common.storage.templates import SqlTemplateRepository
            swap, calls = SqlTemplateRepository.replace_envelope, []
            def dies_on_the_third(self, *args, **kwargs):
                calls.append(1)
                if len(calls) == 3:
                    os._exit(17)  # kill -9 during the second batch's transaction
                return swap(self, *args, **kwargs)
            SqlTemplateRepository.replace_envelope = dies_on_the_third
            main(["--config", sys.argv[1], "keys", "rotate", "--batch", "2"])
            """)
        assert killed.returncode == 17, killed.stderr
        new = open_keyring(settings, create=False).primary_key_id()
        assert new != old and key_usage(storage) == {new: 2, old: 4}  # the first batch moved, then it died
    finally:
        storage.close()
    detail = {"key": "kek", "key_id": new, "purpose": "rotate", "backend": backend_name(backend)}
    started = len(first_keys(settings, backend))
    assert events(settings)[started:] == [("keys.adding", {**detail, "cipher": settings.keys.cipher}),
                                          ("keys.added", {**detail, "cipher": settings.keys.cipher})]
    # The next rotation finishes the job, and says so.
    assert keys(deployment, "rotate") == 0
    assert [(e, d.get("outcome")) for e, d in events(settings)[started + 2:]] == [
        ("keys.adding", None), ("keys.added", None), ("keys.rotate", "done")]
    assert_no_key_material(settings, trail(settings))


def test_a_key_the_keyring_refuses_to_add_is_audited_as_failed(storage_dsn, tmp_path, monkeypatch, capsys):
    """Audited first, so a refusal (here the read-only keyring of $BIOGATE_KEYRING_JSON) leaves the
    attempt and its failure in the trail, and no key."""
    doc = LocalKeyring(tmp_path / "elsewhere.json").dump_json()
    monkeypatch.setenv(ENV_VAR, doc)
    config = tmp_path / "biogate.yaml"
    config.write_text(yaml.safe_dump({"data_dir": str(tmp_path / "data"), "storage": {"dsn": storage_dsn}}))
    settings = load_config(str(config))
    assert keys(config, "rotate") == 1
    assert "read-only" in capsys.readouterr().err
    rows = events(settings)
    signer = open_audit_signer(settings, create=False)
    assert rows[0] == ("keys.added", {"key": "audit-signing", "key_id": signer.key_id, "algorithm": "EdDSA",
                                      "purpose": "init", "backend": "env"})
    assert [event for event, _ in rows[1:]] == ["keys.adding", "keys.add_failed"]
    assert rows[2][1] == {"key": "kek", "key_id": rows[1][1]["key_id"], "cipher": settings.keys.cipher,
                          "purpose": "rotate", "backend": "env", "error": "KeyringError"}
    assert len(open_keyring(settings).keys()) == 1


def test_a_running_service_seals_under_the_primary_another_process_rotated_to(deployment, backend, monkeypatch):
    """The service looked at its keyring just before `keys rotate` ran in another process and would
    not look again for an hour; its next enrolment is still sealed under the new primary, so the old
    key can be retired at once."""
    monkeypatch.setattr(hsm, "_LIST_TTL_S", 3600.0)
    settings = load_config(str(deployment))
    assert keys(deployment, "init") == 0
    service = EnvelopeCrypto(backend.open(check_interval_s=3600))
    storage = open_storage(settings.storage_dsn)
    try:
        old = enrol(storage, service, "cust-1")
        rotated = in_another_process(deployment, argv=("rotate",))
        assert rotated.returncode == 0, rotated.stderr
        new = enrol(storage, service, "cust-2")  # no restart, no reload call
        assert new != old and key_usage(storage) == {new: 2}
        assert service.decrypt_template(TemplateBinding("bank-a", "cust-1", "face", "arcface-r100"),
                                        present(storage.templates.get("bank-a", "cust-1", "face", "arcface-r100")).envelope)
    finally:
        storage.close()
    assert keys(deployment, "retire", old) == 0
    started = first_keys(settings, backend, primary=old)
    assert events(settings)[:len(started)] == started
    assert [event for event, _ in events(settings)[len(started):]] == [
        "keys.adding", "keys.added", "keys.rotate", "keys.retire"]


def test_retire_says_why_a_key_is_still_in_use_and_rewrap_moves_it(deployment, capsys):
    settings, keyring, storage = initialised(deployment)
    old = keyring.primary_key_id()
    try:
        enrol(storage, EnvelopeCrypto(keyring), "cust-1")
        assert keys(deployment, "rotate") == 0
        enrol(storage, EnvelopeCrypto(Pinned(keyring, old)), "cust-2")  # landed after the rotation's passes
        capsys.readouterr()
        assert keys(deployment, "retire", old) == 1
        err = capsys.readouterr().err
        assert "still wraps 1 record(s) (1 templates, 0 phone numbers)" in err and "keys rewrap" in err
        assert keys(deployment, "rewrap") == 0
        assert "re-wrapped 1 templates" in capsys.readouterr().out
        assert keys(deployment, "retire", old) == 0
        assert set(key_usage(storage)) == {open_keyring(settings, create=False).primary_key_id()}
    finally:
        storage.close()
    rows = trail(settings)
    assert [event for event, _, _ in rows][-2:] == ["keys.rewrap", "keys.retire"]
    assert rows[-2][2]["outcome"] == "done" and rows[-2][2]["templates_rewrapped"] == 1
    assert_no_key_material(settings, rows)


def mfa_token_key(settings, backend) -> list[tuple[str, dict]]:
    from services.mfa.tokens import SigningKeys

    planned = {"key": "mfa-token-signing", "algorithm": "EdDSA", "purpose": "init", "backend": backend_name(backend)}
    [kid] = [k["kid"] for k in SigningKeys.from_settings(settings).vault.entries()]
    return [("keys.adding", planned), ("keys.added", {**planned, "key_id": kid})]


def test_migrate_audits_every_key_it_makes(deployment, backend):
    """`biogate migrate` (the deployment's Job) makes the keys when there are none, audited as
    `keys init` is, and the MFA's first decision-token key; run again it makes and audits nothing."""
    settings = load_config(str(deployment))
    assert biogate(["--config", str(deployment), "migrate"]) == 0
    assert biogate(["--config", str(deployment), "migrate"]) == 0
    rows = trail(settings)
    assert [(e, d) for e, _, d in rows] == first_keys(settings, backend) + mfa_token_key(settings, backend)
    assert_no_key_material(settings, rows)


def test_a_first_service_start_audits_every_key_it_makes(deployment, backend):
    """The embedded-defaults start: no `migrate`, no `keys init`; the first service to start makes
    the keys, each audited (actor service:<name>) before it exists where its id is chosen first, and
    the trail verifies. The next start makes and audits nothing."""
    from services.common.runtime import Runtime
    from services.mfa.service import Orchestrator

    settings = load_config(str(deployment))
    assert not settings.keyring_file.exists() and not settings.audit_signing_key_file.exists()
    rt = Runtime.open(settings, "mfa")
    try:
        Orchestrator(rt, clients={}).close()
    finally:
        rt.close()
    Runtime.open(settings, "face").close()
    rows = trail(settings)
    assert [(e, d) for e, _, d in rows] == first_keys(settings, backend) + mfa_token_key(settings, backend)
    assert {actor for _, actor, _ in rows} == {"service:mfa"}
    assert_no_key_material(settings, rows, actor="service:mfa")


def test_the_key_operations_log_refuses_a_subject(settings):
    """It has no pseudonym key (it writes before the keyring exists): a subject id is refused, not
    written in clear."""
    from services.common.audit import AuditDataError, AuditLog

    storage = open_storage(settings.storage_dsn)
    try:
        with pytest.raises(AuditDataError, match="without a subject"):
            AuditLog.for_operations(settings, storage, open_audit_signer(settings)).append("keys.x", actor="cli:op", tenant_id="bank-a",
                                                              subject_id="cust-1")
        assert list(storage.audit.iter_records()) == []
    finally:
        storage.close()


def test_the_mfa_audits_a_token_key_it_rotates_to(deployment, backend):
    """A decision-token key made while the MFA runs (rotation) is audited like the first one: the
    attempt, then the key id it got, as service:mfa; the trail verifies."""
    from services.common.runtime import Runtime
    from services.mfa.service import Orchestrator

    settings = load_config(str(deployment))
    rt = Runtime.open(settings, "mfa")
    try:
        orchestrator = Orchestrator(rt, clients={})
        started = len(list(rt.storage.audit.iter_records()))
        new_kid = orchestrator.signing.rotate()
        orchestrator.close()
    finally:
        rt.close()
    rows = trail(settings)[started:]
    planned = {"key": "mfa-token-signing", "algorithm": "EdDSA", "purpose": "rotate", "backend": backend_name(backend)}
    assert [(e, d) for e, _, d in rows] == [("keys.adding", planned), ("keys.added", {**planned, "key_id": new_kid})]
    assert_no_key_material(settings, rows, actor="service:mfa")
