"""The shared part of the face and voice factors: the capture's binding, and turning a service's
answer into evidence.

A capture counts only bound to the session and the device (services/mfa/proofs.py): its binding is
checked for shape in validate() and verified in evaluate() before the biometric service is asked;
a binding that does not hold fails the factor with a veto. A binding by a bound device's key also
proves the device factor, when the policy says so (binding.proves_device).

The evidence is the LLR the service calibrated for its model and channel, clipped to +-llr_cap and
weighted. A response without an LLR (the model's calibration has no LLR map) is no evidence: 0,
with the reason LLR_UNAVAILABLE; the match flag still decides whether the factor passed.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

from services.common.api.v1 import common_pb2, mfa_pb2

from ..binding import evidence_digests
from ..fusion import FactorOutcome
from ..policy.schema import BiometricFactor as BiometricPolicy
from ..proofs import Refused
from ..reasons import Reason
from .base import Challenge, Factor, FactorContext


def optional(message, name: str) -> float | None:
    return float(getattr(message, name)) if message.HasField(name) else None


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

    # ------------------------------------------------------------------ the capture's binding
    def validate(self, ctx: FactorContext, ev: Any) -> None:
        self.validate_capture(ctx, ev)
        assert ctx.proofs is not None
        ctx.proofs.shape(ctx, ev.binding if ev.HasField("binding") else None, f"{self.name}.binding")

    def validate_capture(self, ctx: FactorContext, ev: Any) -> None:
        """Hook: refuse malformed captures (raise ServiceError)."""

    def evaluate(self, ctx: FactorContext, ev: Any) -> FactorOutcome:
        assert ctx.proofs is not None
        try:
            bound = ctx.proofs.capture(ctx, ev.binding, evidence_digests(ev))
        except Refused as refused:
            return FactorOutcome(self.name, False, veto=True, reasons=(refused.reason,))
        ctx.notes["bound"] = bound
        if bound.device_id:
            ctx.store.devices.touch(ctx.tenant, bound.device_id, ctx.now)
        if bound.proves_device and ctx.policy.binding.proves_device and ctx.policy.factors.enabled("device"):
            ctx.also.append(FactorOutcome(
                "device", True, ctx.policy.factors.device.evidence, binding=bound.kind,
                authenticator=bound.authenticator, reasons=(Reason(
                    "DEVICE_KEY_OK", f"possession of the bound device key proven by the {self.name} capture's signature"),)))
        outcome = super().evaluate(ctx, ev)
        return dataclasses.replace(outcome, binding=bound.kind, authenticator=bound.authenticator,
                                   reasons=outcome.reasons + bound.reasons)

    # ------------------------------------------------------------------ the service's answer
    @staticmethod
    def evidence(cfg: BiometricPolicy, response, reasons: list[Reason]) -> float:
        """The response's calibrated LLR, clipped; none, or a value that is not a number, is 0."""
        if not response.HasField("llr") or not math.isfinite(response.llr):
            reasons.append(Reason("LLR_UNAVAILABLE", "the service gave no calibrated LLR: no evidence"))
            return 0.0
        return max(-cfg.llr_cap, min(cfg.llr_cap, float(response.llr)))

    def outcome(self, cfg: BiometricPolicy, passed: bool, llr: float, veto: bool, liveness: bool,
                reasons: list[Reason], capture_error: bool = False, *, target_fmr: float | None = None,
                measured_fmr: float | None = None, target_apcer: float | None = None,
                measured_apcer: float | None = None) -> FactorOutcome:
        deny = not veto and not capture_error and llr <= cfg.deny_llr
        if deny:
            reasons.append(Reason("BIOMETRIC_MISMATCH", f"LLR {llr:.2f} at or below {cfg.deny_llr:.2f}"))
        if capture_error:
            llr = 0.0
        return FactorOutcome(self.name, passed and not veto and not capture_error, llr * cfg.weight, veto, deny,
                             liveness=liveness, reasons=tuple(reasons), capture_error=capture_error,
                             target_fmr=target_fmr, measured_fmr=measured_fmr, target_apcer=target_apcer,
                             measured_apcer=measured_apcer)


def service_reasons(items) -> list[Reason]:
    return [Reason(r.code, r.message) for r in items][:8]
