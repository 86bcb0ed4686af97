"""Device fingerprints with drift tolerance, device-key signatures, and the signed decision
tokens: JWKS verification, tampering, expiry and key rotation."""

from __future__ import annotations

import json
import time

import jwt
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa, utils
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from services.common.errors import ServiceError
from services.mfa.storage import DeviceRecord
from services.mfa import devices
from services.mfa.tokens import SigningKeys, TokenIssuer, verify_token
from tests.mfa.conftest import phone_device

KEY = b"k" * 32


def canon(**changes):
    info = phone_device()
    for k, v in changes.items():
        setattr(info, k, v)
    return devices.canonical(info, KEY, "bank")


def bound(dev):
    return [DeviceRecord("bank", "c1", dev.fingerprint, attributes=dev.soft)]


@pytest.mark.parametrize("changes,state", [
    ({}, "bound"),
    ({"os_version": "14.3"}, "drifted"),  # OS minor update
    ({"os_version": "15.0"}, "drifted"),  # OS major update
    ({"app_version": "6.0.1", "os_version": "14.2.1"}, "drifted"),
    ({"screen_width": 2400, "screen_height": 1080}, "bound"),  # rotated: same screen
    ({"model": "Galaxy S24"}, "new"),  # the install id copied to another phone
    ({"install_id": "another-install"}, "new"),
    ({"platform": "ios"}, "new"),
])
def test_fingerprint_tolerates_benign_drift_only(changes, state):
    original = canon()
    assert devices.match(canon(**changes), bound(original), 0.7)[0] == state


def test_fingerprints_are_keyed_per_tenant_and_reveal_no_attribute():
    a, b = canon(), devices.canonical(phone_device(), KEY, "other-bank")
    assert a.fingerprint != b.fingerprint and "inst-7f3a" not in a.fingerprint
    assert devices.canonical(phone_device(), b"x" * 32, "bank").fingerprint != a.fingerprint
    assert devices.match(canon(), [], 0.7) == ("unbound", None)


@pytest.mark.parametrize("field,value", [("platform", "nokia"), ("model", "x" * 200)])
def test_bad_device_info_is_invalid_argument(field, value):
    with pytest.raises(ServiceError) as err:
        canon(**{field: value})
    assert err.value.code.name == "INVALID_ARGUMENT" and err.value.field_violations


def _der(public):
    return public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def test_ed25519_and_p256_signatures_over_the_nonce():
    nonce = b"nonce-123"
    ed = Ed25519PrivateKey.generate()
    assert devices.verify_signature(_der(ed.public_key()), ed.sign(nonce), nonce)
    assert not devices.verify_signature(_der(ed.public_key()), ed.sign(b"other"), nonce)
    p256 = ec.generate_private_key(ec.SECP256R1())
    der_sig = p256.sign(nonce, ec.ECDSA(hashes.SHA256()))
    assert devices.verify_signature(_der(p256.public_key()), der_sig, nonce)
    r, s = utils.decode_dss_signature(der_sig)
    raw = r.to_bytes(32, "big") + s.to_bytes(32, "big")  # WebCrypto's format
    assert devices.verify_signature(_der(p256.public_key()), raw, nonce)
    assert not devices.verify_signature(_der(p256.public_key()), b"\x00" * 64, nonce)
    assert not devices.verify_signature(_der(p256.public_key()), b"garbage", nonce)


@pytest.mark.parametrize("key", [
    lambda: _der(rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()),
    lambda: _der(ec.generate_private_key(ec.SECP384R1()).public_key()),
    lambda: b"not a key",
    lambda: b"",
])
def test_other_key_types_are_refused(key):
    with pytest.raises(ServiceError) as err:
        devices.load_public_key(key())
    assert err.value.code.name == "INVALID_ARGUMENT"


# --- signed decisions --------------------------------------------------------------------------

class Clock:
    def __init__(self):
        self.t = time.time()  # relying parties check exp against the real time

    def __call__(self):
        return self.t


CLAIMS = {"aud": "bank", "sub": "ps1_abc", "sid": "ses_1", "decision": "allow", "amr": ["face"], "acr": "aal2"}


@pytest.fixture
def signer(tmp_path):
    clock = Clock()
    keys = SigningKeys(tmp_path / "keys.json", token_ttl_s=120, max_age_s=86400, clock=clock)
    return keys, TokenIssuer(keys, "biogate-mfa", 120), clock


def test_a_token_verifies_with_the_served_jwks(signer):
    keys, issuer, clock = signer
    token, exp = issuer.issue(CLAIMS, clock())
    claims = verify_token(token, json.dumps(keys.jwks()), "biogate-mfa", "bank")
    assert claims["decision"] == "allow" and exp - claims["iat"] == 120
    assert jwt.get_unverified_header(token)["alg"] == "EdDSA"
    jwk = keys.jwks()["keys"][0]
    assert jwk["kty"] == "OKP" and jwk["crv"] == "Ed25519" and "d" not in jwk  # public only


def test_a_tampered_or_expired_token_fails(signer):
    keys, issuer, clock = signer
    jwks = json.dumps(keys.jwks())
    token, _ = issuer.issue(CLAIMS)
    head, body, sig = token.split(".")
    body2 = jwt.utils.base64url_encode(json.dumps({**jwt.decode(token, options={"verify_signature": False}),
                                                   "sid": "ses_2"}).encode()).decode()
    with pytest.raises(jwt.InvalidSignatureError):
        verify_token(f"{head}.{body2}.{sig}", jwks, "biogate-mfa", "bank")
    other = Ed25519PrivateKey.generate()
    with pytest.raises(jwt.InvalidTokenError):
        verify_token(jwt.encode({**CLAIMS, "exp": 2**40, "iat": 1}, other, algorithm="EdDSA",
                                headers={"kid": keys.jwks()["keys"][0]["kid"]}), jwks, "biogate-mfa", "bank")
    with pytest.raises(jwt.InvalidTokenError):  # alg=none
        verify_token(jwt.encode({**CLAIMS, "exp": 2**40, "iat": 1}, None, algorithm="none"), jwks, "biogate-mfa", "bank")  # type: ignore[arg-type]  # alg none: no key
    old, _ = issuer.issue(CLAIMS, now=clock() - 1000)
    with pytest.raises(jwt.ExpiredSignatureError):
        verify_token(old, jwks, "biogate-mfa", "bank")


def _hs256_with(secret: bytes, kid: str, claims: dict) -> str:
    """Algorithm confusion: an HMAC token whose secret is public (the JWK's x, the JWKS text)."""
    import base64
    import hashlib
    import hmac

    def b64(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    signing_input = b64(json.dumps({"alg": "HS256", "kid": kid}).encode()) + "." + b64(json.dumps(claims).encode())
    return signing_input + "." + b64(hmac.new(secret, signing_input.encode(), hashlib.sha256).digest())


def test_algorithm_confusion_another_audience_or_issuer_and_an_unknown_kid_fail(signer):
    keys, issuer, clock = signer
    jwks = json.dumps(keys.jwks())
    jwk = keys.jwks()["keys"][0]
    token, _ = issuer.issue(CLAIMS)
    claims = jwt.decode(token, options={"verify_signature": False})
    for secret in (jwk["x"].encode(), jwks.encode()):
        with pytest.raises(jwt.InvalidAlgorithmError):
            verify_token(_hs256_with(secret, jwk["kid"], claims), jwks, "biogate-mfa", "bank")
    with pytest.raises(jwt.InvalidAudienceError):  # a token of another tenant
        verify_token(token, jwks, "biogate-mfa", "bank-b")
    with pytest.raises(jwt.InvalidIssuerError):
        verify_token(token, jwks, "another-issuer", "bank")
    other = SigningKeys(keys.vault.path.with_name("other.json"), 120, 86400, clock=clock)
    with pytest.raises(jwt.InvalidKeyError):  # a kid the relying party's key set does not hold
        verify_token(token, json.dumps(other.jwks()), "biogate-mfa", "bank")
    es256 = jwt.encode({**claims, "exp": 2**40}, ec.generate_private_key(ec.SECP256R1()), algorithm="ES256",
                       headers={"kid": jwk["kid"]})
    with pytest.raises(jwt.InvalidAlgorithmError):  # ES256 under an Ed25519 key's kid
        verify_token(es256, jwks, "biogate-mfa", "bank")


def test_rotation_keeps_unexpired_old_tokens_valid_then_drops_the_old_key(signer, tmp_path):
    keys, issuer, clock = signer
    now = clock.t
    token, _ = issuer.issue(CLAIMS, now)
    old_kid = jwt.get_unverified_header(token)["kid"]
    new_kid = keys.rotate()
    assert new_kid != old_kid
    jwks = keys.jwks()
    assert {k["kid"] for k in jwks["keys"]} == {old_kid, new_kid}
    assert verify_token(token, json.dumps(jwks), "biogate-mfa", "bank")["sid"] == "ses_1"
    fresh, _ = issuer.issue(CLAIMS, now)
    assert jwt.get_unverified_header(fresh)["kid"] == new_kid
    # a second replica reading the same file serves the same keys
    replica = SigningKeys(tmp_path / "keys.json", token_ttl_s=120, max_age_s=86400, clock=clock)
    assert replica.jwks() == jwks
    clock.t = now + 120 + 61  # every token of the old key has expired
    assert {k["kid"] for k in keys.jwks()["keys"]} == {new_kid}


def test_keys_rotate_by_age_and_the_file_is_private(tmp_path):
    clock = Clock()
    keys = SigningKeys(tmp_path / "k.json", token_ttl_s=60, max_age_s=3600, clock=clock)
    first = keys.current()[0]
    clock.t += 3601
    assert keys.current()[0] != first
    assert (tmp_path / "k.json").stat().st_mode & 0o077 == 0
