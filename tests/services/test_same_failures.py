"""Same failure, same status and reason: the face and voice services over gRPC, with their real
models and one storage, driven into the failures they share (challenges, consent, templates)."""

from __future__ import annotations

import json
from datetime import timedelta

import grpc
import numpy as np
import pytest

from services.common.api.v1 import common_pb2, face_pb2, face_pb2_grpc, voice_pb2, voice_pb2_grpc
from services.common.errors import details_of
from services.common.storage import ChallengeRecord, ConsentRecord, TemplateRecord
from services.common.storage.db import utcnow
from services.common.storage.interfaces import Modality
from services.face.service import CHALLENGE_KIND as FACE_KIND
from services.voice.service import CHALLENGE_KIND as VOICE_KIND
from tests.conftest import ServiceHarness, make_settings

TENANT = "bank-same"
# insightface's norm_crop calls a deprecated scikit-image method once per aligned face.
pytestmark = pytest.mark.filterwarnings("ignore:`estimate` is deprecated:FutureWarning")
WB = voice_pb2.VOICE_CHANNEL_WIDEBAND


class Both:
    def __init__(self, harness, fixtures_dir) -> None:
        self.harness = harness
        self.storage = harness.running["face"].definition.service.rt.storage
        self.face = face_pb2_grpc.FaceServiceStub(harness.channel("face"))
        self.voice = voice_pb2_grpc.VoiceServiceStub(harness.channel("voice"))
        faces = fixtures_dir / "face" / "verification"
        self.image = common_pb2.Image(data=(faces / "barack_obama/face_recognition_examples_obama.jpg").read_bytes())
        clips = sorted((fixtures_dir / "voice/verification/libri_1688").glob("*.wav"), key=lambda p: -p.stat().st_size)
        self.clips = [common_pb2.Audio(data=p.read_bytes()) for p in clips]

    def consent(self, subject: str) -> None:
        self.storage.subjects.record_consent(
            ConsentRecord(TENANT, subject, "biometric_verification", ("face", "voice"), "v1", "test"))

    def enrol(self, subject: str, replace: bool = False):
        ref = _ref(subject)
        return (lambda: self.face.Enroll(face_pb2.EnrollFaceRequest(subject=ref, images=[self.image], replace=replace)),
                lambda: self.voice.Enroll(voice_pb2.EnrollVoiceRequest(subject=ref, utterances=self.clips[:2], channel=WB,
                                                                       replace=replace)))

    def verify(self, subject: str):
        ref = _ref(subject)
        return (lambda: self.face.Verify(face_pb2.VerifyFaceRequest(subject=ref, image=self.image)),
                lambda: self.voice.Verify(voice_pb2.VerifyVoiceRequest(subject=ref, audio=self.clips[2], channel=WB)))

    def answer(self, subject: str, face_nonce: str, voice_nonce: str, audio: common_pb2.Audio | None = None):
        ref = _ref(subject)
        frames = [common_pb2.Frame(image=self.image, capture_time_ms=100 * i) for i in range(5)]
        return (lambda: self.face.SubmitLivenessChallenge(face_pb2.SubmitLivenessChallengeRequest(
                    subject=ref, nonce=face_nonce, frames=frames)),
                lambda: self.voice.Verify(voice_pb2.VerifyVoiceRequest(
                    subject=ref, audio=audio or self.clips[2], channel=WB, challenge_nonce=voice_nonce)))

    def issue(self, subject: str, expires_in_s: float = 60.0) -> tuple[str, str]:
        """A face and a voice challenge for ``subject``, made in storage as the services make them."""
        now = utcnow()
        payloads: dict[str, dict] = {FACE_KIND: {"moves": ["TURN_LEFT", "TURN_RIGHT", "LOOK_UP"]}, VOICE_KIND: {"digits": "305162"}}
        nonces = [self.storage.challenges.create(ChallengeRecord(
            TENANT, subject, kind, {**payload, "issued_at": now.isoformat()},
            expires_at=now + timedelta(seconds=expires_in_s), created_at=now)).nonce for kind, payload in payloads.items()]
        return nonces[0], nonces[1]


def _ref(subject: str) -> common_pb2.SubjectRef:
    return common_pb2.SubjectRef(tenant_id=TENANT, subject_id=subject)


def _status(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), details_of(info.value)["reason"]


def same(calls, expected: tuple[grpc.StatusCode, str]) -> None:
    face_call, voice_call = calls
    assert (_status(face_call), _status(voice_call)) == (expected, expected)


@pytest.fixture(scope="module")
def both(tmp_path_factory, fixtures_dir):
    settings = make_settings(tmp_path_factory.mktemp("same-failures") / "data", voice={
        "replay_store": "memory", "min_net_speech_enroll_s": 1.0, "min_total_net_speech_enroll_s": 1.0,
        "tenants": {TENANT: {"require_challenge": False}}})  # text-independent: the failures, not the digits
    harness = ServiceHarness(settings)
    harness.start("face")
    harness.start("voice")
    b = Both(harness, fixtures_dir)
    b.consent("cust-both")
    for call in b.enrol("cust-both"):
        call()
    yield b
    harness.stop()


def test_consent_and_templates(both):
    same(both.enrol("cust-no-consent"), (grpc.StatusCode.FAILED_PRECONDITION, "NO_CONSENT"))
    same(both.verify("cust-nobody"), (grpc.StatusCode.NOT_FOUND, "NOT_ENROLLED"))
    same(both.enrol("cust-both"), (grpc.StatusCode.ALREADY_EXISTS, "ALREADY_ENROLLED"))
    # A template of a model the services no longer run: re-enrolment is explicit, for both.
    both.consent("cust-old")
    cases: tuple[tuple[Modality, str, int], ...] = (("face", "", 128), ("voice", "wideband", 192))
    for modality, channel, dim in cases:
        service = both.harness.running[modality].definition.service
        envelope, key_id = service.templates.vault.seal(TENANT, "cust-old", "retired-model", np.ones(dim, np.float32),
                                                        channel)
        both.storage.templates.put(TemplateRecord(TENANT, "cust-old", modality, "retired-model", channel, envelope,
                                                  key_id, 1))
    same(both.verify("cust-old"), (grpc.StatusCode.FAILED_PRECONDITION, "TEMPLATE_MODEL_INACTIVE"))
    # A withdrawal stops 1:1 use at once in both.
    both.consent("cust-withdraws")
    for call in both.enrol("cust-withdraws"):
        call()
    both.storage.subjects.withdraw_consent(TENANT, "cust-withdraws", "biometric_verification")
    same(both.verify("cust-withdraws"), (grpc.StatusCode.FAILED_PRECONDITION, "NO_CONSENT"))


def test_challenges(both):
    same(both.answer("cust-both", "no-such-nonce", "no-such-nonce"), (grpc.StatusCode.NOT_FOUND, "CHALLENGE_NOT_FOUND"))
    same(both.answer("cust-both", *both.issue("cust-both", expires_in_s=-1)),
         (grpc.StatusCode.FAILED_PRECONDITION, "CHALLENGE_EXPIRED"))
    face_nonce, voice_nonce = both.issue("cust-both")
    for nonce, kind in ((face_nonce, FACE_KIND), (voice_nonce, VOICE_KIND)):
        both.storage.challenges.consume(nonce, TENANT, "cust-both", kind)
    same(both.answer("cust-both", face_nonce, voice_nonce), (grpc.StatusCode.FAILED_PRECONDITION, "CHALLENGE_USED"))
    # Issued to another subject; and a face nonce at the voice service (and the reverse).
    same(both.answer("cust-both", *both.issue("cust-other")), (grpc.StatusCode.FAILED_PRECONDITION, "CHALLENGE_MISMATCH"))
    face_nonce, voice_nonce = both.issue("cust-both")
    same(both.answer("cust-both", voice_nonce, face_nonce), (grpc.StatusCode.FAILED_PRECONDITION, "CHALLENGE_MISMATCH"))
    refusals = [r for r in both.storage.audit.iter_records() if r.event_type.endswith(".challenge_refused")]
    assert {(r.event_type, json.loads(r.details)["reason"]) for r in refusals} == {
        (f"{m}.challenge_refused", why) for m in ("face", "voice")
        for why in ("CHALLENGE_NOT_FOUND", "CHALLENGE_EXPIRED", "CHALLENGE_USED", "CHALLENGE_MISMATCH")}


def test_a_malformed_request_does_not_spend_the_nonce_in_either_service(both):
    face_nonce, voice_nonce = both.issue("cust-both")
    silence = common_pb2.Audio(data=_silent_wav())
    _, voice_bad = both.answer("cust-both", face_nonce, voice_nonce, audio=silence)
    bad_frames = [common_pb2.Frame(image=common_pb2.Image(data=both.image.data[:100]), capture_time_ms=100 * i)
                  for i in range(5)]
    assert _status(lambda: both.face.SubmitLivenessChallenge(face_pb2.SubmitLivenessChallengeRequest(
        subject=_ref("cust-both"), nonce=face_nonce, frames=bad_frames)))[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert _status(voice_bad) == (grpc.StatusCode.FAILED_PRECONDITION, "SILENCE")
    # the IVR stream too: a second header mid-stream keeps the nonce
    header = voice_pb2.StreamVerifyVoiceRequest.Header(
        subject=_ref("cust-both"), challenge_nonce=voice_nonce,
        format=common_pb2.AudioFormat(encoding=common_pb2.AUDIO_ENCODING_MULAW, sample_rate_hz=8000))
    chunk = voice_pb2.StreamVerifyVoiceRequest(chunk=b"\xff" * 160)
    second_header = [voice_pb2.StreamVerifyVoiceRequest(header=header), chunk, voice_pb2.StreamVerifyVoiceRequest(header=header)]
    assert _status(lambda: both.voice.StreamVerify(iter(second_header), timeout=30)) == (
        grpc.StatusCode.INVALID_ARGUMENT, "UNEXPECTED_HEADER")
    face_ok, voice_ok = both.answer("cust-both", face_nonce, voice_nonce)
    assert not face_ok().passed  # four copies of one photo: answered, and refused on its merits
    assert voice_ok().model_id == "ecapa-voxceleb"  # answered: the nonce was still there


def _silent_wav() -> bytes:
    import io

    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.zeros(48000, np.float32), 16000, format="WAV", subtype="PCM_16")
    return buf.getvalue()
