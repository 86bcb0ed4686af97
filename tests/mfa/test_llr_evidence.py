"""Biometric evidence is the LLR the face or voice service calibrated, never one the MFA makes up:
a response without an LLR is no evidence, with a reason that says so."""

from __future__ import annotations

import csv

import pytest
import yaml

from services.common.api.v1 import common_pb2, face_pb2, face_pb2_grpc, mfa_pb2, mfa_pb2_grpc, voice_pb2
from services.common.config import PROJECT_ROOT
from services.mfa.factors import FACTORS
from services.mfa.factors.biometric import BiometricFactor
from services.mfa.policy import load_policy
from tests.conftest import SHARED, ServiceHarness, make_settings, require
from tests.mfa.conftest import App, outbox_codes

F = mfa_pb2
POLICY = load_policy(PROJECT_ROOT / "services" / "mfa" / "policies" / "default.yaml")


@pytest.mark.parametrize("response", [
    face_pb2.VerifyFaceResponse(match=True, score=0.9),
    face_pb2.SubmitLivenessChallengeResponse(passed=True, match=True, score=0.9),
    voice_pb2.VerifyVoiceResponse(match=True, score=0.9),
    face_pb2.VerifyFaceResponse(match=True, score=0.9, llr=float("nan")),
], ids=["face", "face-challenge", "voice", "not-a-number"])
def test_a_response_without_an_llr_is_no_evidence(response):
    reasons: list = []
    face = FACTORS["face"]
    assert isinstance(face, BiometricFactor)
    assert face.evidence(POLICY.factors.face, response, reasons) == 0.0
    assert [r.code for r in reasons] == ["LLR_UNAVAILABLE"]


@pytest.mark.parametrize("llr,expected", [(0.0, 0.0), (4.5, 4.5), (-2.0, -2.0), (80.0, 10.0), (-80.0, -10.0)])
def test_a_calibrated_llr_counts_as_given_within_the_cap(llr, expected):
    reasons: list = []
    response = voice_pb2.VerifyVoiceResponse(match=llr > 0, llr=llr)
    voice = FACTORS["voice"]
    assert isinstance(voice, BiometricFactor)
    assert voice.evidence(POLICY.factors.voice, response, reasons) == expected and reasons == []


def _manifest_without_llr_map(tmp_path, model_id: str):
    manifest = yaml.safe_load((PROJECT_ROOT / "models" / "manifest.yaml").read_text())
    (model,) = [m for m in manifest["models"] if m["id"] == model_id]
    for record in model["calibration"].values():
        del record["llr"]
    path = tmp_path / "manifest.yaml"
    path.write_text(yaml.safe_dump(manifest, sort_keys=False, allow_unicode=True))
    return path


def test_a_face_service_whose_model_has_no_llr_map_brings_no_evidence(tmp_path):
    """A real face service reading a manifest whose embedder calibration has thresholds but no LLR
    map: the match still passes the factor, but face + SMS OTP (3.0) no longer reach the login's
    6.0. The MFA used to credit such a match +5 (uncalibrated_llr) and allow."""
    trials = SHARED / "fixtures" / "trials_face.csv"
    require(trials.is_file(), f"the fixtures in {trials.parent}")
    with open(trials, newline="") as fh:
        row = next(r for r in csv.DictReader(fh) if r["target"] == "1")
    data = tmp_path / "data"
    models = {"manifest": str(_manifest_without_llr_map(tmp_path, "mobilefacenet-arcface-192d"))}
    bio = ServiceHarness(make_settings(data, models=models))
    try:
        face = bio.start("face", timeout=240)
        mfa = ServiceHarness(make_settings(data, models=models, clients={
            "face": {"target": face.address}, "voice": {"target": "127.0.0.1:9", "retries": 0}}))
        mfa.start("mfa")
        ref = common_pb2.SubjectRef(tenant_id="bank-nollr", subject_id="cust-1")
        image = common_pb2.Image(data=(SHARED / "fixtures" / row["probe"]).read_bytes())
        with mfa.channel("mfa") as ch, bio.channel("face") as fch:
            stub, face_stub = mfa_pb2_grpc.MfaServiceStub(ch), face_pb2_grpc.FaceServiceStub(fch)
            stub.RecordConsent(common_pb2.RecordConsentRequest(consent=common_pb2.Consent(
                subject=ref, purpose=common_pb2.CONSENT_PURPOSE_BIOMETRIC_VERIFICATION,
                modalities=[common_pb2.MODALITY_FACE], granted=True, policy_version="privacy-2025-01")))
            stub.SetPhoneNumber(F.SetPhoneNumberRequest(subject=ref, phone_e164="+8613800135678"))
            face_stub.Enroll(face_pb2.EnrollFaceRequest(subject=ref, images=[common_pb2.Image(
                data=(SHARED / "fixtures" / row["enroll"]).read_bytes())]), timeout=120)
            direct = face_stub.Verify(face_pb2.VerifyFaceRequest(subject=ref, image=image, require_liveness=True),
                                      timeout=120)
            assert direct.match and not direct.HasField("llr")  # no LLR map: the service leaves it unset

            app = App()
            req = F.StartAuthenticationRequest(subject=ref, channel=F.CHANNEL_APP, action="login", device=app.device)
            s = app.opened(req, stub.StartAuthentication(req))
            r = stub.SubmitFactor(F.SubmitFactorRequest(session_id=s.session_id, face=app.face(s, image.data)),
                                  timeout=120)
            assert r.result.passed and r.result.llr == 0.0
            codes = [x.code for x in r.result.reasons]
            assert "LLR_UNAVAILABLE" in codes
            stub.SendOtp(F.SendOtpRequest(session_id=s.session_id))
            assert stub.SubmitFactor(F.SubmitFactorRequest(session_id=s.session_id, otp=F.OtpEvidence(
                code=outbox_codes(mfa.settings)[-1]))).result.passed
            d = stub.Decide(F.DecideRequest(session_id=s.session_id))
            assert d.outcome == F.OUTCOME_STEP_UP and d.total_llr == 3.0, d
        mfa.stop()
    finally:
        bio.stop()
