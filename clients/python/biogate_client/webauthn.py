"""Passkeys (WebAuthn) from a bank's web back end: the browser signs, the back end relays.

For a capture or a device proof, the challenge the browser passes to ``navigator.credentials.get()``
is the base64url SHA-256 of the session's transaction context (:func:`assertion_challenge`); the
browser's ``PublicKeyCredential.toJSON()`` becomes the proto's assertion with :func:`assertion`.
"""

from __future__ import annotations

import base64
import json

from ._api.v1 import mfa_pb2
from .context import webauthn_challenge


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def assertion_challenge(context: bytes) -> str:
    """The ``challenge`` (base64url) of navigator.credentials.get() that binds ``context``."""
    return b64url(webauthn_challenge(context))


def assertion(credential_json: str | dict) -> mfa_pb2.WebAuthnAssertion:
    """A WebAuthnAssertion from the browser's PublicKeyCredential.toJSON() of an assertion."""
    cred = json.loads(credential_json) if isinstance(credential_json, str) else credential_json
    response = cred["response"]
    return mfa_pb2.WebAuthnAssertion(
        credential_id=unb64url(cred["rawId"]), authenticator_data=unb64url(response["authenticatorData"]),
        client_data_json=unb64url(response["clientDataJSON"]), signature=unb64url(response["signature"]),
        user_handle=unb64url(response.get("userHandle") or ""))
