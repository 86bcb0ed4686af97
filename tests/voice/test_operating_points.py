"""Voice decisions on an operating point the calibration cannot back are refused with the reason:
in the manifest reader, over gRPC when a re-calibration marks the service's point unsupported, and
in the warm-up check that keeps a service on such a default point from starting."""

from __future__ import annotations

import uuid

import grpc
import pytest

from services.common.api.v1 import common_pb2, voice_pb2
from services.common.config import PROJECT_ROOT
from services.common.errors import details_of
from services.common.models import ModelStore
from services.common.modality.calibration import Calibrations, NotCalibrated
from tests.conftest import present
from voice_audio import read, wav_bytes

MODEL = "ecapa-voxceleb"


def test_the_reader_refuses_unsupported_and_missing_points_with_their_reason():
    cal = Calibrations(PROJECT_ROOT / "models" / "manifest.yaml")
    with pytest.raises(NotCalibrated) as err:
        cal.threshold(MODEL, "wideband", 1e-4, "cosine")
    assert err.value.reason == "OPERATING_POINT_UNSUPPORTED" and isinstance(err.value, LookupError)
    assert str(err.value) == (f"{MODEL} [wideband]: FMR 1e-4 needs >= 30,000 impostor trials, the calibration "
                              "has 5,736; re-calibrate on more data or choose 1e-3")
    with pytest.raises(NotCalibrated) as err:
        cal.threshold(MODEL, "telephony-8k", 0.2, "cosine")
    assert err.value.reason == "OPERATING_POINT_MISSING" and "no operating point for FMR 2e-1" in str(err.value)
    # AASIST: 80 attacks support APCER 5e-2 only, so 1e-2 is not in the record.
    assert cal.threshold("aasist", "wideband", 5e-2, "bonafide_log_odds@speech3s") < 0
    with pytest.raises(NotCalibrated) as err:
        cal.threshold("aasist", "wideband", 1e-2, "bonafide_log_odds@speech3s")
    assert err.value.reason == "OPERATING_POINT_MISSING"
    # The replay cache: one speaker's 7,680 pairs of answers support 5e-4, not 1e-4.
    assert 0 < cal.threshold("replay-envelope-v1", "telephone-band", 5e-4, "envelope_xcorr_v1") < 1
    with pytest.raises(NotCalibrated) as err:
        cal.threshold("replay-envelope-v1", "telephone-band", 1e-4, "envelope_xcorr_v1")
    assert err.value.reason == "OPERATING_POINT_UNSUPPORTED"
    assert "FMR 1e-4 needs >= 30,000 impostor trials, the calibration has 7,680" in str(err.value)


def test_the_wideband_aasist_record_claims_what_unseen_espeak_voices_showed():
    """The wideband AASIST point claims its re-check on the 16 espeak-ng voices no fit or check used
    (HELD_OUT_VOICES), not the earlier check on attacks.VOICES' own voices: far above 5e-2, and the
    record says it is not consistent with its target."""
    from bench.voice_antispoof_eval import HELD_OUT_VOICES

    claim = Calibrations(PROJECT_ROOT / "models" / "manifest.yaml").claim(
        "aasist", "wideband", 5e-2, "bonafide_log_odds@speech3s")
    assert claim.source == "held_out" and "heldout16" in claim.dataset
    assert claim.trials == 10 * len(HELD_OUT_VOICES) and claim.rate > 5e-2 and claim.consistent is False


def test_the_telephone_aasist_record_is_for_the_cut_and_claims_its_worst_sender_variant():
    """The telephone AASIST record was refitted with digital silence cut before the window, on espeak-ng
    as generated, trimmed and noise-filled (bench/voice_antispoof_refit.py); it claims the worst variant
    of its check on 16 voices no fit used (80 clips each), not consistent with 5e-2, and has no record
    for the score without the cut."""
    from bench.voice_antispoof_refit import CHECK_SENTENCES, CHECK_VOICES

    cal = Calibrations(PROJECT_ROOT / "models" / "manifest.yaml")
    claim = cal.claim("aasist", "telephony-8k", 5e-2, "bonafide_log_odds@speech4.04s-zerocut")
    assert claim.source == "held_out" and "voice-antispoof-refit" in claim.dataset
    assert claim.trials == len(CHECK_SENTENCES) * len(CHECK_VOICES) and claim.rate > 5e-2 and claim.consistent is False
    with pytest.raises(NotCalibrated):
        cal.threshold("aasist", "telephony-8k", 5e-2, "bonafide_log_odds@speech4.04s")


def test_verify_on_a_point_marked_unsupported_is_refused_over_grpc(voice_service, voice_dir):
    svc = voice_service
    tenant, subject = "bank-a", "cust-" + uuid.uuid4().hex[:12].translate(str.maketrans("0123456789", "ghijklmnop"))
    svc.consent(tenant, subject)
    clips = [read(p) for p in sorted((voice_dir / "libri_1688").glob("*.wav"), key=lambda p: (-p.stat().st_size, p.name))]
    ref = common_pb2.SubjectRef(tenant_id=tenant, subject_id=subject)
    wb = voice_pb2.VOICE_CHANNEL_WIDEBAND
    svc.stub.Enroll(voice_pb2.EnrollVoiceRequest(
        subject=ref, utterances=[common_pb2.Audio(data=wav_bytes(x, 16000)) for x in clips[:2]], channel=wb))

    def verify(clip):
        return svc.stub.Verify(voice_pb2.VerifyVoiceRequest(
            subject=ref, audio=common_pb2.Audio(data=wav_bytes(clip, 16000)), channel=wb))

    store = ModelStore(svc.settings)
    original = present(store.calibration(MODEL, "wideband"))
    target = svc.settings.voice.target_fmr
    marked = original.model_dump(mode="json")
    for p in marked["operating_points"]:
        if p["target_fmr"] == target:  # an operator's own judgement may mark a point unsupported
            p |= {"supported": False, "why": "FMR 1e-3 was not reproduced on held-out speakers"}
    store.update_calibration(MODEL, "wideband", marked)
    try:
        with pytest.raises(grpc.RpcError) as err:
            verify(clips[2])
        # The warm-up's check (a service starting now would stay NOT_SERVING) names the setting.
        with pytest.raises(NotCalibrated, match=rf"^voice\.target_fmr = 0\.001: {MODEL} \[wideband\]: FMR 1e-3 was not"):
            svc.server.definition.service.engine.check_calibrations()
    finally:
        store.update_calibration(MODEL, "wideband", original)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert details_of(err.value)["reason"] == "OPERATING_POINT_UNSUPPORTED"
    assert (err.value.details() or "").startswith(f"{MODEL} [wideband]: FMR 1e-3 was not reproduced on held-out speakers")
    assert verify(clips[3]).match


def test_verify_is_refused_when_the_replay_caches_point_is_unsupported(voice_service, voice_dir):
    """The replay cache's threshold is a calibrated point like the others: marked unsupported, a
    Verify is refused (FAILED_PRECONDITION naming the entry, channel and target) before the capture is
    retained, and the warm-up check names voice.replay_target_fmr."""
    svc = voice_service
    tenant, subject = "bank-a", "cust-" + uuid.uuid4().hex[:12].translate(str.maketrans("0123456789", "ghijklmnop"))
    svc.consent(tenant, subject)
    clips = [read(p) for p in sorted((voice_dir / "libri_1998").glob("*.wav"), key=lambda p: (-p.stat().st_size, p.name))]
    ref = common_pb2.SubjectRef(tenant_id=tenant, subject_id=subject)
    svc.stub.Enroll(voice_pb2.EnrollVoiceRequest(
        subject=ref, utterances=[common_pb2.Audio(data=wav_bytes(x, 16000)) for x in clips[:2]]))
    engine = svc.server.definition.service.engine
    pseudonym = svc.rt.pseudonymize(tenant, subject)
    retained = len(engine.replay.store.recent(tenant, pseudonym))

    def verify(clip):
        return svc.stub.Verify(voice_pb2.VerifyVoiceRequest(subject=ref, audio=common_pb2.Audio(data=wav_bytes(clip, 16000))))

    replay_id, channel = "replay-envelope-v1", "telephone-band"
    store = ModelStore(svc.settings)
    original = present(store.calibration(replay_id, channel))
    target = svc.settings.voice.replay_target_fmr
    marked = original.model_dump(mode="json")
    for p in marked["operating_points"]:
        if p["target_fmr"] == target:
            p |= {"supported": False, "why": "FMR 5e-4 was not reproduced on fluent digit answers"}
    store.update_calibration(replay_id, channel, marked)
    try:
        with pytest.raises(grpc.RpcError) as err:
            verify(clips[2])
        with pytest.raises(NotCalibrated, match=rf"^voice\.replay_target_fmr = 0\.0005: {replay_id} \[{channel}\]: FMR 5e-4"):
            engine.check_calibrations()
        assert len(engine.replay.store.recent(tenant, pseudonym)) == retained
    finally:
        store.update_calibration(replay_id, channel, original)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert details_of(err.value)["reason"] == "OPERATING_POINT_UNSUPPORTED"
    assert (err.value.details() or "").startswith(f"{replay_id} [{channel}]: FMR 5e-4 was not reproduced")
    reply = verify(clips[3])
    assert reply.match and reply.replay_checked and reply.replay_passed
