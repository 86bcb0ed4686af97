"""The shared part of the face and voice factors: turning a service's answer into evidence.

The evidence is the LLR the service calibrated for its model and channel, clipped to +-llr_cap and
weighted. A response without an LLR (the model's calibration has no LLR map) is no evidence: 0,
with the reason LLR_UNAVAILABLE; the match flag still decides whether the factor passed.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

from services.common.api.v1 import common_pb2, mfa_pb2

from ..fusion import FactorOutcome
from ..policy.schema import BiometricFactor as BiometricPolicy
from ..reasons import Reason
from .base import Challenge, Factor, FactorContext


class BiometricFactor(Factor):
    # the service's RPC that starts a challenge, its request type, and the field of its answer
    # that StartBiometricChallengeResponse passes on
    challenge_rpc: ClassVar[tuple[str, str, Any, str]]

    def issue(self, ctx: FactorContext) -> Challenge:
        service, rpc, request_type, field = self.challenge_rpc
        request = request_type(subject=common_pb2.SubjectRef(tenant_id=ctx.tenant, subject_id=ctx.subject))
        reply = ctx.clients[service].call(rpc, request, True, ctx.budget_s)
        return Challenge(mfa_pb2.StartBiometricChallengeResponse(challenge=reply.challenge,
                                                                 **{field: getattr(reply, field)}),
                         nonce=reply.challenge.nonce)

    @staticmethod
    def evidence(cfg: BiometricPolicy, response, reasons: list[Reason]) -> float:
        """The response's calibrated LLR, clipped; none, or a value that is not a number, is 0."""
        if not response.HasField("llr") or not math.isfinite(response.llr):
            reasons.append(Reason("LLR_UNAVAILABLE", "the service gave no calibrated LLR: no evidence"))
            return 0.0
        return max(-cfg.llr_cap, min(cfg.llr_cap, float(response.llr)))

    def outcome(self, cfg: BiometricPolicy, passed: bool, llr: float, veto: bool, liveness: bool,
                reasons: list[Reason], capture_error: bool = False) -> FactorOutcome:
        deny = not veto and not capture_error and llr <= cfg.deny_llr
        if deny:
            reasons.append(Reason("BIOMETRIC_MISMATCH", f"LLR {llr:.2f} at or below {cfg.deny_llr:.2f}"))
        if capture_error:
            llr = 0.0
        return FactorOutcome(self.name, passed and not veto and not capture_error, llr * cfg.weight, veto, deny,
                             liveness=liveness, reasons=tuple(reasons), capture_error=capture_error)


def service_reasons(items) -> list[Reason]:
    return [Reason(r.code, r.message) for r in items][:8]
