"""The PKCS#11 backend outlives its session: a network HSM that restarts or fails over, or a token
reset, ends every session of the process. Against the real SoftHSM2 token, a restart looks the same
to the client: the library initialised again, every session handle gone."""

from __future__ import annotations

import threading
from contextlib import suppress
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pkcs11
import pytest
from prometheus_client import REGISTRY

from services.common.crypto import EnvelopeCrypto, TemplateBinding, envelope_key_id
from services.common.crypto import hsm
from services.common.crypto.errors import TokenUnavailableError
from services.common.crypto.hsm import (
    Pkcs11Keyring,
    Pkcs11KeyVault,
    Pkcs11Signer,
    Pkcs11Token,
    audit_signer,
    create_audit_signer,
    open_token,
    switch_audit_signer,
)
from services.common.crypto.signing import raw_public_bytes, verify_signature
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


def _reconnected_after(monkeypatch, softhsm, owner, name: str, meanwhile) -> None:
    """The next call of ``owner.name`` (a lookup) returns its handles; then the HSM restarts and
    ``meanwhile()``, another call on the token, logs in again where it can, before its caller uses
    them. Object handles are numbered afresh in the new session: one kept from before names another
    object there."""
    real = getattr(owner, name)

    def lookup(*args, **kwargs):
        monkeypatch.setattr(owner, name, real)
        found = real(*args, **kwargs)
        restart_hsm(softhsm)
        with suppress(TokenUnavailableError):  # where the caller holds the session, it cannot
            meanwhile()
        return found

    monkeypatch.setattr(owner, name, lookup)


def _fresh_session(softhsm, token: Pkcs11Token) -> None:
    """The HSM restarted and the session open again, no object looked up in it yet: handles are
    numbered by the order of the lookups that follow, whatever earlier tests looked up."""
    restart_hsm(softhsm)
    assert token.find(label=token.label("no-such-object")) == []


def _private_ids(token: Pkcs11Token) -> set[bytes]:
    A = token.p11.Attribute
    return token.run(lambda: {bytes(o[A.ID]) for o in token.find(cls=token.p11.ObjectClass.PRIVATE_KEY)})


def test_a_reconnect_between_looking_a_retired_audit_key_up_and_destroying_it_destroys_no_other_key(
        softhsm, tmp_path, monkeypatch):
    """Before, destroy-key looked the retired key's object up outside the session it destroyed it in:
    after a reconnect in between (another thread's signature) its handle named another object of the
    new session, and the MFA's decision-token key was destroyed instead (measured on SoftHSM2). Now
    the lookup and the destruction hold one session: the destruction fails retryable, destroys
    nothing, and a run again destroys the retired key."""
    k = open_all(softhsm, tmp_path)
    create_audit_signer(k.token, which="audit-next")
    switch_audit_signer(k.token)
    retired = k.signer
    current = audit_signer(k.token, create=False)
    before = _private_ids(k.token)
    _fresh_session(softhsm, k.token)
    _reconnected_after(monkeypatch, softhsm, hsm, "retired_audit_key",
                       lambda: (current.sign(b"head"), k.jwt_signer.sign(b"claims"),
                                k.crypto.decrypt_template(BINDING, k.sealed)))
    with suppress(TokenUnavailableError):
        hsm.destroy_retired_audit_key(k.token, retired.key_id)
    left = _private_ids(k.token)
    assert before - left <= {retired._object_id}
    hsm.destroy_retired_audit_key(k.token, retired.key_id)  # once more, as the command says
    assert _private_ids(k.token) == before - {retired._object_id}
    assert verify_signature(current.public_key, current.sign(b"head"), b"head")
    assert verify_signature(k.jwt_signer.public_key, k.jwt_signer.sign(b"claims"), b"claims")
    assert k.crypto.decrypt_template(BINDING, k.sealed) == b"template"


def test_a_reconnect_between_looking_a_retired_kek_up_and_destroying_it_destroys_no_other_key(
        softhsm, tmp_path, monkeypatch):
    """`keys retire` on the token: the same, for a key-encryption key the keyring looked up."""
    k = open_all(softhsm, tmp_path)
    old = k.keyring.primary_key_id()
    k.keyring.add_key()
    before = _private_ids(k.token)
    secrets_before = k.token.run(lambda: {bytes(o[k.token.p11.Attribute.ID])
                                          for o in k.token.find(cls=k.token.p11.ObjectClass.SECRET_KEY)})
    _fresh_session(softhsm, k.token)
    _reconnected_after(monkeypatch, softhsm, k.keyring, "_kek",
                       lambda: (k.signer.sign(b"head"), k.jwt_signer.sign(b"claims")))
    with suppress(TokenUnavailableError):
        k.keyring.remove_key(old)
    assert _private_ids(k.token) == before
    secrets_left = k.token.run(lambda: {bytes(o[k.token.p11.Attribute.ID])
                                        for o in k.token.find(cls=k.token.p11.ObjectClass.SECRET_KEY)})
    assert secrets_before - secrets_left <= {old.encode()}
    assert verify_signature(k.signer.public_key, k.signer.sign(b"head"), b"head")
    assert verify_signature(k.jwt_signer.public_key, k.jwt_signer.sign(b"claims"), b"claims")


def test_a_reconnect_in_the_middle_of_switching_the_audit_key_relabels_no_other_key(
        softhsm, tmp_path, monkeypatch):
    """switch-key relabels the objects it looked up. Before, a reconnect between a lookup and the use
    of its handle read the next key's id from another object of the new session (the audit key's):
    the switch returned having relabelled nothing, and the command audited `keys.switched`. Now the
    switch holds one session: it fails retryable or switches, and relabels no other object."""
    k = open_all(softhsm, tmp_path)
    nxt = create_audit_signer(k.token, which="audit-next")
    A = k.token.p11.Attribute

    def labels() -> dict[tuple[bytes, int], str]:
        return k.token.run(lambda: {(bytes(o[A.ID]), int(o[A.CLASS])): o[A.LABEL] for o in k.token.find()})

    before = labels()
    _fresh_session(softhsm, k.token)
    _reconnected_after(monkeypatch, softhsm, k.token, "find",
                       lambda: (k.signer.sign(b"head"), k.jwt_signer.sign(b"claims")))
    try:
        switch_audit_signer(k.token)
        switched = True
    except TokenUnavailableError:
        switched = False

    def changed() -> set[bytes]:
        return {i for (i, c), label in labels().items() if before[i, c] != label}

    assert changed() <= {k.signer._object_id, nxt._object_id}
    if switched:  # a switch that returns switched the keys
        assert audit_signer(k.token, create=False).key_id == nxt.key_id
    else:
        switch_audit_signer(k.token)  # once more, as the command says
    assert audit_signer(k.token, create=False).key_id == nxt.key_id
    assert changed() == {k.signer._object_id, nxt._object_id}


def test_a_reconnect_between_looking_the_audit_key_up_and_reading_it_opens_the_audit_key(
        softhsm, tmp_path, monkeypatch):
    """Before, the audit key's lookup, the read of its id and the lookup of its public key were
    separate calls on the token: after a reconnect between them the handle named another object of
    the new session (the MFA's decision-token key, measured on SoftHSM2), and the audit signer signed
    with that key under its id. Now the lookup and the reads hold one session."""
    k = open_all(softhsm, tmp_path)
    _fresh_session(softhsm, k.token)
    _reconnected_after(monkeypatch, softhsm, k.token, "find",
                       lambda: (k.jwt_signer.sign(b"claims"), k.crypto.decrypt_template(BINDING, k.sealed)))
    signer = audit_signer(k.token, create=False)
    assert signer.key_id == k.signer.key_id and signer._object_id == k.signer._object_id
    assert verify_signature(k.signer.public_key, signer.sign(b"head"), b"head")


def test_a_reconnect_between_looking_a_decision_token_key_up_and_signing_signs_with_that_key(
        softhsm, tmp_path, monkeypatch):
    """The MFA's vault looked a key's private object up, then its public one, in separate calls, and
    the signer kept the private handle as one of the session after the reconnect: it signed with the
    audit key under the decision-token key's kid (measured on SoftHSM2)."""
    k = open_all(softhsm, tmp_path)
    entry = {"kid": k.jwt_signer.key_id, "created": None, "retired": None}
    _fresh_session(softhsm, k.token)
    _reconnected_after(monkeypatch, softhsm, k.token, "find",
                       lambda: (k.signer.sign(b"head"), k.crypto.decrypt_template(BINDING, k.sealed)))
    signer = Pkcs11KeyVault(k.token).signer(entry)
    assert raw_public_bytes(signer.public_key) == raw_public_bytes(k.jwt_signer.public_key)
    assert verify_signature(k.jwt_signer.public_key, signer.sign(b"claims"), b"claims")


def test_a_reconnect_between_looking_the_pseudonym_key_up_and_reading_its_id_reads_its_id(
        softhsm, tmp_path, monkeypatch):
    """pseudonym_key_id() read the id of a handle looked up in an earlier call: after a reconnect in
    between, another object's (the audit key's), and `biogate migrate` would take the pseudonym key
    for made when it is not, or audit another id."""
    k = open_all(softhsm, tmp_path)
    k.keyring.create_pseudonym_key("5e" * 8)
    _fresh_session(softhsm, k.token)
    _reconnected_after(monkeypatch, softhsm, k.token, "find",
                       lambda: (k.signer.sign(b"head"), k.jwt_signer.sign(b"claims")))
    assert k.keyring.pseudonym_key_id() == "5e" * 8
