"""Voice: an utterance verified by VoiceService.Verify, bound to the session and the device by its
CaptureBinding, answering the digit challenge this session handed out (replay defence; required
unless the policy turns it off for the action and channel). A failed spoof check or challenge is a
veto."""

from __future__ import annotations

from services.common import errors
from services.common.api.v1 import common_pb2, mfa_pb2, voice_pb2

from ..fusion import FactorOutcome
from ..reasons import Reason
from .base import FactorContext
from .biometric import BiometricFactor, optional, service_reasons


class VoiceFactor(BiometricFactor):
    name = "voice"
    challenge_rpc = ("voice", "StartVoiceChallenge", voice_pb2.StartVoiceChallengeRequest, "digits")

    def validate_capture(self, ctx: FactorContext, ev: mfa_pb2.VoiceEvidence) -> None:
        if not ev.audio.data:
            raise errors.invalid_argument("voice.audio is required", voice__audio="required")
        if ev.challenge_nonce and ev.challenge_nonce not in ctx.state.challenges.get("voice", []):
            raise errors.failed_precondition("voice.challenge_nonce was not issued to this session",
                                             "CHALLENGE_NOT_IN_SESSION")
        if not ev.challenge_nonce and ctx.policy.voice_challenge(ctx.state.action, ctx.state.channel):
            raise errors.failed_precondition(
                "the voice factor needs the digit challenge: call StartBiometricChallenge (modality voice) "
                "and send the recording of the digits with its challenge_nonce", "CHALLENGE_REQUIRED")

    def check(self, ctx: FactorContext, ev: mfa_pb2.VoiceEvidence) -> FactorOutcome:
        cfg = ctx.policy.factors.voice
        callback = ctx.state.callback_channel == "ivr" and ev.binding.WhichOneof("proof") == "terminal"
        telephone = ctx.state.channel == "ivr" or callback
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
        if not r.spoof_passed:  # a layer that ran (synthetic speech, replay) refused the audio
            veto = True
            reasons.insert(0, Reason("SPOOF_DETECTED", "synthetic or replayed speech suspected"))
        if ev.challenge_nonce and not (r.challenge_checked and r.challenge_passed):
            veto = True
            reasons.insert(0, Reason("CHALLENGE_FAILED", "the spoken digits do not answer the challenge"))
        passed = r.match
        if cfg.require_spoof_check and not r.spoof_checked:
            passed = False
            reasons.insert(0, Reason("SPOOF_NOT_CHECKED", "the policy requires the synthetic-speech check"))
        return self.outcome(cfg, passed, self.evidence(cfg, r, reasons), veto, r.spoof_checked, reasons,
                            target_fmr=r.target_fmr or None, measured_fmr=optional(r, "measured_fmr"),
                            target_apcer=optional(r, "spoof_target_apcer"),
                            measured_apcer=optional(r, "spoof_measured_apcer"))
