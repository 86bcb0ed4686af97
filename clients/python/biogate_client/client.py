"""The BioGate client: one object holding channels to the face, voice and MFA services, with the
calls a bank's systems make, and :class:`Session` for one authentication (login or payment).

Every method raises a :class:`~biogate_client.errors.BioGateError` subclass when the service
refuses, and returns the service's protobuf response otherwise (fields as in proto/biogate/v1).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc
import jwt

from ._api.v1 import (
    common_pb2, face_pb2, face_pb2_grpc, mfa_pb2, mfa_pb2_grpc, voice_pb2, voice_pb2_grpc,
)
from . import webauthn
from .context import payload_digest, shown, transaction_context
from .credentials import DEV_CREDENTIALS, Credentials, dev_credentials
from .device import Device
from .errors import from_rpc_error
from .tokens import ISSUER, verify_decision

R = TypeVar("R")
MODALITIES = {"face": common_pb2.MODALITY_FACE, "voice": common_pb2.MODALITY_VOICE}
CHANNELS = {"app": mfa_pb2.CHANNEL_APP, "kiosk": mfa_pb2.CHANNEL_KIOSK, "ivr": mfa_pb2.CHANNEL_IVR,
            "web": mfa_pb2.CHANNEL_WEB}
OUTCOMES = {mfa_pb2.OUTCOME_ALLOW: "ALLOW", mfa_pb2.OUTCOME_STEP_UP: "STEP_UP", mfa_pb2.OUTCOME_DENY: "DENY",
            mfa_pb2.OUTCOME_REVIEW: "REVIEW", mfa_pb2.OUTCOME_UNSPECIFIED: "UNSPECIFIED"}


def subject_ref(tenant: str, subject: str) -> common_pb2.SubjectRef:
    return common_pb2.SubjectRef(tenant_id=tenant, subject_id=subject)


def outcome_name(outcome: int) -> str:
    """"ALLOW", "STEP_UP", "DENY" or "REVIEW"."""
    return OUTCOMES.get(outcome, str(outcome))  # type: ignore[call-overload]


class BioGate:
    """Channels to the three services. ``mfa``, ``face``, ``voice``: "host:port" (the development
    defaults); ``credentials``: a bearer token and/or TLS files; ``timeout``: per call, in seconds
    (model calls on a loaded CPU can take tens of seconds)."""

    def __init__(self, mfa: str = "127.0.0.1:50053", face: str = "127.0.0.1:50051", voice: str = "127.0.0.1:50052",
                 credentials: Credentials | None = None, timeout: float = 120.0) -> None:
        creds = credentials or Credentials()
        self.timeout = timeout
        self._channels = [creds.channel(t) for t in (mfa, face, voice)]
        self.mfa = mfa_pb2_grpc.MfaServiceStub(self._channels[0])
        self.face = face_pb2_grpc.FaceServiceStub(self._channels[1])
        self.voice = voice_pb2_grpc.VoiceServiceStub(self._channels[2])
        self._jwks: dict[str, Any] | None = None

    @classmethod
    def development(cls, credentials_file: Path | str = DEV_CREDENTIALS, role: str = "dev-all",
                    **addresses: str) -> BioGate:
        """A client of a development installation: the token of ``role`` from var/dev-credentials.json;
        addresses from the arguments, else $BIOGATE_MFA_ADDRESS, $BIOGATE_FACE_ADDRESS,
        $BIOGATE_VOICE_ADDRESS, else the embedded defaults."""
        for name in ("mfa", "face", "voice"):
            if name not in addresses and os.environ.get(f"BIOGATE_{name.upper()}_ADDRESS"):
                addresses[name] = os.environ[f"BIOGATE_{name.upper()}_ADDRESS"]
        return cls(addresses.get("mfa", "127.0.0.1:50053"), addresses.get("face", "127.0.0.1:50051"),
                   addresses.get("voice", "127.0.0.1:50052"), dev_credentials(credentials_file, role))

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    def __enter__(self) -> BioGate:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, method: Callable[..., R], request: Any, timeout: float | None = None) -> R:
        """One RPC through a stub's ``method``, a refusal raised as a typed BioGateError."""
        try:
            return method(request, timeout=timeout or self.timeout)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    # ------------------------------------------------------------------ consent, contact, erasure
    def record_consent(self, tenant: str, subject: str, modalities: Sequence[str] = ("face", "voice"),
                       policy_version: str = "privacy-2025-01", identification: bool = False,
                       evidence_ref: str = "") -> common_pb2.Consent:
        """Records the subject's consent to biometric verification (``identification``: to 1:N
        search) in ``modalities``; ``policy_version``: the privacy notice the subject accepted."""
        purpose = (common_pb2.CONSENT_PURPOSE_BIOMETRIC_IDENTIFICATION if identification
                   else common_pb2.CONSENT_PURPOSE_BIOMETRIC_VERIFICATION)
        consent = common_pb2.Consent(subject=subject_ref(tenant, subject), purpose=purpose, granted=True,
                                     modalities=[MODALITIES[m] for m in modalities],
                                     policy_version=policy_version, evidence_ref=evidence_ref)
        return self.call(self.mfa.RecordConsent, common_pb2.RecordConsentRequest(consent=consent)).consent

    def set_phone(self, tenant: str, subject: str, phone_e164: str) -> str:
        """Stores the number SMS codes go to (encrypted); returns it masked."""
        return self.call(self.mfa.SetPhoneNumber, mfa_pb2.SetPhoneNumberRequest(
            subject=subject_ref(tenant, subject), phone_e164=phone_e164)).masked_phone

    def delete_subject(self, tenant: str, subject: str, reason: str = "erasure-request") -> common_pb2.DeleteSubjectResponse:
        """Erases the subject everywhere (templates of every modality, devices, OTP state, consents)."""
        return self.call(self.mfa.DeleteSubject, common_pb2.DeleteSubjectRequest(
            subject=subject_ref(tenant, subject), reason=reason))

    # ------------------------------------------------------------------ face
    def enrol_face(self, tenant: str, subject: str, images: Sequence[bytes], replace: bool = True
                   ) -> face_pb2.EnrollFaceResponse:
        """Enrols encoded images (JPEG, PNG) of the subject's face (needs a recorded consent)."""
        return self.call(self.face.Enroll, face_pb2.EnrollFaceRequest(
            subject=subject_ref(tenant, subject), images=[common_pb2.Image(data=i) for i in images], replace=replace))

    def verify_face(self, tenant: str, subject: str, image: bytes, liveness: bool = True) -> face_pb2.VerifyFaceResponse:
        """1:1 verification of ``image`` against the subject's template, with passive liveness."""
        return self.call(self.face.Verify, face_pb2.VerifyFaceRequest(
            subject=subject_ref(tenant, subject), image=common_pb2.Image(data=image), require_liveness=liveness))

    def identify_face(self, tenant: str, image: bytes, top_k: int = 5) -> face_pb2.IdentifyFaceResponse:
        """1:N search among the subjects who consented to identification."""
        return self.call(self.face.Identify, face_pb2.IdentifyFaceRequest(
            tenant_id=tenant, image=common_pb2.Image(data=image), top_k=top_k))

    # ------------------------------------------------------------------ voice
    def enrol_voice(self, tenant: str, subject: str, utterances: Sequence[bytes], replace: bool = True
                    ) -> voice_pb2.EnrollVoiceResponse:
        """Enrols recordings (WAV or FLAC; a few seconds of net speech each)."""
        return self.call(self.voice.Enroll, voice_pb2.EnrollVoiceRequest(
            subject=subject_ref(tenant, subject), utterances=[common_pb2.Audio(data=u) for u in utterances],
            replace=replace))

    def voice_challenge(self, tenant: str, subject: str) -> voice_pb2.StartVoiceChallengeResponse:
        """Digits the caller must say (``digits``) and the nonce that verification quotes."""
        return self.call(self.voice.StartVoiceChallenge, voice_pb2.StartVoiceChallengeRequest(
            subject=subject_ref(tenant, subject)))

    def verify_voice(self, tenant: str, subject: str, audio: bytes, challenge_nonce: str = "",
                     audio_format: common_pb2.AudioFormat | None = None) -> voice_pb2.VerifyVoiceResponse:
        """1:1 verification of a recording answering the digit challenge ``challenge_nonce``."""
        return self.call(self.voice.Verify, voice_pb2.VerifyVoiceRequest(
            subject=subject_ref(tenant, subject), challenge_nonce=challenge_nonce,
            audio=common_pb2.Audio(data=audio, format=audio_format)))

    def stream_voice(self, tenant: str, subject: str, chunks: Iterable[bytes], challenge_nonce: str = "",
                     encoding: common_pb2.AudioEncoding = common_pb2.AUDIO_ENCODING_MULAW, sample_rate_hz: int = 8000
                     ) -> voice_pb2.VerifyVoiceResponse:
        """Verification of IVR audio as it arrives: raw chunks (G.711 mu-law 8 kHz by default;
        A-law or LINEAR16 with ``encoding``), the telephone channel; the end message, which lets
        the answer be decided, is sent once ``chunks`` has ended."""
        header = voice_pb2.StreamVerifyVoiceRequest.Header(
            subject=subject_ref(tenant, subject), challenge_nonce=challenge_nonce,
            channel=voice_pb2.VOICE_CHANNEL_TELEPHONE,
            format=common_pb2.AudioFormat(encoding=encoding, sample_rate_hz=sample_rate_hz))

        def parts():
            yield voice_pb2.StreamVerifyVoiceRequest(header=header)
            sent = 0
            for chunk in chunks:
                sent += len(chunk)
                yield voice_pb2.StreamVerifyVoiceRequest(chunk=chunk)
            yield voice_pb2.StreamVerifyVoiceRequest(end=voice_pb2.StreamVerifyVoiceRequest.End(audio_bytes=sent))

        return self.call(self.voice.StreamVerify, parts())

    # ------------------------------------------------------------------ MFA sessions
    def start(self, tenant: str, subject: str, device: Device | None = None, *, action: str = "login",
              channel: str = "app", amount: tuple[str, int] | None = None, payee: tuple[str, str] | None = None,
              conversation_text: str = "", idempotency_key: str = "") -> Session:
        """Opens an authentication session. ``device``: the customer's app or browser (it signs
        the captures; None on a terminal channel); ``amount``: (currency, minor units) and
        ``payee``: (name, masked account) as shown to the user, for payments."""
        req = mfa_pb2.StartAuthenticationRequest(
            subject=subject_ref(tenant, subject), channel=CHANNELS[channel], action=action,
            context=mfa_pb2.ContextSignals(conversation_text=conversation_text), idempotency_key=idempotency_key)
        if device is not None:
            req.device.CopyFrom(device.device)
        if amount is not None:
            req.amount.CopyFrom(mfa_pb2.Money(currency=amount[0], amount_minor=amount[1]))
        if payee is not None:
            req.payee.CopyFrom(mfa_pb2.Payee(name=payee[0], account_masked=payee[1]))
        response = self.call(self.mfa.StartAuthentication, req)
        if device is not None:
            device.opened(req, response)
        return Session(self, req, response, device)

    # ------------------------------------------------------------------ decisions
    def signing_keys(self, refresh: bool = False) -> dict[str, Any]:
        """The JWK set of the decision tokens (MfaService.GetSigningKeys), cached."""
        import json

        if self._jwks is None or refresh:
            self._jwks = json.loads(self.call(self.mfa.GetSigningKeys, mfa_pb2.GetSigningKeysRequest()).jwks_json)
        return self._jwks

    def verify_token(self, token: str, tenant: str, session_id: str, *, action: str | None = None,
                     amount: tuple[str, int] | None = None, jwks: dict | str | None = None,
                     issuer: str = ISSUER) -> dict[str, Any]:
        """The claims of an ALLOW's token, verified against ``jwks`` (a dict, JSON text or a URL
        such as the MFA's /.well-known/jwks.json) or else the keys from GetSigningKeys (fetched
        again once if the token names a key not cached: a rotation). ``issuer``: the
        deployment's ``mfa.issuer``."""
        def check(keys: dict | str) -> dict[str, Any]:
            return verify_decision(token, keys, tenant=tenant, session_id=session_id, issuer=issuer, action=action,
                                   amount=amount)

        if jwks is not None:
            return check(jwks)
        try:
            return check(self.signing_keys())
        except jwt.InvalidKeyError:
            return check(self.signing_keys(refresh=True))

    # ------------------------------------------------------------------ reviews, devices, lockout
    def list_reviews(self, tenant: str, status: str = "pending", page_size: int = 50) -> list[mfa_pb2.Review]:
        """Reviews of ``status`` ("pending", "approved", "rejected"), all pages."""
        out: list[mfa_pb2.Review] = []
        token = ""
        while True:
            page = self.call(self.mfa.ListReviews, mfa_pb2.ListReviewsRequest(
                tenant_id=tenant, status=status, page_size=page_size, page_token=token))
            out += page.reviews
            token = page.next_page_token
            if not token:
                return out

    def get_review(self, review_id: str) -> mfa_pb2.GetReviewResponse:
        """A review with the evidence the reviewer sees and the session's decision."""
        return self.call(self.mfa.GetReview, mfa_pb2.GetReviewRequest(review_id=review_id))

    def resolve_review(self, review_id: str, approve: bool, note: str = "") -> mfa_pb2.ResolveReviewResponse:
        """A reviewer's verdict on a REVIEW decision; ``decision``: the session's final decision
        (an approval's ALLOW carries the token)."""
        return self.call(self.mfa.ResolveReview, mfa_pb2.ResolveReviewRequest(
            review_id=review_id, approve=approve, note=note))

    def set_push_token(self, tenant: str, subject: str, device_id: str, push_token: str) -> None:
        """The push registration token (FCM) of a bound device's app; "" stops pushes to it."""
        self.call(self.mfa.SetPushToken, mfa_pb2.SetPushTokenRequest(
            subject=subject_ref(tenant, subject), device_id=device_id, push_token=push_token))

    def get_push_confirmation(self, request: mfa_pb2.GetPushConfirmationRequest) -> mfa_pb2.GetPushConfirmationResponse:
        """What a push confirmation shows, for the bound app it went to (``Device.push_fetch``: the
        request signed by its key); another device, an expired or an answered one is refused."""
        return self.call(self.mfa.GetPushConfirmation, request)

    def confirm_transaction(self, session_id: str, answer: mfa_pb2.PushAnswer) -> mfa_pb2.ConfirmTransactionResponse:
        """The app's signed answer to a push confirmation (``Device.answer_push``). A deny ends the
        session DENY (``decision``); a wrong number, device or context is refused."""
        return self.call(self.mfa.ConfirmTransaction, mfa_pb2.ConfirmTransactionRequest(
            session_id=session_id, answer=answer))

    def list_devices(self, tenant: str, subject: str) -> list[mfa_pb2.BoundDevice]:
        return list(self.call(self.mfa.ListDevices, mfa_pb2.ListDevicesRequest(
            subject=subject_ref(tenant, subject))).devices)

    def revoke_device(self, tenant: str, subject: str, device_id: str) -> None:
        self.call(self.mfa.RevokeDevice, mfa_pb2.RevokeDeviceRequest(subject=subject_ref(tenant, subject),
                                                                     device_id=device_id))

    def unlock_subject(self, tenant: str, subject: str, reason: str) -> None:
        self.call(self.mfa.UnlockSubject, mfa_pb2.UnlockSubjectRequest(subject=subject_ref(tenant, subject),
                                                                       reason=reason))


class Session:
    """One authentication session: submit factors (captures signed by ``device``), then decide."""

    def __init__(self, client: BioGate, request: mfa_pb2.StartAuthenticationRequest,
                 started: mfa_pb2.StartAuthenticationResponse, device: Device | None) -> None:
        self.client, self.started, self.device = client, started, device
        self.tenant, self.id = request.subject.tenant_id, started.session_id
        self.shown = shown(request, started)  # what the session is for, as the user was shown it

    def context(self, payloads: Sequence[bytes] = ()) -> bytes:
        """The transaction context binding ``payloads`` (none for a device proof) to this session:
        what a passkey signs (its challenge: ``webauthn.assertion_challenge(context)``)."""
        return transaction_context(**self.shown, evidence=[payload_digest(p) for p in payloads])

    def _device(self) -> Device:
        if self.device is None:
            raise ValueError("this session was started without a device: captures need one to sign them")
        return self.device

    def submit(self, **evidence: Any) -> mfa_pb2.SubmitFactorResponse:
        """SubmitFactor with evidence built by hand (``face=``, ``voice=``, ``otp=``, ``device=``)."""
        return self.client.call(self.client.mfa.SubmitFactor, mfa_pb2.SubmitFactorRequest(
            session_id=self.id, **evidence))

    def challenge(self, modality: str) -> mfa_pb2.StartBiometricChallengeResponse:
        """A liveness (``"face"``: head moves) or digit (``"voice"``) challenge of this session."""
        return self.client.call(self.client.mfa.StartBiometricChallenge, mfa_pb2.StartBiometricChallengeRequest(
            session_id=self.id, modality=MODALITIES[modality]))

    def submit_face(self, image: bytes) -> mfa_pb2.FactorResult:
        """A selfie, signed by the session's device."""
        return self.submit(face=self._device().face(self.id, image)).result

    def submit_burst(self, frames: list[common_pb2.Frame], nonce: str) -> mfa_pb2.FactorResult:
        """A burst answering the face challenge ``nonce``, signed by the session's device."""
        return self.submit(face=self._device().burst(self.id, frames, nonce)).result

    def submit_voice(self, audio: bytes, nonce: str) -> mfa_pb2.FactorResult:
        """A recording answering the digit challenge ``nonce``, signed by the session's device."""
        return self.submit(voice=self._device().voice(self.id, audio, nonce)).result

    def submit_terminal_voice(self, audio: bytes, nonce: str, mulaw: bool = True) -> mfa_pb2.FactorResult:
        """What an IVR platform (a registered terminal) sends: the caller's audio, as captured."""
        fmt = common_pb2.AudioFormat(encoding=common_pb2.AUDIO_ENCODING_MULAW, sample_rate_hz=8000) if mulaw else None
        return self.submit(voice=mfa_pb2.VoiceEvidence(
            audio=common_pb2.Audio(data=audio, format=fmt), challenge_nonce=nonce,
            binding=mfa_pb2.CaptureBinding(terminal=mfa_pb2.TerminalCapture()))).result

    def stream_terminal_voice(self, chunks: Iterable[bytes], nonce: str,
                              encoding: common_pb2.AudioEncoding = common_pb2.AUDIO_ENCODING_MULAW,
                              sample_rate_hz: int = 8000) -> mfa_pb2.SubmitFactorResponse:
        """The IVR platform's voice factor streamed as the caller speaks (StreamVoiceFactor): raw
        ``chunks`` of at most 100 ms each (G.711 mu-law 8 kHz by default), sent as ``chunks``
        yields them; the MFA passes each on to the voice service at once. Keep them coming (a pause
        over 2 s is refused) and end ``chunks`` when the caller has answered: only then is the end
        message sent that lets the answer be decided. Where ``chunks`` raises (the caller hung up),
        the call is cancelled without it and nothing is decided."""
        header = mfa_pb2.StreamVoiceFactorRequest.Header(
            session_id=self.id, challenge_nonce=nonce,
            format=common_pb2.AudioFormat(encoding=encoding, sample_rate_hz=sample_rate_hz),
            binding=mfa_pb2.CaptureBinding(terminal=mfa_pb2.TerminalCapture()))

        def parts():
            yield mfa_pb2.StreamVoiceFactorRequest(header=header)
            sent = 0
            for chunk in chunks:
                sent += len(chunk)
                yield mfa_pb2.StreamVoiceFactorRequest(chunk=chunk)
            yield mfa_pb2.StreamVoiceFactorRequest(end=mfa_pb2.StreamVoiceFactorRequest.End(audio_bytes=sent))

        return self.client.call(self.client.mfa.StreamVoiceFactor, parts())

    def submit_device(self) -> mfa_pb2.FactorResult:
        """Proof of possession of the device's bound key."""
        return self.submit(device=self._device().proof(self.id)).result

    def send_otp(self) -> mfa_pb2.SendOtpResponse:
        """Sends the SMS code to the subject's phone (``masked_phone`` says where); for a payment the
        text names the amount and the payee shown."""
        return self.client.call(self.client.mfa.SendOtp, mfa_pb2.SendOtpRequest(session_id=self.id,
                                                                               payee=self._payee()))

    def submit_otp(self, code: str) -> mfa_pb2.FactorResult:
        return self.submit(otp=mfa_pb2.OtpEvidence(code=code)).result

    def send_push(self) -> mfa_pb2.SendPushConfirmationResponse:
        """Pushes this session's transaction to the customer's bound app. Show ``number`` on the
        bank's screen (the user types it in the app); when not ``sent``, ``acceptable`` lists the
        policy's fallback factors."""
        return self.client.call(self.client.mfa.SendPushConfirmation, mfa_pb2.SendPushConfirmationRequest(
            session_id=self.id, payee=self._payee()))

    def _payee(self) -> mfa_pb2.Payee | None:
        payee = self.shown["payee"]
        return mfa_pb2.Payee(name=payee["name"], account_masked=payee["account"]) if payee else None

    def decide(self) -> mfa_pb2.DecideResponse:
        """The signed decision: ``outcome``, ``token``, ``still_needed`` (STEP_UP), ``review_id``."""
        return self.client.call(self.client.mfa.Decide, mfa_pb2.DecideRequest(session_id=self.id))

    def register_device(self, label: str = "phone") -> str:
        """Binds the session's device key to the subject (after an ALLOW of enough assurance);
        sets and returns the device id."""
        device = self._device()
        device.device_id = self.client.call(self.client.mfa.RegisterDevice, mfa_pb2.RegisterDeviceRequest(
            session_id=self.id, device=device.device, public_key=device.public_der, label=label)).device_id
        return device.device_id

    def submit_passkey(self, device_id: str, assertion: mfa_pb2.WebAuthnAssertion | str,
                       context: bytes | None = None) -> mfa_pb2.FactorResult:
        """Proof of a registered passkey: the browser's assertion (proto, or its toJSON() text)
        over :meth:`context` (no payloads), as a device factor."""
        context = context if context is not None else self.context()
        proof = assertion if isinstance(assertion, mfa_pb2.WebAuthnAssertion) else webauthn.assertion(assertion)
        return self.submit(device=mfa_pb2.DeviceProof(device_id=device_id, context=context, webauthn=proof)).result

    def webauthn_options(self) -> str:
        """PublicKeyCredentialCreationOptions (JSON) for navigator.credentials.create()."""
        return self.client.call(self.client.mfa.StartDeviceRegistration, mfa_pb2.StartDeviceRegistrationRequest(
            session_id=self.id)).options_json

    def register_passkey(self, registration_json: str, device: mfa_pb2.DeviceInfo | None = None,
                         label: str = "passkey") -> str:
        """Binds a passkey: the browser's PublicKeyCredential.toJSON() answering :meth:`webauthn_options`."""
        return self.client.call(self.client.mfa.RegisterDevice, mfa_pb2.RegisterDeviceRequest(
            session_id=self.id, device=device or (self.device.device if self.device else None),
            webauthn_registration_json=registration_json, label=label)).device_id
