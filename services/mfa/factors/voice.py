"""Voice: an utterance verified by VoiceService.Verify, optionally answering a digit challenge
this session handed out (replay defence). A failed spoof check or challenge is a veto."""

from __future__ import annotations

from services.common import errors
from services.common.api.v1 import common_pb2, mfa_pb2, voice_pb2

from ..fusion import FactorOutcome
from ..reasons import Reason
from .base import FactorContext
from .biometric import BiometricFactor, service_reasons


class VoiceFactor(BiometricFactor):
    name = "voice"
    challenge_rpc = ("voice", "StartVoiceChallenge", voice_pb2.StartVoiceChallengeRequest, "digits")

    def validate(self, ctx: FactorContext, ev: mfa_pb2.VoiceEvidence) -> None:
        if not ev.audio.data:
            raise errors.invalid_argument("voice.audio is required", voice__audio="required")
        if ev.challenge_nonce and ev.challenge_nonce not in ctx.state.challenges.get("voice", []):
            raise errors.failed_precondition("voice.challenge_nonce was not issued to this session",
                                             "CHALLENGE_NOT_IN_SESSION")

    def check(self, ctx: FactorContext, ev: mfa_pb2.VoiceEvidence) -> FactorOutcome:
        cfg = ctx.policy.factors.voice
        telephone = ctx.state.channel == "ivr"
        channel = voice_pb2.VOICE_CHANNEL_TELEPHONE if telephone else voice_pb2.VOICE_CHANNEL_UNSPECIFIED
        r = ctx.clients["voice"].call("Verify", voice_pb2.VerifyVoiceRequest(
            subject=common_pb2.SubjectRef(tenant_id=ctx.tenant, subject_id=ctx.subject),
            audio=ev.audio, channel=channel, challenge_nonce=ev.challenge_nonce),
            idempotent=not ev.challenge_nonce, budget_s=ctx.budget_s)  # a nonce is single use
        reasons = service_reasons(r.reasons)
        if r.HasField("quality") and not r.quality.accepted:
            reasons = service_reasons(r.quality.issues) + reasons
            reasons.insert(0, Reason("CAPTURE_REJECTED", "the recording is not usable; record again"))
            return self.outcome(cfg, False, 0.0, False, False, reasons, capture_error=True)
        veto = False
        if r.spoof_checked and not r.spoof_passed:
            veto = True
            reasons.insert(0, Reason("SPOOF_DETECTED", "synthetic or replayed speech suspected"))
        if ev.challenge_nonce and not r.challenge_passed:
            veto = True
            reasons.insert(0, Reason("CHALLENGE_FAILED", "the spoken digits do not answer the challenge"))
        passed = r.match
        if cfg.require_spoof_check and not r.spoof_checked:
            passed = False
            reasons.insert(0, Reason("SPOOF_NOT_CHECKED", "the policy requires a spoof check"))
        return self.outcome(cfg, passed, self.evidence(cfg, r, reasons), veto, r.spoof_checked, reasons)
