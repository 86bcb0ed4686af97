"""Verification of what binds a capture (CaptureBinding) or a device proof (DeviceProof) to its
session: the transaction context of services/mfa/binding.py, signed by a bound device's key, a
registered WebAuthn credential (checked by py_webauthn), the key a new device will register, or
submitted by a registered terminal of the session's channel.

Two kinds of failure. A binding that is missing or malformed is refused before anything happens
(:meth:`Proofs.shape` raises a ServiceError: CAPTURE_NOT_BOUND, INVALID_ARGUMENT, ...). A binding
that is well formed but does not hold (another session's context, other payloads, a signature that
does not verify) is an authentication failure: :class:`Refused` carries its reason, the factor
fails without the biometric service being asked, and the attempt counts.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass

from services.common import errors
from services.common.api.v1 import mfa_pb2
from services.mfa.config import WebAuthnConfig
from services.common.validation import identifier

from . import devices
from .binding import ContextError, canonical_json, parse_context, transaction_context, webauthn_challenge
from .keys import keyed_hash
from .reasons import Reason
from .storage import DeviceRecord, MfaStore

MAX_SIGNATURE = 256
MAX_WEBAUTHN_FIELD = 4096


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


@dataclass(frozen=True)
class Proven:
    kind: str  # "device", "webauthn", "new_device", "terminal"
    authenticator: str  # "device:<id>", "key:<sha256 prefix>", "terminal:<principal>"
    device_id: str | None = None
    pending_key: str | None = None  # new_device: SHA-256 of the key's SPKI
    terminal: str | None = None
    reasons: tuple[Reason, ...] = ()

    @property
    def proves_device(self) -> bool:
        """Possession of a key bound to the subject, over this session's context."""
        return self.kind in ("device", "webauthn")


class Refused(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.reason = Reason(code, message)


class Proofs:
    def __init__(self, store: MfaStore, webauthn: WebAuthnConfig, payee_key: bytes) -> None:
        self.store, self.webauthn, self._payee_key = store, webauthn, payee_key

    def payee_hash(self, tenant: str, payee: dict[str, str]) -> str:
        return keyed_hash(self._payee_key, tenant, canonical_json(payee).decode())

    # ------------------------------------------------------------------ shape (before anything runs)
    def shape(self, fc, binding: mfa_pb2.CaptureBinding | None, field: str) -> None:
        """Refuses a missing or malformed capture binding (fc: the FactorContext)."""
        which = binding.WhichOneof("proof") if binding is not None else None
        if which is None:
            raise errors.failed_precondition(
                f"{field} is required: a capture counts only when the device signs it with this session's "
                "transaction context (or a registered terminal submits it)", "CAPTURE_NOT_BOUND")
        assert binding is not None
        if which == "terminal":
            if binding.device_id or binding.public_key or binding.context:
                raise errors.invalid_argument(f"a terminal {field} carries no device, key or context",
                                              **{f"{field.replace('.', '__')}": "terminal binding with other fields"})
            caller = fc.caller
            # the session's channel, or the IVR calling the customer back (push fallback)
            channels = {fc.state.channel, fc.state.callback_channel} - {None}
            if caller.terminal_channel is None or caller.terminal_channel not in channels:
                raise errors.permission_denied(
                    f"the caller is not a registered terminal of the {fc.state.channel} channel: sign the capture "
                    "with the device key", "TERMINAL_NOT_REGISTERED")
            return
        key = field.replace(".", "__")
        if bool(binding.device_id) == bool(binding.public_key):
            raise errors.invalid_argument(f"{field}: set device_id (a bound device) or public_key (a new device)",
                                          **{f"{key}__device_id": "exactly one of device_id, public_key"})
        if binding.device_id:
            identifier(binding.device_id, f"{field}.device_id")
        if which == "signature":
            signature_size(binding.signature, f"{field}.signature")
        else:
            if binding.public_key:
                raise errors.invalid_argument(f"{field}: a WebAuthn assertion needs a registered credential",
                                              **{f"{key}__public_key": "not with webauthn"})
            assertion_shape(binding.webauthn, f"{field}.webauthn")
        if binding.public_key:
            devices.load_public_key(binding.public_key)
            if fc.state.device_usable or not fc.policy.binding.new_device_key:
                raise errors.failed_precondition(
                    "a new device's key cannot bind captures here: " + (
                        "the session runs on a bound device; sign with its key" if fc.state.device_usable
                        else "the policy does not allow it"), "NEW_DEVICE_KEY_NOT_ALLOWED")
        self._context_shape(fc, binding.context, f"{field}.context", "CAPTURE")

    def device_shape(self, fc, proof: mfa_pb2.DeviceProof) -> None:
        identifier(proof.device_id, "device.device_id")
        key_proof_shape(proof, "device")
        self._context_shape(fc, proof.context, "device.context", "DEVICE")

    @staticmethod
    def _context_shape(fc, given: bytes, field: str, prefix: str) -> None:
        if not given:
            if fc.state.payee:
                raise errors.failed_precondition(
                    f"{field} is required: the session has a payee, which the service keeps only as a keyed hash",
                    f"{prefix}_CONTEXT_REQUIRED")
            return
        try:
            parse_context(given)
        except ContextError as exc:
            raise errors.invalid_argument(f"{field}: {exc}", **{field.replace(".", "__"): "not a version-1 context"}) from None

    # ------------------------------------------------------------------ verification
    def _message(self, fc, given: bytes, evidence: list[str], prefix: str) -> bytes:
        """The bytes the signature must cover: those given, once every field matched the session."""
        st = fc.state
        if not given:
            return transaction_context(session_id=fc.session_id, nonce=st.nonce, tenant=fc.tenant,
                                       action=st.action, amount=st.amount, evidence=evidence)
        c = parse_context(given)
        if (c.session_id, c.nonce, c.tenant) != (fc.session_id, st.nonce, fc.tenant):
            raise Refused(f"{prefix}_FOR_OTHER_SESSION", "the signed context is of another session")
        payee = self.payee_hash(fc.tenant, c.payee) if c.payee is not None else None
        if c.action != st.action or c.amount != st.amount or payee != st.payee:
            raise Refused(f"{prefix}_CONTEXT_MISMATCH",
                          "the signed action, amount or payee is not what this session is for")
        if list(c.evidence) != evidence:
            raise Refused(f"{prefix}_EVIDENCE_MISMATCH",
                          "the signed payload digests are not those of the payloads received")
        return given

    def bound_device(self, fc, device_id: str, code: str) -> DeviceRecord:
        rec = self.store.devices.get(fc.tenant, device_id)
        if rec is None or rec.subject_id != fc.subject or rec.revoked_at is not None or not rec.public_key:
            raise Refused(code, "no bound device of this subject has that id")
        return rec

    def capture(self, fc, binding: mfa_pb2.CaptureBinding, evidence: list[str]) -> Proven:
        """Verifies a binding :meth:`shape` accepted; raises Refused."""
        which = binding.WhichOneof("proof")
        if which == "terminal":
            caller = fc.caller
            return Proven("terminal", f"terminal:{caller.name}", terminal=caller.name)
        message = self._message(fc, binding.context, evidence, "CAPTURE")
        if binding.public_key:
            if not devices.verify_signature(binding.public_key, binding.signature, message):
                raise Refused("CAPTURE_SIGNATURE_INVALID", "the signature over the transaction context does not verify")
            fp = hashlib.sha256(binding.public_key).hexdigest()
            if fc.state.pending_key not in (None, fp):
                raise Refused("CAPTURE_KEY_CHANGED", "another key signed this session's earlier captures")
            return Proven("new_device", f"key:{fp[:16]}", pending_key=fp)
        rec = self.bound_device(fc, binding.device_id, "CAPTURE_DEVICE_NOT_BOUND")
        kind = self.verify(fc, rec, binding.signature, binding.webauthn if which == "webauthn" else None,
                            message, "CAPTURE")
        return Proven(kind, f"device:{rec.id}", device_id=rec.id, reasons=self._mismatch(fc, rec))

    def device_proof(self, fc, proof: mfa_pb2.DeviceProof) -> Proven:
        message = self._message(fc, proof.context, [], "DEVICE")
        rec = self.bound_device(fc, proof.device_id, "DEVICE_NOT_BOUND")
        kind = self.verify(fc, rec, proof.signature, proof.webauthn if proof.HasField("webauthn") else None,
                            message, "DEVICE")
        return Proven(kind, f"device:{rec.id}", device_id=rec.id, reasons=self._mismatch(fc, rec))

    @staticmethod
    def _mismatch(fc, rec: DeviceRecord) -> tuple[Reason, ...]:
        if fc.state.device.device_id not in (None, rec.id):
            return (Reason("DEVICE_INFO_MISMATCH", "the key belongs to another bound device than reported"),)
        return ()

    def verify(self, fc, rec: DeviceRecord, signature: bytes, assertion, message: bytes, prefix: str) -> str:
        """The signature or WebAuthn assertion of ``rec`` over ``message``: its kind; raises Refused."""
        if assertion is None:
            if rec.kind != "key" or rec.public_key is None or not devices.verify_signature(rec.public_key, signature, message):
                raise Refused(f"{prefix}_SIGNATURE_INVALID", "the signature over the transaction context does not verify")
            return "device"
        from webauthn import verify_authentication_response
        from webauthn.helpers.exceptions import InvalidAuthenticationResponse

        if rec.kind != "webauthn" or rec.credential_public_key is None or b64url(assertion.credential_id) != rec.credential_id:
            raise Refused(f"{prefix}_SIGNATURE_INVALID", "the assertion is not of this device's WebAuthn credential")
        credential = {"id": rec.credential_id, "rawId": rec.credential_id, "type": "public-key", "response": {
            "authenticatorData": b64url(assertion.authenticator_data),
            "clientDataJSON": b64url(assertion.client_data_json), "signature": b64url(assertion.signature),
            **({"userHandle": b64url(assertion.user_handle)} if assertion.user_handle else {})}}
        try:
            verified = verify_authentication_response(
                credential=credential, expected_challenge=webauthn_challenge(message),
                expected_rp_id=self.webauthn.rp_id, expected_origin=list(self.webauthn.origins),
                credential_public_key=rec.credential_public_key, credential_current_sign_count=rec.sign_count,
                require_user_verification=self.webauthn.require_user_verification)
        except (InvalidAuthenticationResponse, ValueError, KeyError) as exc:
            raise Refused(f"{prefix}_SIGNATURE_INVALID", f"the WebAuthn assertion does not verify: {exc}") from None
        if verified.new_sign_count and not self.store.devices.advance_sign_count(
                fc.tenant, rec.id, rec.sign_count, verified.new_sign_count):
            raise Refused(f"{prefix}_SIGNATURE_INVALID", "the authenticator's counter moved concurrently (a clone?)")
        return "webauthn"


def key_proof_shape(proof, field: str) -> None:
    """A DeviceProof or PushAnswer: a signature, or a WebAuthn assertion, not both."""
    if proof.HasField("webauthn"):
        if proof.signature:
            raise errors.invalid_argument(f"{field}: a signature or a webauthn assertion, not both",
                                          **{f"{field}__signature": "not with webauthn"})
        assertion_shape(proof.webauthn, f"{field}.webauthn")
    else:
        signature_size(proof.signature, f"{field}.signature")


def signature_size(signature: bytes, field: str) -> None:
    if not signature or len(signature) > MAX_SIGNATURE:
        raise errors.invalid_argument(f"{field} must be 1..{MAX_SIGNATURE} bytes",
                                      **{field.replace(".", "__"): "missing or too long"})


def assertion_shape(a: mfa_pb2.WebAuthnAssertion, field: str) -> None:
    for name in ("credential_id", "authenticator_data", "client_data_json", "signature"):
        value = getattr(a, name)
        if not value or len(value) > MAX_WEBAUTHN_FIELD:
            raise errors.invalid_argument(f"{field}.{name} must be 1..{MAX_WEBAUTHN_FIELD} bytes",
                                          **{f"{field}.{name}".replace(".", "__"): "missing or too long"})
