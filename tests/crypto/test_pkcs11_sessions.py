"""The PKCS#11 backend outlives its session: a network HSM that restarts or fails over, or a token
reset, ends every session of the process. Against the real SoftHSM2 token, a restart looks the same
to the client: the library initialised again, every session handle gone."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pkcs11
import pytest
from prometheus_client import REGISTRY

from services.common.crypto import EnvelopeCrypto, TemplateBinding, envelope_key_id
from services.common.crypto.errors import TokenUnavailableError
from services.common.crypto.hsm import (
    Pkcs11Keyring,
    Pkcs11KeyVault,
    Pkcs11Signer,
    Pkcs11Token,
    audit_signer,
    open_token,
)
from services.common.crypto.signing import verify_signature
from services.common.runtime import Runtime
from services.common.storage import SqlStorage
from tests.conftest import make_settings
from tests.softhsm import PIN, TOKEN_LABEL, hsm_away, restart_hsm

BINDING = TemplateBinding("bank-a", "cust-1", "face", "mobilefacenet-arcface-192d")


def reconnects(outcome: str) -> float:
    return REGISTRY.get_sample_value("biogate_pkcs11_reconnects_total", {"outcome": outcome}) or 0.0


@dataclass
class Keys:
    """One process's keys in the token, and a template sealed before the HSM went away."""

    token: Pkcs11Token
    keyring: Pkcs11Keyring
    crypto: EnvelopeCrypto
    signer: Pkcs11Signer  # the audit key
    jwt_signer: Pkcs11Signer  # an MFA decision-token key
    sealed: bytes


def open_all(softhsm, tmp_path, reconnect_interval_s: float = 0.0) -> Keys:
    cfg = make_settings(tmp_path / "data", keys=softhsm.keys_config()).keys.pkcs11
    token = open_token(cfg.model_copy(update={"reconnect_interval_s": reconnect_interval_s}))
    keyring = Pkcs11Keyring(token)
    crypto = EnvelopeCrypto(keyring)
    vault = Pkcs11KeyVault(token)
    return Keys(token, keyring, crypto, audit_signer(token), vault.signer(vault.generate()),
                crypto.encrypt_template(BINDING, b"template"))


def test_a_restarted_hsm_is_reconnected_once_and_the_operation_retried(softhsm, tmp_path):
    k = open_all(softhsm, tmp_path)
    before = reconnects("ok")

    restart_hsm(softhsm)
    # each of these used the old session's handles: the first one reconnects, the rest reuse it
    assert k.crypto.decrypt_template(BINDING, k.sealed) == b"template"
    assert k.crypto.decrypt_template(BINDING, k.crypto.encrypt_template(BINDING, b"again")) == b"again"
    assert verify_signature(k.signer.public_key, k.signer.sign(b"head"), b"head")
    assert verify_signature(k.jwt_signer.public_key, k.jwt_signer.sign(b"claims"), b"claims")
    assert reconnects("ok") == before + 1


def test_callers_waiting_on_a_lost_session_share_one_reconnect(softhsm, tmp_path):
    k = open_all(softhsm, tmp_path)
    before = reconnects("ok")
    restart_hsm(softhsm)
    start = threading.Barrier(8)

    def work(i: int) -> object:
        start.wait()  # all eight on the lost session at once
        if i % 2:
            return k.crypto.decrypt_template(BINDING, k.sealed)
        return verify_signature(k.signer.public_key, k.signer.sign(b"m%d" % i), b"m%d" % i)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(work, range(8)))
    assert results == [True, b"template"] * 4
    assert reconnects("ok") == before + 1


def test_an_unreachable_token_is_reported_by_name_and_works_again_when_back(softhsm, tmp_path):
    k = open_all(softhsm, tmp_path)
    crypto, signer, sealed = k.crypto, k.signer, k.sealed
    failed, ok = reconnects("failed"), reconnects("ok")

    with hsm_away(softhsm):
        with pytest.raises(TokenUnavailableError) as err:
            crypto.encrypt_template(BINDING, b"new")
        message = str(err.value)
        assert f"the PKCS#11 token {TOKEN_LABEL!r} is unreachable" in message and PIN not in message
        with pytest.raises(TokenUnavailableError):
            signer.sign(b"head")
        assert reconnects("failed") == failed + 2

    assert crypto.decrypt_template(BINDING, sealed) == b"template"  # no restart: the token is back
    assert verify_signature(signer.public_key, signer.sign(b"head"), b"head")
    assert reconnects("ok") == ok + 1


def test_after_a_failed_reconnect_calls_fail_at_once_for_the_interval(softhsm, tmp_path):
    k = open_all(softhsm, tmp_path, reconnect_interval_s=3600)
    failed = reconnects("failed")
    with hsm_away(softhsm):
        for _ in range(3):  # one reconnect's tries, not three: the others are refused at once
            with pytest.raises(TokenUnavailableError, match="is unreachable: NoSuchToken") as err:
                k.signer.sign(b"head")
            assert err.value.retry_after_s == 3600
    assert reconnects("failed") == failed + 1


def test_a_changed_pin_is_named_while_reconnecting(softhsm, tmp_path, monkeypatch):
    keyring = open_all(softhsm, tmp_path).keyring
    monkeypatch.setenv("BIOGATE_PKCS11_PIN", "not-the-pin")
    restart_hsm(softhsm)
    with pytest.raises(TokenUnavailableError, match="BIOGATE_PKCS11_PIN") as err:
        keyring.wrap(keyring.primary_key_id(), b"k" * 32, b"aad")
    assert "not-the-pin" not in str(err.value)
    monkeypatch.setenv("BIOGATE_PKCS11_PIN", PIN)
    assert keyring.unwrap(keyring.primary_key_id(), keyring.wrap(keyring.primary_key_id(), b"k" * 32, b"a"),
                          b"a") == b"k" * 32


def test_the_library_restarted_by_the_test_is_the_one_the_backend_uses(softhsm, tmp_path):
    """The tests above would pass vacuously if restart_hsm initialised another library instance."""
    session = open_all(softhsm, tmp_path).token.session
    restart_hsm(softhsm)
    with pytest.raises(pkcs11.exceptions.SessionHandleInvalid):
        list(session.get_objects({}))


def test_a_token_whose_session_is_gone_closes(softhsm, tmp_path):
    token = open_all(softhsm, tmp_path).token
    restart_hsm(softhsm)
    token.close()
    assert token.closed


def test_a_write_whose_audit_record_cannot_be_signed_is_not_written(softhsm, tmp_path):
    """The phone number is sealed while the token answers; the HSM goes away before the audit
    record's signature: neither the number nor the record is written."""
    keys = softhsm.keys_config()
    keys["pkcs11"]["reconnect_interval_s"] = 0
    rt = Runtime.open(make_settings(tmp_path / "data", keys=keys))
    try:
        envelope = rt.crypto.encrypt_contact("bank-a", "cust-1", "+8613800000001")
        assert isinstance(rt.storage, SqlStorage)
        with rt.storage.db.read() as q:
            records = q.one("SELECT COUNT(*) FROM audit_records")[0]
        with hsm_away(softhsm), pytest.raises(TokenUnavailableError):
            with rt.storage.transaction():
                rt.storage.subjects.set_phone("bank-a", "cust-1", envelope, envelope_key_id(envelope))
                rt.audit.append("contact.phone_set", "tester", "bank-a", "cust-1", {"changed": False})
        assert rt.storage.subjects.get_phone("bank-a", "cust-1") is None
        with rt.storage.db.read() as q:
            assert q.one("SELECT COUNT(*) FROM audit_records")[0] == records
    finally:
        rt.close()
