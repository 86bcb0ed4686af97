"""Withdrawing the verification consent stops 1:1 voice verification at once; a new grant resumes it."""

from __future__ import annotations

import grpc
import pytest

from services.common.api.v1 import common_pb2, voice_pb2
from services.common.errors import details_of
from services.common.subjects import VERIFICATION
from voice_audio import read, wav_bytes


def test_withdrawn_verification_consent_stops_verify(voice_service, voice_dir):
    svc, tenant, subject = voice_service, "bank-consent", "cust-withdraws"
    clips = [read(p) for p in sorted((voice_dir / "libri_1688").glob("*.wav"), key=lambda p: -p.stat().st_size)]
    ref = common_pb2.SubjectRef(tenant_id=tenant, subject_id=subject)

    def verify(x):
        return svc.stub.Verify(voice_pb2.VerifyVoiceRequest(
            subject=ref, audio=common_pb2.Audio(data=wav_bytes(x, 16000)), channel=voice_pb2.VOICE_CHANNEL_WIDEBAND))

    svc.consent(tenant, subject)
    svc.stub.Enroll(voice_pb2.EnrollVoiceRequest(
        subject=ref, utterances=[common_pb2.Audio(data=wav_bytes(x, 16000)) for x in clips[:2]]))
    assert verify(clips[2]).match

    svc.rt.storage.subjects.withdraw_consent(tenant, subject, VERIFICATION)
    with pytest.raises(grpc.RpcError) as info:
        verify(clips[3])
    assert (info.value.code(), details_of(info.value)["reason"]) == (grpc.StatusCode.FAILED_PRECONDITION, "NO_CONSENT")
    assert svc.rt.storage.templates.list_for_subject(tenant, subject, "voice")  # refused, not erased

    svc.consent(tenant, subject)
    assert verify(clips[4]).match
