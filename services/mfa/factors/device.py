"""Device: proof of possession of a bound device's key, a signature (or WebAuthn assertion) over the
session's transaction context with an empty evidence list (services/mfa/binding.py)."""

from __future__ import annotations

from services.common.api.v1 import mfa_pb2

from ..fusion import FactorOutcome
from ..proofs import Refused
from ..reasons import Reason
from .base import Factor, FactorContext


class DeviceFactor(Factor):
    name = "device"

    def validate(self, ctx: FactorContext, ev: mfa_pb2.DeviceProof) -> None:
        assert ctx.proofs is not None
        ctx.proofs.device_shape(ctx, ev)

    def check(self, ctx: FactorContext, ev: mfa_pb2.DeviceProof) -> FactorOutcome:
        assert ctx.proofs is not None
        try:
            proven = ctx.proofs.device_proof(ctx, ev)
        except Refused as refused:
            return FactorOutcome(self.name, False, reasons=(refused.reason,))
        ctx.store.devices.touch(ctx.tenant, ev.device_id, ctx.now)
        reasons = (Reason("DEVICE_KEY_OK", "possession of the bound device key proven"),) + proven.reasons
        return FactorOutcome(self.name, True, ctx.policy.factors.device.evidence, reasons=reasons,
                             binding=proven.kind, authenticator=proven.authenticator)
