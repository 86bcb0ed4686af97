import base64
import dataclasses
import json
import os

import pytest

from services.common.crypto import (
    BindingMismatchError,
    EnvelopeCrypto,
    LocalKeyring,
    StaticKeyring,
    TamperedEnvelopeError,
    TemplateBinding,
    TemplateDecryptionError,
    UnknownKeyError,
    WrongKeyError,
    envelope_key_id,
)
from services.common.crypto import aead
from services.common.crypto.envelope import MAGIC

TEMPLATE = os.urandom(192 * 4)  # a 192-d float32 embedding's worth of bytes


def _raises_exactly(cls, fn, *args):
    with pytest.raises(TemplateDecryptionError) as info:
        fn(*args)
    assert type(info.value) is cls, f"{type(info.value).__name__}: {info.value}"
    return info.value


def test_round_trip_and_format(crypto, keyring, binding, cipher):
    env = crypto.encrypt_template(binding, TEMPLATE)
    assert env.startswith(MAGIC) and env[3] == 1 and env[4] == aead.CIPHER_IDS[cipher]
    assert envelope_key_id(env) == keyring.primary_key_id()
    assert TEMPLATE not in env
    assert crypto.decrypt_template(binding, env) == TEMPLATE
    # A fresh data key and nonce per record.
    assert crypto.encrypt_template(binding, TEMPLATE) != env


def test_empty_template_round_trips(crypto, binding):
    assert crypto.decrypt_template(binding, crypto.encrypt_template(binding, b"")) == b""


def test_tampered_ciphertext(crypto, binding):
    env = bytearray(crypto.encrypt_template(binding, TEMPLATE))
    for pos in (len(env) - 1, len(env) - 100):  # the tag, then the ciphertext body
        bad = bytearray(env)
        bad[pos] ^= 0x01
        _raises_exactly(TamperedEnvelopeError, crypto.decrypt_template, binding, bytes(bad))


def _header_offsets(env: bytes) -> dict[str, int]:
    n = env[37]
    tags_end = 38 + 4 * n
    klen = env[tags_end]
    fp = tags_end + 1 + klen
    return {
        "cipher id": 4,
        "binding digest": 5,
        "field tag (subject)": 38 + 4 * 2,
        "key fingerprint": fp,
        "wrapped data key": fp + 8 + 2 + 20,
        "payload nonce": fp + 8 + 2 + int.from_bytes(env[fp + 8 : fp + 10], "big"),
    }


@pytest.mark.parametrize(
    "field",
    ["cipher id", "binding digest", "field tag (subject)", "key fingerprint", "wrapped data key", "payload nonce"],
)
def test_tampered_header(crypto, binding, field):
    env = crypto.encrypt_template(binding, TEMPLATE)
    pos = _header_offsets(env)[field]
    bad = bytearray(env)
    bad[pos] ^= 0x03  # cipher id 1 <-> 2: a valid id, so the parser accepts it
    err = _raises_exactly(TamperedEnvelopeError, crypto.decrypt_template, binding, bytes(bad))
    assert "altered" in str(err)


@pytest.mark.parametrize("cut", [0, 3, 20, 60, -17])
def test_truncated_or_foreign_data(crypto, binding, cut):
    env = crypto.encrypt_template(binding, TEMPLATE)
    _raises_exactly(TamperedEnvelopeError, crypto.decrypt_template, binding, env[:cut])
    _raises_exactly(TamperedEnvelopeError, crypto.decrypt_template, binding, b"XYZ" + env[3:])


def test_unsupported_version(crypto, binding):
    env = bytearray(crypto.encrypt_template(binding, TEMPLATE))
    env[3] = 9
    err = _raises_exactly(TamperedEnvelopeError, crypto.decrypt_template, binding, bytes(env))
    assert "version 9" in str(err)


@pytest.mark.parametrize(
    "change,fields",
    [
        ({"subject_id": "cust-43"}, ["subject"]),
        ({"tenant_id": "bank-b"}, ["tenant"]),
        ({"model_id": "ecapa-tdnn-v2"}, ["model"]),
        ({"channel": "wideband"}, ["channel"]),
        ({"modality": "face", "channel": ""}, ["modality", "channel"]),
        ({"tenant_id": "bank-b", "subject_id": "cust-43"}, ["tenant", "subject"]),
    ],
)
def test_template_moved_to_another_binding(crypto, binding, change, fields):
    env = crypto.encrypt_template(binding, TEMPLATE)
    err = _raises_exactly(BindingMismatchError, crypto.decrypt_template, dataclasses.replace(binding, **change), env)
    assert err.fields == fields
    assert f"bound to another {fields[0]}" in str(err)


def test_template_presented_as_contact_and_back(crypto, binding):
    env = crypto.encrypt_template(binding, TEMPLATE)
    err = _raises_exactly(BindingMismatchError, crypto.decrypt_contact, "bank-a", "cust-42", env)
    assert err.fields == ["purpose"]
    phone = crypto.encrypt_contact("bank-a", "cust-42", "+8613800138000")
    _raises_exactly(BindingMismatchError, crypto.decrypt_template, binding, phone)


def test_contact_round_trip_and_binding(crypto):
    env = crypto.encrypt_contact("bank-a", "cust-42", "+8613800138000")
    assert b"13800138000" not in env
    assert crypto.decrypt_contact("bank-a", "cust-42", env) == "+8613800138000"
    err = _raises_exactly(BindingMismatchError, crypto.decrypt_contact, "bank-a", "cust-7", env)
    assert str(err) == "this contact envelope is bound to another subject"


def test_unknown_key_id(crypto, binding, tmp_path):
    env = crypto.encrypt_template(binding, TEMPLATE)
    other = EnvelopeCrypto(LocalKeyring(tmp_path / "other.json"))
    err = _raises_exactly(UnknownKeyError, other.decrypt_template, binding, env)
    assert err.key_id == envelope_key_id(env)


def test_wrong_key_material_under_the_same_id(crypto, keyring, binding, cipher):
    env = crypto.encrypt_template(binding, TEMPLATE)
    doc = json.loads(keyring.dump_json())
    doc["keys"][0]["material"] = base64.b64encode(aead.new_key(cipher)).decode()  # e.g. a wrong backup
    impostor = EnvelopeCrypto(StaticKeyring(json.dumps(doc)))
    err = _raises_exactly(WrongKeyError, impostor.decrypt_template, binding, env)
    assert envelope_key_id(env) in str(err)


def test_key_id_pointed_at_another_key_of_the_keyring_is_tampering(crypto, keyring, binding):
    """Not a wrong backup of the key (WrongKeyError sends the operator to their key material): the
    envelope's own fingerprint names the keyring key that sealed it."""
    env = crypto.encrypt_template(binding, TEMPLATE)
    sealed_under = envelope_key_id(env)
    other = keyring.add_key().key_id
    assert len(other) == len(sealed_under)
    swapped = env.replace(sealed_under.encode(), other.encode())
    err = _raises_exactly(TamperedEnvelopeError, crypto.decrypt_template, binding, swapped)
    assert "key id was altered" in str(err) and sealed_under in str(err)


def test_errors_share_one_base():
    for cls in (UnknownKeyError, WrongKeyError, TamperedEnvelopeError, BindingMismatchError):
        assert issubclass(cls, TemplateDecryptionError)
    assert len({UnknownKeyError, WrongKeyError, TamperedEnvelopeError, BindingMismatchError}) == 4


def test_rewrap_moves_only_the_key_part(crypto, keyring, binding, tmp_path):
    env = crypto.encrypt_template(binding, TEMPLATE)
    old = envelope_key_id(env)
    new = keyring.add_key("SM4-GCM" if keyring.key_info(old).cipher == "AES-256-GCM" else "AES-256-GCM")
    moved = crypto.rewrap(env, new.key_id)
    assert envelope_key_id(moved) == new.key_id
    assert moved[-len(TEMPLATE) - 16 :] == env[-len(TEMPLATE) - 16 :]  # payload untouched
    assert moved[4] == env[4]  # the payload keeps its cipher; the wrap uses the new key's
    assert crypto.decrypt_template(binding, moved) == TEMPLATE
    keyring.remove_key(old)
    _raises_exactly(UnknownKeyError, crypto.decrypt_template, binding, env)
    assert crypto.decrypt_template(binding, moved) == TEMPLATE


def test_rewrap_refuses_a_damaged_envelope(crypto, binding):
    bad = bytearray(crypto.encrypt_template(binding, TEMPLATE))
    bad[-1] ^= 1
    _raises_exactly(TamperedEnvelopeError, crypto.rewrap, bytes(bad))


def test_non_ascii_binding(crypto):
    b = TemplateBinding("银行-甲", "客户-0042", "face", "arcface-r100")
    env = crypto.encrypt_template(b, TEMPLATE)
    assert crypto.decrypt_template(b, env) == TEMPLATE
    _raises_exactly(BindingMismatchError, crypto.decrypt_template, dataclasses.replace(b, subject_id="客户-0043"), env)


# RFC 8998, appendix A.1: SM4-GCM test vector. Confirms that the installed `cryptography`
# implements SM4-GCM as specified, and that our framing (nonce || ciphertext || tag) opens it.
SM4_KEY = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")
SM4_IV = bytes.fromhex("00001234567800000000ABCD")
SM4_PT = bytes.fromhex(
    "AAAAAAAAAAAAAAAABBBBBBBBBBBBBBBBCCCCCCCCCCCCCCCCDDDDDDDDDDDDDDDD"
    "EEEEEEEEEEEEEEEEFFFFFFFFFFFFFFFFEEEEEEEEEEEEEEEEAAAAAAAAAAAAAAAA"
)
SM4_AAD = bytes.fromhex("FEEDFACEDEADBEEFFEEDFACEDEADBEEFABADDAD2")
SM4_CT = bytes.fromhex(
    "17F399F08C67D5EE19D0DC9969C4BB7D5FD46FD3756489069157B282BB200735"
    "D82710CA5C22F0CCFA7CBF93D496AC15A56834CBCF98C397B4024A2691233B8D"
)
SM4_TAG = bytes.fromhex("83DE3541E4C2B58177E065A9BF7B62EC")


def test_sm4_gcm_known_answer():
    assert aead.open_("SM4-GCM", SM4_KEY, SM4_IV + SM4_CT + SM4_TAG, SM4_AAD) == SM4_PT
    for bad in (SM4_IV + SM4_CT + bytes(16), SM4_IV + SM4_CT[:-1] + b"\0" + SM4_TAG):
        with pytest.raises(aead.AeadError):
            aead.open_("SM4-GCM", SM4_KEY, bad, SM4_AAD)
    with pytest.raises(aead.AeadError):
        aead.open_("SM4-GCM", SM4_KEY, SM4_IV + SM4_CT + SM4_TAG, SM4_AAD + b"x")


def test_sm4_keys_are_128_bit(tmp_path):
    kr = LocalKeyring(tmp_path / "k.json", cipher="SM4-GCM")
    doc = json.loads(kr.dump_json())
    assert len(base64.b64decode(doc["keys"][0]["material"])) == 16
    with pytest.raises(ValueError):
        aead.seal("SM4-GCM", bytes(32), b"x", b"")


def test_the_key_id_from_the_header_alone_is_the_whole_envelopes(crypto, binding):
    """Counting records per key from their first bytes and their size (a Redis member's header slice,
    services/voice/replay.py) must agree with parsing the whole envelope, a malformed one included."""
    from services.common.crypto.envelope import HEADER_MAX, header_key_id

    env = crypto.encrypt_template(binding, TEMPLATE)
    many_tags = bytearray(env)
    many_tags[5 + 32] = 255  # a field count the header cannot hold
    for whole in [env, *(env[:cut] for cut in range(0, 160)), env[:-len(TEMPLATE) - 17], b"XYZ" + env[3:],
                  bytes(many_tags), env[:4] + b"\xff" + env[5:]]:
        try:
            expected = envelope_key_id(whole)
        except TamperedEnvelopeError:
            expected = None
        for head in (whole[:HEADER_MAX], whole[: len(whole) - len(TEMPLATE)]):
            try:
                got = header_key_id(head, len(whole))
            except TamperedEnvelopeError:
                got = None
            assert got == expected, (len(whole), len(head))
