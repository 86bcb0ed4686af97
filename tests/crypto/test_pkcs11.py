"""The PKCS#11 key backend against a real SoftHSM2 token: template keys wrap and unwrap inside the
token, the audit trail and the MFA's decision tokens are signed by keys that never leave it, and a
second process (a replica) shares the token instead of files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jwt
import pkcs11
import pytest
import yaml
from pkcs11 import Attribute, ObjectClass

from services.cli import main as biogate
from services.common.audit import verify
from services.common.config import PROJECT_ROOT
from services.common.crypto import (
    BindingMismatchError,
    EnvelopeCrypto,
    KeyringError,
    TemplateBinding,
    UnknownKeyError,
    envelope_key_id,
    open_keyring,
)
from services.common.crypto.backend import open_audit_signer
from services.common.crypto.hsm import Pkcs11Keyring
from services.common.runtime import Runtime
from services.common.storage import TemplateRecord
from services.mfa.tokens import SigningKeys, TokenIssuer, verify_token
from tests.conftest import make_settings, present
from tests.softhsm import PIN, TOKEN_LABEL, corrupt_key_value, object_class, objects

CLAIMS = {"aud": "bank-a", "sub": "ps1_x", "sid": "ses_1", "decision": "allow", "amr": ["face"], "acr": "aal2"}
KEY_FILE_NAMES = {"keyring.json", "audit-ed25519.pem", "mfa-token-keys.json"}


def token_objects(hsm, prefix: str) -> tuple[pkcs11.Session, list]:
    """Every object the backend made under ``prefix``, through a session of the test's own."""
    token = pkcs11.lib(hsm.module).get_token(token_label=TOKEN_LABEL)
    try:
        session = token.open(user_pin=PIN)
    except pkcs11.exceptions.UserAlreadyLoggedIn:  # the backend's session in this process logged in
        session = token.open()
    return session, [o for o in session.get_objects() if str(o[Attribute.LABEL]).startswith(prefix + "-")]


def assert_nothing_secret_under(data_dir):
    names = {p.name for p in data_dir.rglob("*") if p.is_file()}
    assert not names & KEY_FILE_NAMES, names
    for path in data_dir.rglob("*"):
        if path.is_file() and path.suffix not in (".db", ".db-wal", ".db-shm"):
            text = path.read_bytes()
            assert b"PRIVATE KEY" not in text and b"biogate-keyring" not in text, path


def test_keys_stay_in_the_token_for_templates_audit_and_tokens(softhsm, tmp_path):
    keys = softhsm.keys_config()
    prefix = keys["pkcs11"]["label_prefix"]
    settings = make_settings(tmp_path / "data", keys=keys, audit={"checkpoint_every": 3})
    rt = Runtime.open(settings)
    try:
        # enrol and verify: a template sealed under a KEK in the token opens only for its binding
        binding = TemplateBinding("bank-a", "cust-1", "face", "mobilefacenet-arcface-192d")
        envelope = rt.crypto.encrypt_template(binding, b"\x01\x02template")
        rt.storage.templates.put(TemplateRecord("bank-a", "cust-1", "face", "mobilefacenet-arcface-192d", "",
                                                envelope, envelope_key_id(envelope), 1))
        stored = present(rt.storage.templates.get("bank-a", "cust-1", "face", "mobilefacenet-arcface-192d"))
        assert rt.crypto.decrypt_template(binding, stored.envelope) == b"\x01\x02template"
        with pytest.raises(BindingMismatchError):
            rt.crypto.decrypt_template(TemplateBinding("bank-a", "cust-2", "face", "mobilefacenet-arcface-192d"),
                                       stored.envelope)
        # the audit trail: heads and checkpoints signed in the token, verified with its public key
        for i in range(7):
            rt.audit.append("test.event", "tester", "bank-a", f"cust-{i}", {"n": i})
        public = open_audit_signer(settings, create=False).public_key
        report = verify(rt.storage.audit, public, checkpoint_every=3)
        # the start's 5 key records (audit key; KEK and pseudonym key, each adding/added), then these 7
        assert report.ok and report.records_checked == 12 and report.checkpoints_checked == 4, report.render()
        # decision tokens: signed in the token, verified with the JWKS; rotation keeps old ones valid
        signing = SigningKeys.from_settings(settings)
        issuer = TokenIssuer(signing, "biogate-mfa", 120)
        token, _ = issuer.issue(CLAIMS)
        assert verify_token(token, json.dumps(signing.jwks()), "biogate-mfa", "bank-a")["decision"] == "allow"
        assert jwt.get_unverified_header(token)["alg"] == "EdDSA"
        new_kid = signing.rotate()
        fresh, _ = issuer.issue(CLAIMS)
        jwks = json.dumps(signing.jwks())
        assert jwt.get_unverified_header(fresh)["kid"] == new_kid
        assert {verify_token(t, jwks, "biogate-mfa", "bank-a")["sid"] for t in (token, fresh)} == {"ses_1"}
    finally:
        rt.close()

    session, objects = token_objects(softhsm, prefix)
    try:
        secret = [o for o in objects if o[Attribute.CLASS] in (ObjectClass.SECRET_KEY, ObjectClass.PRIVATE_KEY)]
        labels = sorted(str(o[Attribute.LABEL]).split(" ")[0] for o in secret)
        assert labels == [f"{prefix}-{x}" for x in ("audit", "kek", "mfa-jwt", "mfa-jwt", "pseudonym")]
        for obj in secret:
            assert obj[Attribute.EXTRACTABLE] is False and obj[Attribute.SENSITIVE] is True
            assert obj[Attribute.NEVER_EXTRACTABLE] is True and obj[Attribute.ALWAYS_SENSITIVE] is True
            with pytest.raises(pkcs11.exceptions.AttributeSensitive):
                obj[Attribute.VALUE]
    finally:
        session.close()
    assert_nothing_secret_under(settings.data_dir)


def write_config(path, data_dir, keys) -> None:
    path.write_text(yaml.safe_dump({"data_dir": str(data_dir), "keys": keys,
                                    "models": {"cache_dir": str(PROJECT_ROOT / "var" / "models")}}))


def test_rotation_and_retirement_through_the_cli_and_a_second_process(softhsm, tmp_path, capsys):
    keys = softhsm.keys_config()
    config = tmp_path / "biogate.yaml"
    write_config(config, tmp_path / "data", keys)
    assert biogate(["--config", str(config), "migrate"]) == 0  # creates the keys in the token
    assert biogate(["--config", str(config), "keys", "init"]) == 0
    capsys.readouterr()
    settings = make_settings(tmp_path / "data", keys=keys)
    rt = Runtime.open(settings)
    try:
        first = rt.keyring.primary_key_id()
        binding = TemplateBinding("bank-a", "cust-9", "voice", "ecapa-voxceleb", "telephone")
        envelope = rt.crypto.encrypt_template(binding, b"voiceprint")
        rt.storage.templates.put(TemplateRecord("bank-a", "cust-9", "voice", "ecapa-voxceleb", "telephone",
                                                envelope, envelope_key_id(envelope), 1))
        assert biogate(["--config", str(config), "keys", "rotate", "--cipher", "SM4-GCM"]) == 1
        assert "makes AES-256-GCM keys only" in capsys.readouterr().err
        assert biogate(["--config", str(config), "keys", "rotate"]) == 0
        assert "1 templates" in capsys.readouterr().out
        assert isinstance(rt.keyring, Pkcs11Keyring)
        rt.keyring._list(force=True)  # another process rotated; this one would look within a second anyway
        second = rt.keyring.primary_key_id()
        assert second != first
        rec = present(rt.storage.templates.get("bank-a", "cust-9", "voice", "ecapa-voxceleb", "telephone"))
        assert envelope_key_id(rec.envelope) == second
        assert biogate(["--config", str(config), "keys", "retire", first]) == 0
        assert rt.crypto.decrypt_template(binding, rec.envelope) == b"voiceprint"
        with pytest.raises(UnknownKeyError):
            rt.crypto.decrypt_template(binding, envelope)  # sealed under the retired key, destroyed in the token

        # a replica: another process with the same configuration and no shared files
        replica = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
            import json, sys
            from services.settings import load_config
            from services.common.crypto import EnvelopeCrypto, TemplateBinding, open_keyring
            from services.common.crypto.backend import open_audit_signer
            from services.common.crypto.signing import key_id
            from services.mfa.tokens import SigningKeys
            s = load_config({str(config)!r})
            keyring = open_keyring(s, create=False)
            b = TemplateBinding("bank-a", "cust-9", "voice", "ecapa-voxceleb", "telephone")
            opened = EnvelopeCrypto(keyring).decrypt_template(b, bytes.fromhex(sys.argv[1]))
            keys = SigningKeys.from_settings(s)
            new_kid = keys.rotate()
            print(json.dumps({{"opened": opened.decode(), "primary": keyring.primary_key_id(),
                              "pseudonym": keyring.pseudonym_key().hex(), "kid": new_kid,
                              "audit": key_id(open_audit_signer(s, create=False).public_key)}}))
            """), rec.envelope.hex()], env=dict(os.environ, **softhsm.env()), cwd=PROJECT_ROOT,
            capture_output=True, text=True, timeout=120)
        assert replica.returncode == 0, replica.stderr
        seen = json.loads(replica.stdout.strip().splitlines()[-1])
        assert seen["opened"] == "voiceprint" and seen["primary"] == second
        assert seen["pseudonym"] == rt.keyring.pseudonym_key().hex()
        assert seen["audit"] == rt.audit._signer.key_id
        assert seen["kid"] in {k["kid"] for k in SigningKeys.from_settings(settings).jwks()["keys"]}
    finally:
        rt.close()
    assert biogate(["--config", str(config), "audit", "verify"]) == 0
    assert "audit trail: OK" in capsys.readouterr().out
    assert_nothing_secret_under(tmp_path / "data")


def test_configuration_mistakes_name_the_setting(softhsm, tmp_path, monkeypatch):
    keys = softhsm.keys_config()
    keys["pkcs11"]["token_label"] = "no-such-token"
    with pytest.raises(KeyringError, match="keys.pkcs11.token_label"):
        open_keyring(make_settings(tmp_path / "a", keys=keys))
    monkeypatch.delenv("BIOGATE_PKCS11_PIN")
    with pytest.raises(KeyringError, match="BIOGATE_PKCS11_PIN"):
        open_keyring(make_settings(tmp_path / "b", keys=softhsm.keys_config()))
    with pytest.raises(ValueError, match="keys.pkcs11.module"):
        make_settings(tmp_path / "c", keys={"backend": "pkcs11"})


def test_a_wrapped_key_is_bound_to_its_associated_data(softhsm, tmp_path):
    keyring = open_keyring(make_settings(tmp_path / "data", keys=softhsm.keys_config()))
    assert isinstance(keyring, Pkcs11Keyring)
    kid = keyring.primary_key_id()
    wrapped = keyring.wrap(kid, b"k" * 32, b"aad-1")
    assert keyring.unwrap(kid, wrapped, b"aad-1") == b"k" * 32
    from services.common.crypto import WrongKeyError

    with pytest.raises(WrongKeyError):
        keyring.unwrap(kid, wrapped, b"aad-2")
    with pytest.raises(WrongKeyError):
        keyring.unwrap(kid, wrapped[:-1] + bytes([wrapped[-1] ^ 1]), b"aad-1")
    crypto = EnvelopeCrypto(keyring)
    assert crypto.decrypt_contact("t", "s", crypto.encrypt_contact("t", "s", "+8613800000000")) == "+8613800000000"


def key_failures(key: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("biogate_pkcs11_key_failures_total", {"key": key}) or 0.0


def test_a_key_failing_in_a_token_that_answers_is_invalid_not_unavailable(softhsm, tmp_path):
    """SoftHSM2 answers a GCM tag that does not verify with GeneralError (measured: a flipped tag,
    other associated data, a truncated ciphertext), the code a failing device gives too, so on that
    error the key's test encryption tells a failing key from a tampered envelope. Before, a key whose
    storage in the token is corrupted (every operation with it fails, the token answering) was
    TokenUnavailableError, UNAVAILABLE: clients retried what never works, and the alert said the HSM
    was unreachable. Now it is TokenKeyInvalidError naming the key (KEY_STORE_KEY_INVALID), counted
    apart; a tampered wrapped key on the working token stays WrongKeyError."""
    from services.common.crypto import WrongKeyError
    from services.common.crypto.errors import TokenKeyInvalidError, TokenUnavailableError

    before = objects(softhsm)
    keys = softhsm.keys_config()
    keyring = open_keyring(make_settings(tmp_path / "data", keys=keys))
    (kek,) = objects(softhsm) - before
    kid = keyring.primary_key_id()
    crypto = EnvelopeCrypto(keyring)
    sealed = crypto.encrypt_contact("t", "s", "+8613800000000")
    wrapped = keyring.wrap(kid, b"k" * 32, b"aad")
    with pytest.raises(WrongKeyError):
        keyring.unwrap(kid, wrapped[:-1] + bytes([wrapped[-1] ^ 1]), b"aad")

    corrupt_key_value(kek)
    try:
        failures = key_failures("kek")
        label = f"{keys['pkcs11']['label_prefix']}-kek"
        with pytest.raises(TokenKeyInvalidError) as err:
            keyring.unwrap(kid, wrapped, b"aad")
        assert not isinstance(err.value, TokenUnavailableError)
        message = str(err.value)
        assert (f"key-encryption key {kid!r} (label {label!r}) in the PKCS#11 token {TOKEN_LABEL!r} fails: unwrapping "
                "(GeneralError), and a test encryption too (GeneralError)") in message
        assert "retrying does not help" in message and PIN not in message
        with pytest.raises(TokenKeyInvalidError):
            crypto.decrypt_contact("t", "s", sealed)
        with pytest.raises(TokenKeyInvalidError, match=r"fails: encrypting \(GeneralError\), and a test encryption "
                                                       r"too \(GeneralError\)"):
            crypto.encrypt_contact("t", "s", "+8613800000001")
        assert key_failures("kek") == failures + 3
    finally:
        assert isinstance(keyring, Pkcs11Keyring)
        with keyring.token.using():
            keyring._kek(kid).destroy()


@pytest.mark.parametrize("impostor", ["no-decrypt", "generic-secret"])
def test_a_key_of_the_wrong_type_or_attributes_is_invalid_not_an_unhandled_error(softhsm, tmp_path, impostor):
    """The key-encryption key replaced in the token (same label and id) by one whose attributes do
    not let it encrypt or decrypt, or by one that is no AES key: before, python-pkcs11's missing
    method (AttributeError) or the token's refusal (KeyTypeInconsistent) escaped as an unhandled
    error (gRPC INTERNAL, 'quote request id'); now it is TokenKeyInvalidError naming the key and why."""
    from services.common.crypto.errors import TokenKeyInvalidError

    keyring = open_keyring(make_settings(tmp_path / "data", keys=softhsm.keys_config()))
    assert isinstance(keyring, Pkcs11Keyring)
    kid = keyring.primary_key_id()
    wrapped = keyring.wrap(kid, b"k" * 32, b"aad")
    t, A = keyring.token, Attribute
    with t.using():
        keyring._kek(kid).destroy()
        common = {A.TOKEN: True, A.PRIVATE: True, A.SENSITIVE: True, A.EXTRACTABLE: False, A.ID: kid.encode()}
        if impostor == "no-decrypt":
            t.session.generate_key(pkcs11.KeyType.AES, 256, store=True, label=keyring._label,
                                   template={**common, A.ENCRYPT: False, A.DECRYPT: False, A.SIGN: True})
        else:
            t.session.generate_key(pkcs11.KeyType.GENERIC_SECRET, 256, store=True, label=keyring._label,
                                   template={**common, A.ENCRYPT: True, A.DECRYPT: True, A.SIGN: True})
    try:
        refused = ("its attributes do not allow it to encrypt, decrypt" if impostor == "no-decrypt"
                   else "KeyTypeInconsistent")
        with pytest.raises(TokenKeyInvalidError, match=rf"{kid!r} .* fails: unwrapping \({refused}\)"):
            keyring.unwrap(kid, wrapped, b"aad")
        with pytest.raises(TokenKeyInvalidError, match=rf"{kid!r} .* fails: encrypting \({refused}\)"):
            keyring.wrap(kid, b"k" * 32, b"aad")
    finally:
        with t.using():
            keyring._kek(kid).destroy()


def test_a_signing_key_failing_in_a_token_that_answers_is_invalid(softhsm, tmp_path):
    """The audit signing key's stored value unreadable in the token that answers: before, every
    audited call failed with the token's GeneralError unhandled (INTERNAL); now TokenKeyInvalidError
    names the key (KEY_STORE_KEY_INVALID), counted under "signing"."""
    from services.common.crypto.errors import TokenKeyInvalidError
    from services.common.crypto.hsm import audit_signer, open_token

    token = open_token(make_settings(tmp_path / "data", keys=softhsm.keys_config()).keys.pkcs11)
    before = objects(softhsm)
    signer = audit_signer(token)
    assert signer.sign(b"head")
    new = objects(softhsm) - before
    (private,) = [path for path in new if object_class(path) == 3]  # CKO_PRIVATE_KEY
    corrupt_key_value(private)
    try:
        failures = key_failures("signing")
        with pytest.raises(TokenKeyInvalidError, match=rf"the signing key {signer.key_id!r} .* fails: signing "
                                                      r"\(GeneralError\), and a test signature too \(GeneralError\); "
                                                      "the token answers"):
            signer.sign(b"head")
        assert key_failures("signing") == failures + 1
    finally:
        token.destroy_pair(signer._object_id)


class FailsOnce(pkcs11.types.SignMixin, pkcs11.types.EncryptMixin, pkcs11.types.DecryptMixin):
    """A key object of the token whose ``method`` fails once with GeneralError, as a device's passing
    fault does (the key itself sound); every other use runs in the token."""

    def __init__(self, key, method: str) -> None:
        self.key, self.method, self.failed = key, method, 0

    def _use(self, method: str, *args, **kwargs):
        if method == self.method and not self.failed:
            self.failed += 1
            raise pkcs11.exceptions.GeneralError()
        return getattr(self.key, method)(*args, **kwargs)

    def sign(self, *args, **kwargs):
        return self._use("sign", *args, **kwargs)

    def encrypt(self, *args, **kwargs):
        return self._use("encrypt", *args, **kwargs)

    def decrypt(self, *args, **kwargs):
        return self._use("decrypt", *args, **kwargs)


def test_a_signing_failure_a_test_signature_does_not_repeat_is_the_devices_and_retryable(softhsm, tmp_path,
                                                                                          monkeypatch):
    """GeneralError is what a failing key gives and what a device's passing fault gives: before, every
    one was the key's (TokenKeyInvalidError, KEY_STORE_KEY_INVALID, never retried). Now a test signature
    with the same key tells them apart: it passed, so the device failed (TokenUnavailableError,
    UNAVAILABLE with a retry hint), no key failure is counted, and the retried signature verifies."""
    from services.common.crypto.errors import TokenKeyInvalidError, TokenUnavailableError
    from services.common.crypto.hsm import audit_signer, open_token
    from services.common.crypto.signing import verify_signature

    token = open_token(make_settings(tmp_path / "data", keys=softhsm.keys_config()).keys.pkcs11)
    signer = audit_signer(token)
    try:
        flaky = FailsOnce(signer._private(), "sign")
        monkeypatch.setattr(signer, "_private", lambda: flaky)
        failures = key_failures("signing")
        with pytest.raises(TokenUnavailableError, match=rf"signing with key {signer.key_id!r} \(GeneralError; a test "
                                                       r"signature with it passed\)") as err:
            signer.sign(b"head")
        assert not isinstance(err.value, TokenKeyInvalidError) and err.value.retry_after_s is not None
        assert flaky.failed == 1 and key_failures("signing") == failures
        assert verify_signature(signer.public_key, signer.sign(b"head"), b"head")
    finally:
        token.destroy_pair(signer._object_id)


def test_an_encryption_failure_a_test_encryption_does_not_repeat_is_the_devices(softhsm, tmp_path, monkeypatch):
    """Sealing a data key under the key-encryption key: a GeneralError the key's test encryption does
    not repeat is the device's (retryable), as unwrapping already told them apart."""
    from services.common.crypto.errors import TokenKeyInvalidError, TokenUnavailableError

    keyring = open_keyring(make_settings(tmp_path / "data", keys=softhsm.keys_config()))
    assert isinstance(keyring, Pkcs11Keyring)
    kid = keyring.primary_key_id()
    flaky = FailsOnce(keyring._kek(kid), "encrypt")
    monkeypatch.setattr(keyring, "_kek", lambda key_id_: flaky)
    failures = key_failures("kek")
    with pytest.raises(TokenUnavailableError, match=rf"encrypting under key {kid!r} \(GeneralError; a test "
                                                   r"encryption with it passed\)") as err:
        keyring.wrap(kid, b"k" * 32, b"aad")
    assert not isinstance(err.value, TokenKeyInvalidError)
    assert flaky.failed == 1 and key_failures("kek") == failures
    assert keyring.unwrap(kid, keyring.wrap(kid, b"k" * 32, b"aad"), b"aad") == b"k" * 32


def test_a_pseudonym_derivation_failing_once_takes_the_second_derivation(softhsm, tmp_path, monkeypatch):
    """The derivation's input is fixed, so a second derivation is its probe: after a GeneralError it
    passed, so the device failed once and its key is the pseudonym key (before: the key's fault,
    KEY_STORE_KEY_INVALID at the service's start)."""
    from services.common.crypto.hsm import open_token

    token = open_token(make_settings(tmp_path / "data", keys=softhsm.keys_config()).keys.pkcs11)
    keyring = Pkcs11Keyring(token)
    keyring.create_pseudonym_key("b8" * 8)
    try:
        derived = Pkcs11Keyring(token, create=False).pseudonym_key()
        first, label = token.first, token.label("pseudonym")
        flaky: list[FailsOnce] = []

        def failing_once(label_: str, cls):
            key = first(label_, cls)
            if label_ == label and key is not None:
                flaky.append(flaky[0] if flaky else FailsOnce(key, "sign"))
                return flaky[-1]
            return key

        monkeypatch.setattr(token, "first", failing_once)
        failures = key_failures("pseudonym")
        assert keyring.pseudonym_key() == derived
        assert flaky and flaky[0].failed == 1 and key_failures("pseudonym") == failures
    finally:
        monkeypatch.undo()
        with token.using():
            present(token.first(token.label("pseudonym"), ObjectClass.SECRET_KEY)).destroy()


OPENER = """
import sys
from services.common.config import Pkcs11Config
from services.common.crypto.hsm import Pkcs11Token
cfg = Pkcs11Config(module=sys.argv[1], token_label=sys.argv[2])
for _ in range(int(sys.argv[3])):
    token = Pkcs11Token(cfg)
    token.session.close()
print("opened")
"""


def test_replicas_opening_the_token_at_once_all_get_a_session(softhsm):
    """Replicas start together: SoftHSM, reading its token files while another process logs in,
    fails finding the token (GeneralError, or NoSuchToken that lasts until the library is
    initialised again). Seen once in the replica test; here three processes open 60 sessions each
    at once and every one must get all of them (before the fix this failed in every run; retrying
    the lookup without initialising the library again, in 1 of 4 runs)."""
    procs = [subprocess.Popen([sys.executable, "-c", OPENER, softhsm.module, TOKEN_LABEL, "60"], cwd=PROJECT_ROOT,
                              env=dict(os.environ, **softhsm.env()), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(3)]
    outcomes = [p.communicate(timeout=300) for p in procs]
    for (out, err), p in zip(outcomes, procs, strict=True):
        assert p.returncode == 0 and out.strip() == "opened", err[-2000:]


def test_the_pseudonym_key_failing_in_a_token_that_answers_is_invalid_and_an_away_token_unavailable(
        softhsm, tmp_path):
    """The pseudonym root key's stored value unreadable in the token that answers: before, its
    derivation raised the token's GeneralError unhandled (INTERNAL at the services' start or call);
    now TokenKeyInvalidError names the key (KEY_STORE_KEY_INVALID), counted under "pseudonym". A
    token that does not answer is TokenUnavailableError (retryable), and a keyring that derived the
    key before keeps it."""
    from services.common.crypto.errors import TokenKeyInvalidError, TokenUnavailableError
    from services.common.crypto.hsm import Pkcs11Keyring, open_token
    from tests.softhsm import hsm_away

    keys = softhsm.keys_config()
    cfg = make_settings(tmp_path / "data", keys=keys).keys.pkcs11.model_copy(update={"reconnect_interval_s": 0})
    token = open_token(cfg)
    keyring = Pkcs11Keyring(token)
    before = objects(softhsm)
    keyring.create_pseudonym_key("a7" * 8)
    (path,) = objects(softhsm) - before
    derived = keyring.pseudonym_key()
    with hsm_away(softhsm):
        with pytest.raises(TokenUnavailableError, match="is unreachable"):
            Pkcs11Keyring(token, create=False).pseudonym_key()
    corrupt_key_value(path)
    try:
        failures = key_failures("pseudonym")
        label = f"{keys['pkcs11']['label_prefix']}-pseudonym"
        with pytest.raises(TokenKeyInvalidError) as err:
            Pkcs11Keyring(token, create=False).pseudonym_key()
        assert not isinstance(err.value, TokenUnavailableError)
        assert (f"the pseudonym root key (label {label!r}) in the PKCS#11 token {TOKEN_LABEL!r} fails: deriving the "
                "pseudonym key (GeneralError, and a second derivation too (GeneralError)); the token answers"
                ) in str(err.value)
        assert key_failures("pseudonym") == failures + 1
        assert keyring.pseudonym_key() == derived
    finally:
        with token.using():
            present(token.first(token.label("pseudonym"), ObjectClass.SECRET_KEY)).destroy()
