"""Face: a selfie with passive liveness (FaceService.Verify), or a frame burst answering an
active liveness challenge this session handed out (FaceService.SubmitLivenessChallenge). Either is
bound to the session and the device by its CaptureBinding (the burst frame by frame)."""

from __future__ import annotations

from services.common import errors
from services.common.api.v1 import common_pb2, face_pb2, mfa_pb2

from ..fusion import FactorOutcome
from ..reasons import Reason
from .base import FactorContext
from .biometric import BiometricFactor, optional, service_reasons

MAX_FRAMES = 64


class FaceFactor(BiometricFactor):
    name = "face"
    challenge_rpc = ("face", "StartLivenessChallenge", face_pb2.StartLivenessChallengeRequest, "moves")

    def validate_capture(self, ctx: FactorContext, ev: mfa_pb2.FaceEvidence) -> None:
        if ev.frames:
            if not ev.challenge_nonce:
                raise errors.invalid_argument("face.frames need the challenge_nonce they answer",
                                              face__challenge_nonce="required with frames")
            if ev.challenge_nonce not in ctx.state.challenges.get("face", []):
                raise errors.failed_precondition("face.challenge_nonce was not issued to this session",
                                                 "CHALLENGE_NOT_IN_SESSION")
            if len(ev.frames) > MAX_FRAMES or any(not f.image.data for f in ev.frames):
                raise errors.invalid_argument(f"face.frames: 1..{MAX_FRAMES} frames, each with image data",
                                              face__frames="empty frame or too many")
            if ev.HasField("image") and ev.image.data:
                raise errors.invalid_argument("send either face.image or face.frames", face__image="both given")
        elif not ev.image.data:
            raise errors.invalid_argument("face.image (or a challenge burst in face.frames) is required",
                                          face__image="required")

    def check(self, ctx: FactorContext, ev: mfa_pb2.FaceEvidence) -> FactorOutcome:
        cfg = ctx.policy.factors.face
        client = ctx.clients["face"]
        subject = common_pb2.SubjectRef(tenant_id=ctx.tenant, subject_id=ctx.subject)
        reasons: list[Reason] = []
        if ev.frames:
            r = client.call("SubmitLivenessChallenge", face_pb2.SubmitLivenessChallengeRequest(
                subject=subject, nonce=ev.challenge_nonce, frames=ev.frames, verify_subject=True),
                idempotent=False, budget_s=ctx.budget_s)
            reasons = service_reasons(r.reasons)
            live_failed = not r.challenge_passed  # the moves, timing or per-frame liveness of the burst
            if live_failed:
                reasons.insert(0, Reason("LIVENESS_FAILED", "the active liveness challenge failed"))
            llr = self.evidence(cfg, r, reasons)
            return self.outcome(cfg, r.passed and r.match, llr, live_failed, True, reasons,
                                target_fmr=optional(r, "target_fmr"), measured_fmr=optional(r, "measured_fmr"),
                                target_apcer=r.liveness_target_apcer or None,
                                measured_apcer=optional(r, "liveness_measured_apcer"))
        r = client.call("Verify", face_pb2.VerifyFaceRequest(subject=subject, image=ev.image,
                                                             require_liveness=cfg.require_liveness),
                        idempotent=True, budget_s=ctx.budget_s)
        reasons = service_reasons(r.reasons)
        if r.HasField("quality") and not r.quality.accepted:
            reasons = service_reasons(r.quality.issues) + reasons
            reasons.insert(0, Reason("CAPTURE_REJECTED", "the image is not usable; capture again"))
            return self.outcome(cfg, False, 0.0, False, False, reasons, capture_error=True)
        veto = r.liveness_checked and not r.live
        if veto:
            reasons.insert(0, Reason("LIVENESS_FAILED", "passive liveness: presentation attack suspected"))
        passed = r.match
        if cfg.require_liveness and not r.liveness_checked:
            passed = False
            reasons.insert(0, Reason("LIVENESS_NOT_CHECKED", "the policy requires liveness"))
        return self.outcome(cfg, passed, self.evidence(cfg, r, reasons), veto, r.liveness_checked, reasons,
                            target_fmr=r.target_fmr or None, measured_fmr=optional(r, "measured_fmr"),
                            target_apcer=optional(r, "liveness_target_apcer"),
                            measured_apcer=optional(r, "liveness_measured_apcer"))
