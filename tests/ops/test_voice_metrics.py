"""The voice service's metrics as its real models produce them (models tier): the raw cosine of each
comparison per channel family, replay refusals, failed digit challenges, and the model calls of
ECAPA, AASIST and the digit recogniser."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from services.common.api.v1 import common_pb2, voice_pb2, voice_pb2_grpc
from services.common.storage import ConsentRecord
from tests.conftest import make_settings
from tests.ops.samples import Counted

sys.path.insert(0, str(Path(__file__).parents[1] / "voice"))  # as tests/voice's conftest: its helpers by name
from voice_audio import read, wav_bytes  # noqa: E402

TENANT = "ops-bank"  # text-independent; the default tenant policy keeps the digit challenge


@pytest.fixture
def settings(tmp_path):
    return make_settings(tmp_path / "data", voice={"tenants": {TENANT: {"require_challenge": False}}})


def test_comparisons_replays_challenges_and_model_calls_are_recorded(services, fixtures_dir):
    server = services.start("voice")
    service = server.definition.service
    clips = sorted((fixtures_dir / "voice" / "verification" / "libri_367").glob("*.wav"),
                   key=lambda p: (-p.stat().st_size, p.name))
    audio = [common_pb2.Audio(data=wav_bytes(read(p), 16000)) for p in clips[:4]]
    for tenant in (TENANT, "ops-strict"):
        service.rt.storage.subjects.record_consent(ConsentRecord(tenant, "c-ops", "biometric_verification",
                                                                 ("voice",), "v1", "test"))
    model = service.ready.get().model_id
    matched = Counted("biogate_similarity_score_count", model=model, channel="wideband", result="match")
    replays = Counted("biogate_voice_replay_refusals_total", channel="wideband")
    challenges = Counted("biogate_voice_challenge_failures_total", channel="wideband")
    ecapa = Counted("biogate_batch_size_sum", model="voice-ecapa")
    aasist = Counted("biogate_batch_size_sum", model="voice-aasist")
    ecapa_calls = Counted("biogate_inference_seconds_count", model="voice-ecapa")
    digits = Counted("biogate_inference_seconds_count", model="voice-digits")

    with services.channel("voice") as channel:
        stub = voice_pb2_grpc.VoiceServiceStub(channel)
        for tenant in (TENANT, "ops-strict"):
            stub.Enroll(voice_pb2.EnrollVoiceRequest(subject=common_pb2.SubjectRef(tenant_id=tenant, subject_id="c-ops"),
                                                     utterances=audio[:2]))
        ref = common_pb2.SubjectRef(tenant_id=TENANT, subject_id="c-ops")
        genuine = stub.Verify(voice_pb2.VerifyVoiceRequest(subject=ref, audio=audio[3]))
        replayed = stub.Verify(voice_pb2.VerifyVoiceRequest(subject=ref, audio=audio[0]))  # an enrolment capture
        strict = common_pb2.SubjectRef(tenant_id="ops-strict", subject_id="c-ops")
        nonce = stub.StartVoiceChallenge(voice_pb2.StartVoiceChallengeRequest(subject=strict)).challenge.nonce
        unanswered = stub.Verify(voice_pb2.VerifyVoiceRequest(subject=strict, audio=audio[2], challenge_nonce=nonce))

    assert genuine.match and replayed.replay_checked and not replayed.replay_passed
    assert unanswered.challenge_checked and not unanswered.challenge_passed
    assert matched.delta == sum(r.score >= r.threshold for r in (genuine, replayed, unanswered)) >= 1
    assert (replays.delta, challenges.delta, digits.delta) == (1, 1, 1)
    assert ecapa.delta == aasist.delta == 7  # two enrolments of two utterances, three verifications
    assert 1 <= ecapa_calls.delta <= 7
