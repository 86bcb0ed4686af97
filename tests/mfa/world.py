"""Real face, voice and MFA services on loopback, and a client that plays the bank's back end, the
customer's app and the IVR platform against them: shared by tests/mfa/test_e2e.py and
tests/attacks/.

Without ``principals`` the services accept their development tokens; with them (a registered IVR
terminal needs a principal of its own) every caller presents one of the given tokens and the MFA
calls the face and voice services with ``service_token``.
"""

from __future__ import annotations

import csv
import re
import time
from contextlib import contextmanager
from pathlib import Path

import grpc

from services.common.api.v1 import (
    common_pb2, face_pb2, face_pb2_grpc, mfa_pb2, mfa_pb2_grpc, voice_pb2, voice_pb2_grpc,
)
from services.common.errors import details_of
from tests.conftest import SHARED, ServiceHarness, make_settings, present, require
from tests.mfa.conftest import outbox_codes

F = mfa_pb2
FIX = SHARED / "fixtures"
PAYEE = F.Payee(name="Li Lei", account_masked="6222 **** **** 1234")


def rows(name: str) -> list[dict]:
    with open(FIX / name, newline="") as fh:
        return list(csv.DictReader(fh))


class Services(ServiceHarness):
    """A harness whose callers present ``token`` (empty: the development tokens); ``face_ok`` and
    ``voice_ok``: that service is SERVING with its Verify RPC."""

    token = ""
    face_ok = voice_ok = False


def _implemented(call) -> bool:
    try:
        call()
    except grpc.RpcError as err:
        return err.code() != grpc.StatusCode.UNIMPLEMENTED
    return True


@contextmanager
def running_services(data: Path, principals: list[dict] | None = None, service_token: str = ""):
    """(bio, mfa): ServiceHarness of the face and voice services (``bio.face_ok`` / ``voice_ok``:
    SERVING with their Verify RPC) and of the MFA that calls them."""
    require((FIX / "trials_face.csv").is_file(), f"the fixtures in {FIX}")
    auth = {"auth": {"principals": principals, "dev_credentials": False}} if principals else {}
    bio = Services(make_settings(data, **auth))
    bio.token = service_token
    try:
        bio.face_ok = bio.voice_ok = False
        for name, stub, request in (("face", face_pb2_grpc.FaceServiceStub, face_pb2.VerifyFaceRequest()),
                                    ("voice", voice_pb2_grpc.VoiceServiceStub, voice_pb2.VerifyVoiceRequest())):
            try:
                bio.start(name, timeout=240)
            except TimeoutError:  # reported by the tests that need it (require: fails in CI)
                continue
            with bio_channel(bio, name) as ch:
                setattr(bio, f"{name}_ok", _implemented(lambda stub=stub, request=request: stub(ch).Verify(request, timeout=30)))

        def target(name):
            server = bio.running.get(name)
            return server.address if server is not None else "127.0.0.1:9"

        clients = {name: {"target": target(name), "breaker_failures": 3, "breaker_reset_s": 2, "token": service_token}
                   for name in ("face", "voice")}
        mfa = Services(make_settings(data, clients=clients, **auth))
        mfa.token = service_token
        mfa.start("mfa")
        try:
            yield bio, mfa
        finally:
            mfa.stop()
    finally:
        bio.stop()


def bio_channel(harness: ServiceHarness, name: str, token: str | None = None) -> grpc.Channel:
    """A channel to one of the harness's services with ``token``, else its own or the dev token."""
    from services.common.client import connect

    token = token or getattr(harness, "token", "")
    if token:
        return connect(harness.running[name].address, token)
    return harness.channel(name)


class World:
    """Stubs of the three services and the flows the tests drive through them."""

    def __init__(self, bio, mfa, tenant: str, ivr_token: str | None = None):
        self.bio, self.mfa, self.tenant = bio, mfa, tenant
        self._channels = [bio_channel(mfa, "mfa"), bio_channel(bio, "face"), bio_channel(bio, "voice")]
        self.mfa_stub = mfa_pb2_grpc.MfaServiceStub(self._channels[0])
        self.face = face_pb2_grpc.FaceServiceStub(self._channels[1])
        self.voice = voice_pb2_grpc.VoiceServiceStub(self._channels[2])
        self.ivr = None  # the IVR platform: a registered terminal of the ivr channel
        self.payees: dict[str, F.Payee] = {}  # each payment session's payee, which SendOtp names (as the SDK)
        if ivr_token:
            self._channels.append(bio_channel(mfa, "mfa", ivr_token))
            self.ivr = mfa_pb2_grpc.MfaServiceStub(self._channels[-1])

    def close(self):
        for c in self._channels:
            c.close()

    def ref(self, sid: str) -> common_pb2.SubjectRef:
        return common_pb2.SubjectRef(tenant_id=self.tenant, subject_id=sid)

    def enrol(self, sid, face_path=None, voice_path=None, phone="+8613800135678", utterances=None, face_image=None):
        ref = self.ref(sid)
        self.mfa_stub.RecordConsent(common_pb2.RecordConsentRequest(consent=common_pb2.Consent(
            subject=ref, purpose=common_pb2.CONSENT_PURPOSE_BIOMETRIC_VERIFICATION,
            modalities=[common_pb2.MODALITY_FACE, common_pb2.MODALITY_VOICE], granted=True,
            policy_version="privacy-2025-01")))
        self.mfa_stub.SetPhoneNumber(F.SetPhoneNumberRequest(subject=ref, phone_e164=phone))
        if face_path or face_image:
            image = face_image if face_image is not None else (FIX / face_path).read_bytes()
            self.face.Enroll(face_pb2.EnrollFaceRequest(subject=ref, images=[common_pb2.Image(data=image)],
                                                        replace=True), timeout=120)
        if voice_path or utterances:
            audio = utterances or [(FIX / voice_path).read_bytes()]
            self.voice.Enroll(voice_pb2.EnrollVoiceRequest(subject=ref, utterances=[
                common_pb2.Audio(data=a) for a in audio], replace=True), timeout=120)
        return ref

    def start(self, ref, app, action="login", amount=None, text="", payee=None):
        req = F.StartAuthenticationRequest(subject=ref, channel=F.CHANNEL_APP, action=action, device=app.device,
                                           context=F.ContextSignals(conversation_text=text))
        if amount is not None:
            req.amount.CopyFrom(F.Money(currency="CNY", amount_minor=amount))
            req.payee.CopyFrom(payee or PAYEE)
        started = app.opened(req, self.mfa_stub.StartAuthentication(req))
        if req.HasField("payee"):
            self.payees[started.session_id] = req.payee
        return started

    def start_ivr(self, ref, action="login"):
        """A call to the bank's IVR: the platform opens the session as the ivr terminal."""
        assert self.ivr is not None, "a world with an IVR terminal (ivr_token)"
        return self.ivr.StartAuthentication(F.StartAuthenticationRequest(subject=ref, channel=F.CHANNEL_IVR,
                                                                         action=action))

    def face_factor(self, s, path, app):
        """The app's selfie, signed with the session's context."""
        return self.submit(s, face=app.face(s, (FIX / path).read_bytes()))

    def voice_challenge(self, s, stub=None):
        return (stub or self.mfa_stub).StartBiometricChallenge(F.StartBiometricChallengeRequest(
            session_id=s.session_id, modality=common_pb2.MODALITY_VOICE))

    def submit(self, s, stub=None, **evidence):
        return (stub or self.mfa_stub).SubmitFactor(F.SubmitFactorRequest(session_id=s.session_id, **evidence),
                                                     timeout=120)

    def submit_patiently(self, s, stub=None, **evidence):
        """submit, waiting out the growing delays the lockout puts between failed attempts (the
        default policy: from the third failure of a subject or device on)."""
        while True:
            try:
                return self.submit(s, stub, **evidence)
            except grpc.RpcError as err:
                if details_of(err)["reason"] != "THROTTLED":
                    raise
                time.sleep(int(present(re.search(r"in (\d+) s", err.details() or "")).group(1)))

    def ivr_voice(self, s, mulaw: bytes, nonce: str = "") -> F.VoiceEvidence:
        """What the IVR platform sends: the caller's G.711 mu-law audio, captured by the terminal."""
        return F.VoiceEvidence(audio=common_pb2.Audio(data=mulaw, format=common_pb2.AudioFormat(
            encoding=common_pb2.AUDIO_ENCODING_MULAW, sample_rate_hz=8000)), challenge_nonce=nonce,
            binding=F.CaptureBinding(terminal=F.TerminalCapture()))

    @property
    def voice_engine(self):
        return self.bio.running["voice"].definition.service.engine

    def otp(self, s, wrong=False, stub=None, payee=None):
        """The SMS code sent and entered; a payment's payee (``payee``, else the one start() gave) named."""
        stub = stub or self.mfa_stub
        stub.SendOtp(F.SendOtpRequest(session_id=s.session_id, payee=payee or self.payees.get(s.session_id)))
        code = outbox_codes(self.mfa.settings)[-1]
        if wrong:
            code = f"{(int(code) + 1) % 10 ** 6:06d}"
        return stub.SubmitFactor(F.SubmitFactorRequest(session_id=s.session_id, otp=F.OtpEvidence(code=code)))

    def device(self, s, app):
        return self.mfa_stub.SubmitFactor(F.SubmitFactorRequest(session_id=s.session_id, device=app.proof(s)))

    def decide(self, s, stub=None):
        return (stub or self.mfa_stub).Decide(F.DecideRequest(session_id=s.session_id))

    def bind(self, s, app, label="phone") -> str:
        """Registers the app's key after the session allowed; sets and returns the device id."""
        app.device_id = self.mfa_stub.RegisterDevice(F.RegisterDeviceRequest(
            session_id=s.session_id, device=app.device, public_key=app.public_der, label=label)).device_id
        return app.device_id
