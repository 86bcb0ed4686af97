"""SMS OTP: a code sent to the subject's phone (its challenge, started by SendOtp), checked against
its keyed hash, single use."""

from __future__ import annotations

import math

import grpc

from services.common import errors
from services.common.api.v1 import mfa_pb2
from services.common.subjects import timestamp

from ..fusion import FactorOutcome
from ..otp import purpose
from ..reasons import Reason
from ..state import SessionState
from .base import Challenge, Factor, FactorContext

MESSAGES = {
    "OTP_OK": "the code is correct",
    "OTP_WRONG": "the code is wrong",
    "OTP_EXPIRED_OR_USED": "no valid code: it expired, was used, was replaced or ran out of attempts",
}


class SmsOtpFactor(Factor):
    name = "sms_otp"
    claims = True

    def claim(self, ctx: FactorContext, state: SessionState) -> None:
        """The resend cool-down, checked and taken in the session's compare-and-swap."""
        cfg = ctx.policy.factors.sms_otp
        last = state.otp_sent_at
        wait = cfg.resend_cooldown_s - (ctx.now - last).total_seconds() if last else 0
        if wait > 0:
            raise errors.ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                      f"an OTP was sent moments ago; ask again in {math.ceil(wait)} s",
                                      "OTP_COOLDOWN", metadata={"retry_after_s": str(math.ceil(wait))})
        state.otp_sent_at = ctx.now

    def release(self, ctx: FactorContext, state: SessionState, before: SessionState) -> None:
        state.otp_sent_at = before.otp_sent_at

    def issue(self, ctx: FactorContext) -> Challenge:
        cfg = ctx.policy.factors.sms_otp
        what = purpose(ctx.state.action, ctx.state.amount, ctx.notes.get("payee"))
        sent = ctx.otp.send(cfg, ctx.tenant, ctx.subject, ctx.session_id, ctx.now, purpose=what)
        return Challenge(
            mfa_pb2.SendOtpResponse(masked_phone=sent.masked_phone, expires_at=timestamp(sent.expires_at),
                                    resend_after=timestamp(sent.resend_after)),
            audit=("mfa.otp_sent", {"session_id": ctx.session_id, "valid_s": cfg.ttl_s, "digits": cfg.digits}))

    def validate(self, ctx: FactorContext, ev: mfa_pb2.OtpEvidence) -> None:
        digits = ctx.policy.factors.sms_otp.digits
        code = ev.code
        if not (len(code) == digits and code.isascii() and code.isdigit()):
            raise errors.invalid_argument(f"otp.code must be {digits} digits", otp__code=f"not {digits} digits")
        if not ctx.state.otp_sent_at:
            raise errors.failed_precondition("no OTP was sent in this session; call SendOtp first", "OTP_NOT_SENT")

    def check(self, ctx: FactorContext, ev: mfa_pb2.OtpEvidence) -> FactorOutcome:
        result = ctx.otp.check(ctx.session_id, ev.code, ctx.now)
        ctx.notes["otp_attempts_left"] = result.attempts_left
        evidence = ctx.policy.factors.sms_otp.evidence if result.passed else 0.0
        return FactorOutcome(self.name, result.passed, evidence, authenticator="sms",
                             reasons=(Reason(result.reason, MESSAGES[result.reason]),))
