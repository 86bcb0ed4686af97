"""A software WebAuthn authenticator for the tests: an EC P-256 key producing real
authenticatorData, clientDataJSON and signatures ("none" or packed self attestation), as a
platform authenticator would. What it makes is checked by py_webauthn inside the MFA service."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import struct

import cbor2
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from services.common.api.v1 import mfa_pb2
from services.mfa.binding import webauthn_challenge

UP, UV, AT = 0x01, 0x04, 0x40
ORIGIN = "https://localhost"


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class SoftAuthenticator:
    def __init__(self, rp_id: str = "localhost", origin: str = ORIGIN, counter: int = 0) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.credential_id = os.urandom(16)
        self.rp_id, self.origin, self.counter = rp_id, origin, counter

    def _cose_key(self) -> bytes:
        numbers = self.key.public_key().public_numbers()
        return cbor2.dumps({1: 2, 3: -7, -1: 1, -2: numbers.x.to_bytes(32, "big"), -3: numbers.y.to_bytes(32, "big")})

    def _auth_data(self, flags: int, attested: bytes = b"") -> bytes:
        return hashlib.sha256(self.rp_id.encode()).digest() + bytes([flags]) + struct.pack(">I", self.counter) + attested

    def _sign(self, data: bytes) -> bytes:
        return self.key.sign(data, ec.ECDSA(hashes.SHA256()))

    def create(self, options_json: str, attestation: str = "none", origin: str | None = None) -> str:
        """navigator.credentials.create() answering the service's options: the registration JSON."""
        options = json.loads(options_json)
        assert options["rp"]["id"] == self.rp_id
        client_data = json.dumps({"type": "webauthn.create", "challenge": options["challenge"],
                                  "origin": origin or self.origin, "crossOrigin": False}).encode()
        attested = (b"\0" * 16 + struct.pack(">H", len(self.credential_id)) + self.credential_id + self._cose_key())
        auth_data = self._auth_data(UP | UV | AT, attested)
        statement = {} if attestation == "none" else {
            "alg": -7, "sig": self._sign(auth_data + hashlib.sha256(client_data).digest())}
        attestation_object = cbor2.dumps({"fmt": attestation, "attStmt": statement, "authData": auth_data})
        return json.dumps({"id": b64url(self.credential_id), "rawId": b64url(self.credential_id),
                           "type": "public-key", "clientExtensionResults": {},
                           "response": {"clientDataJSON": b64url(client_data),
                                        "attestationObject": b64url(attestation_object)}})

    def get(self, challenge: bytes, origin: str | None = None) -> mfa_pb2.WebAuthnAssertion:
        """navigator.credentials.get() over ``challenge``; the counter moves on each use."""
        self.counter += 1
        client_data = json.dumps({"type": "webauthn.get", "challenge": b64url(challenge),
                                  "origin": origin or self.origin, "crossOrigin": False}).encode()
        auth_data = self._auth_data(UP | UV)
        return mfa_pb2.WebAuthnAssertion(credential_id=self.credential_id, authenticator_data=auth_data,
                                         client_data_json=client_data,
                                         signature=self._sign(auth_data + hashlib.sha256(client_data).digest()))

    def assert_context(self, context: bytes) -> mfa_pb2.WebAuthnAssertion:
        """An assertion binding a transaction context: its challenge is the context's SHA-256."""
        return self.get(webauthn_challenge(context))
