"""The per-subject registry of bound devices: binding only after a strong authentication in the
same session (a raw public key, or a WebAuthn credential registered against options whose
challenge is bound to that session), listing, and revocation, each binding and revocation an
audit record.

A session whose captures a new device signed with its own key (CaptureBinding.public_key) may bind
that key only: the key that proved the captures is the key that becomes the possession factor.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from datetime import datetime

from cryptography.hazmat.primitives import serialization

from services.common import errors
from services.common.context import Principal
from services.common.api.v1 import mfa_pb2
from services.mfa.config import WebAuthnConfig
from services.common.runtime import Runtime
from services.common.storage import AlreadyExistsError, new_id
from services.common.subjects import timestamp
from services.common.validation import identifier, subject_ref

from . import devices, requests
from .binding import registration_challenge
from .fusion import ACR_RANK
from .policy import PolicyStore
from .proofs import b64url
from .sessions import Session, Sessions
from .storage import DeviceRecord, MfaStore

MAX_REGISTRATION_JSON = 64 * 1024


class DeviceRegistry:
    def __init__(self, rt: Runtime, store: MfaStore, sessions: Sessions, policies: PolicyStore, device_key: bytes,
                 clock: Callable[[], datetime], webauthn: WebAuthnConfig) -> None:
        self.rt, self.store, self.sessions, self.policies = rt, store, sessions, policies
        self._device_key, self.clock, self.webauthn = device_key, clock, webauthn

    def _strong(self, rec: Session, now: datetime) -> None:
        """The session holds an ALLOW strong and recent enough to bind a device, and bound none yet; where
        the policy has a bind_device action and the subject a bound device, it is of that action (a
        new phone is confirmed from the old one: the SIM-swap defence)."""
        binding = self.policies.get(rec.tenant_id).factors.device.binding
        decision = rec.state.decision
        if decision is None or decision.outcome != "allow" or ACR_RANK.get(decision.acr, 0) < ACR_RANK[binding.min_acr]:
            raise errors.failed_precondition(
                f"binding a device needs an ALLOW decision of at least {binding.min_acr} in this session",
                "STRONG_AUTHENTICATION_REQUIRED")
        if (now - decision.at).total_seconds() > binding.within_s:
            raise errors.failed_precondition("the authentication is too old to bind a device; authenticate again",
                                             "AUTHENTICATION_TOO_OLD")
        if rec.state.bound_device_id:
            raise errors.failed_precondition("this session already bound a device", "ALREADY_BOUND_IN_SESSION")
        policy = self.policies.get(rec.tenant_id)
        if ("bind_device" in policy.actions and rec.state.action != "bind_device"
                and self.store.devices.list_for_subject(rec.tenant_id, rec.subject_id)):
            raise errors.failed_precondition(
                "the subject has a bound device: binding another takes a session of the bind_device action "
                "(confirmed on the bound device, or by the policy's fallback)", "BIND_DEVICE_ACTION_REQUIRED")

    def registration_options(self, req: mfa_pb2.StartDeviceRegistrationRequest,
                             caller: Principal) -> mfa_pb2.StartDeviceRegistrationResponse:
        from webauthn import generate_registration_options, options_to_json
        from webauthn.helpers.cose import COSEAlgorithmIdentifier
        from webauthn.helpers.structs import (
            AttestationConveyancePreference, AuthenticatorSelectionCriteria, PublicKeyCredentialDescriptor,
            ResidentKeyRequirement, UserVerificationRequirement,
        )

        now = self.clock()
        rec = self.sessions.load(req.session_id, now, caller)
        self._strong(rec, now)
        cfg = self.webauthn
        pseudonym = self.rt.pseudonymize(rec.tenant_id, rec.subject_id)  # never the bank's customer reference
        existing = [d.credential_id for d in self.store.devices.list_for_subject(rec.tenant_id, rec.subject_id)
                    if d.credential_id]
        options = generate_registration_options(
            rp_id=cfg.rp_id, rp_name=cfg.rp_name, user_name=pseudonym,
            user_id=hashlib.sha256(pseudonym.encode()).digest(),
            challenge=registration_challenge(rec.id, rec.state.nonce, rec.tenant_id), timeout=cfg.timeout_ms,
            attestation=AttestationConveyancePreference(cfg.attestation),
            authenticator_selection=AuthenticatorSelectionCriteria(
                resident_key=ResidentKeyRequirement.DISCOURAGED,
                user_verification=UserVerificationRequirement.REQUIRED if cfg.require_user_verification
                else UserVerificationRequirement.PREFERRED),
            exclude_credentials=[PublicKeyCredentialDescriptor(id=_unb64url(c)) for c in existing],
            supported_pub_key_algs=[COSEAlgorithmIdentifier.ECDSA_SHA_256, COSEAlgorithmIdentifier.EDDSA])
        return mfa_pb2.StartDeviceRegistrationResponse(options_json=options_to_json(options))

    def register(self, req: mfa_pb2.RegisterDeviceRequest, caller: Principal) -> mfa_pb2.RegisterDeviceResponse:
        now = self.clock()
        rec = self.sessions.load(req.session_id, now, caller)
        if devices.is_absent(req.device):
            raise errors.invalid_argument("device is required", device="required")
        device = devices.canonical(req.device, self._device_key, rec.tenant_id)
        if req.webauthn_registration_json:
            if req.public_key:
                raise errors.invalid_argument("send public_key or webauthn_registration_json, not both",
                                              public_key="not with webauthn_registration_json")
            registration = _registration_json(req.webauthn_registration_json)
        else:
            devices.load_public_key(req.public_key)
        label = requests.label(req.label, "label")
        self._strong(rec, now)
        if device.fingerprint != rec.state.device.fp:
            raise errors.failed_precondition("only the device that authenticated in this session can be bound",
                                             "DEVICE_MISMATCH")
        credential: dict = {"public_key": req.public_key}
        if req.webauthn_registration_json:
            credential = self._verify_registration(rec, registration)
        if rec.state.pending_key and hashlib.sha256(credential["public_key"]).hexdigest() != rec.state.pending_key:
            raise errors.failed_precondition(
                "this session's captures were signed by another key: only that key can be bound here",
                "DEVICE_KEY_MISMATCH")
        device_id = "dev_" + new_id()

        def change(st):
            if st.bound_device_id:
                raise errors.failed_precondition("this session already bound a device", "ALREADY_BOUND_IN_SESSION")
            st.bound_device_id = device_id
        with self.rt.storage.transaction():  # the session's claim, the device and its audit record together
            rec = self.sessions.mutate(rec, change)
            try:
                self.store.devices.add(DeviceRecord(
                    rec.tenant_id, rec.subject_id, device.fingerprint, credential["public_key"], device.soft, label,
                    device.platform, id=device_id, bound_at=now, kind=credential.get("kind", "key"),
                    credential_id=credential.get("credential_id"),
                    credential_public_key=credential.get("credential_public_key"),
                    sign_count=credential.get("sign_count", 0)))
            except AlreadyExistsError:
                raise errors.already_exists("this device or credential is already bound", "DEVICE_ALREADY_BOUND") from None
            self.rt.audit.append("mfa.device_bound", caller.name, rec.tenant_id, rec.subject_id, {
                "session_id": rec.id, "device_id": device_id, "platform": device.platform,
                "kind": credential.get("kind", "key"), **({"attestation": credential["fmt"]} if "fmt" in credential else {})})
        return mfa_pb2.RegisterDeviceResponse(device_id=device_id)

    def _verify_registration(self, rec: Session, registration: dict) -> dict:
        from webauthn import verify_registration_response
        from webauthn.helpers import decode_credential_public_key, decoded_public_key_to_cryptography
        from webauthn.helpers.cose import COSEAlgorithmIdentifier
        from webauthn.helpers.exceptions import InvalidRegistrationResponse, WebAuthnException

        cfg = self.webauthn
        try:
            verified = verify_registration_response(
                credential=registration, expected_challenge=registration_challenge(rec.id, rec.state.nonce, rec.tenant_id),
                expected_rp_id=cfg.rp_id, expected_origin=list(cfg.origins),
                require_user_verification=cfg.require_user_verification,
                supported_pub_key_algs=[COSEAlgorithmIdentifier.ECDSA_SHA_256, COSEAlgorithmIdentifier.EDDSA])
            key = decoded_public_key_to_cryptography(decode_credential_public_key(verified.credential_public_key))
        except (InvalidRegistrationResponse, WebAuthnException, ValueError, KeyError, TypeError) as exc:
            raise errors.invalid_argument(f"webauthn_registration_json does not verify: {exc}", "WEBAUTHN_REGISTRATION_INVALID",
                                          webauthn_registration_json="does not verify") from None
        spki = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        devices.load_public_key(spki)  # P-256 or Ed25519 only
        return {"public_key": spki, "kind": "webauthn", "credential_id": b64url(verified.credential_id),
                "credential_public_key": verified.credential_public_key, "sign_count": verified.sign_count,
                "fmt": str(verified.fmt.value if hasattr(verified.fmt, "value") else verified.fmt)}

    def list(self, req: mfa_pb2.ListDevicesRequest) -> mfa_pb2.ListDevicesResponse:
        tenant, subject = subject_ref(req.subject)
        return mfa_pb2.ListDevicesResponse(devices=[
            mfa_pb2.BoundDevice(device_id=d.id, label=d.label, platform=d.platform, bound_at=timestamp(d.bound_at),
                                last_seen_at=timestamp(d.last_seen_at) if d.last_seen_at else None,
                                revoked=d.revoked_at is not None, kind=d.kind)
            for d in self.store.devices.list_for_subject(tenant, subject, include_revoked=True)])

    def revoke(self, req: mfa_pb2.RevokeDeviceRequest, caller: Principal) -> mfa_pb2.RevokeDeviceResponse:
        tenant, subject = subject_ref(req.subject)
        device_id = identifier(req.device_id, "device_id")
        rec = self.store.devices.get(tenant, device_id)
        if rec is None or rec.subject_id != subject:
            raise errors.not_found("the subject has no device with that id", "DEVICE_NOT_FOUND")
        with self.rt.storage.transaction():  # the revocation and its audit record, or neither
            if self.store.devices.revoke(tenant, device_id, self.clock()):
                self.rt.audit.append("mfa.device_revoked", caller.name, tenant, subject, {"device_id": device_id})
        return mfa_pb2.RevokeDeviceResponse()


def _unb64url(text: str) -> bytes:
    import base64

    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _registration_json(text: str) -> dict:
    if len(text) > MAX_REGISTRATION_JSON:
        raise errors.invalid_argument("webauthn_registration_json is too long",
                                      webauthn_registration_json="too long")
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict) or not isinstance(value.get("response"), dict):
        raise errors.invalid_argument("webauthn_registration_json must be a PublicKeyCredential's JSON",
                                      webauthn_registration_json="not a registration response")
    return value
