"""SMS OTP: the code sent by SendOtp, checked against its keyed hash, single use."""

from __future__ import annotations

from services.common import errors
from services.common.api.v1 import mfa_pb2

from ..fusion import FactorOutcome
from ..reasons import Reason
from .base import Factor, FactorContext

MESSAGES = {
    "OTP_OK": "the code is correct",
    "OTP_WRONG": "the code is wrong",
    "OTP_EXPIRED_OR_USED": "no valid code: it expired, was used, was replaced or ran out of attempts",
}


class SmsOtpFactor(Factor):
    name = "sms_otp"

    def validate(self, ctx: FactorContext, ev: mfa_pb2.OtpEvidence) -> None:
        digits = ctx.policy.factors.sms_otp.digits
        code = ev.code
        if not (len(code) == digits and code.isascii() and code.isdigit()):
            raise errors.invalid_argument(f"otp.code must be {digits} digits", otp__code=f"not {digits} digits")
        if not ctx.state.get("otp_sent_at"):
            raise errors.failed_precondition("no OTP was sent in this session; call SendOtp first", "OTP_NOT_SENT")

    def check(self, ctx: FactorContext, ev: mfa_pb2.OtpEvidence) -> FactorOutcome:
        result = ctx.otp.check(ctx.session_id, ev.code, ctx.now)
        ctx.notes["otp_attempts_left"] = result.attempts_left
        evidence = ctx.policy.factors.sms_otp.evidence if result.passed else 0.0
        return FactorOutcome(self.name, result.passed, evidence,
                             reasons=(Reason(result.reason, MESSAGES[result.reason]),))
