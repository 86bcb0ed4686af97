"""Red-team pass, the voice side of face.verify_limit (tests/face/test_verify_limit.py): a
verifier's credential could call VoiceService.Verify on one subject without end, each answer a score
to climb by. Another speaker's recordings are failures charged to the subject until the limit, then
Verify is refused, a genuine recording included. Real models, a real server."""

from __future__ import annotations

import grpc
import pytest

from services.common.errors import details_of
from tests.ops.samples import Counted
from tests.voice.conftest import own_voice_service
from tests.voice.test_service import enrol, files, new_subject, verify, wav
from voice_audio import read


@pytest.fixture(scope="module")
def limited(tmp_path_factory, voice_models):
    yield from own_voice_service(tmp_path_factory, "voice-limit", voice={
        "verify_limit": {"failures": 1, "window_s": 3600},
        "tenants": {"bank-a": {"require_challenge": False, "synthetic_speech_check": False}}})


def test_failed_verifications_of_a_subject_are_bounded(limited, voice_dir):
    genuine = [read(p) for p in files(voice_dir, "libri_1688")]
    other = read(files(voice_dir, "libri_2414")[0])
    tenant, subject = new_subject(limited)
    enrol(limited, tenant, subject, genuine[:2])
    assert verify(limited, tenant, subject, wav(genuine[2])).match  # a match gives its charge back
    assert not verify(limited, tenant, subject, wav(other)).match  # the one failure allowed
    for clip in (other, genuine[2]):
        with pytest.raises(grpc.RpcError) as err:
            verify(limited, tenant, subject, wav(clip))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert details_of(err.value)["reason"] == "VERIFY_LIMITED"


def test_failures_and_refusals_are_counted_for_the_operators(limited, voice_dir):
    """The metrics the spraying and guessing alerts read (deploy/prometheus/alerts.yaml)."""
    genuine = [read(p) for p in files(voice_dir, "libri_1688")]
    other = read(files(voice_dir, "libri_2414")[0])
    tenant, subject = new_subject(limited)
    enrol(limited, tenant, subject, genuine[:2])
    failed = Counted("biogate_verify_failures_total", modality="voice")
    refused = Counted("biogate_verify_limited_total", modality="voice")
    assert not verify(limited, tenant, subject, wav(other)).match
    assert (failed.delta, refused.delta) == (1, 0)
    with pytest.raises(grpc.RpcError) as err:
        verify(limited, tenant, subject, wav(other))
    assert details_of(err.value)["reason"] == "VERIFY_LIMITED"
    assert (failed.delta, refused.delta) == (1, 1)
