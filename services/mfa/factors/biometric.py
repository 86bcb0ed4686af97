"""The shared part of the face and voice factors: turning a service's answer into evidence.

The LLR comes from the service's response; a response without one (0.0: proto3 cannot tell
"absent" from zero, and no calibrated map gives exactly 0 in practice) is calibrated here from the
model manifest's record for the model and channel; without a record, a match counts
+uncalibrated_llr and a non-match -uncalibrated_llr. The LLR is clipped to +-llr_cap and weighted.
"""

from __future__ import annotations

import logging

from ..fusion import FactorOutcome
from ..policy.schema import BiometricFactor as BiometricPolicy
from ..reasons import Reason
from .base import Factor, FactorContext

log = logging.getLogger("biogate.mfa.factors")


class BiometricFactor(Factor):
    def llr(self, ctx: FactorContext, cfg: BiometricPolicy, match: bool, score: float, llr: float,
            model_id: str, channel: str) -> tuple[float, str]:
        source = "service"
        if llr == 0.0:
            source, llr = "uncalibrated", cfg.uncalibrated_llr if match else -cfg.uncalibrated_llr
            try:
                record = ctx.rt.models.calibration(model_id, channel) if model_id else None
            except Exception:  # an unknown model id from the service: no calibration
                record = None
            if record is not None and record.llr is not None:
                source, llr = "manifest", float(record.llr.llr(score))
        return max(-cfg.llr_cap, min(cfg.llr_cap, llr)), source

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
