"""Device: proof of possession of a bound device's key, a signature (or WebAuthn assertion) over the
session's transaction context with an empty evidence list (services/mfa/binding.py)."""

from __future__ import annotations

from services.common import errors
from services.common.api.v1 import mfa_pb2

from ..fusion import FactorOutcome
from ..proofs import Refused
from ..reasons import Reason
from ..state import SessionState
from .base import Factor, FactorContext


def _not_again(state: SessionState, device_id: str) -> None:
    # A second proof of the same key over the same context is a copy (byte for byte, or an ECDSA
    # signature re-encoded or malleated): it adds no evidence, and as a pass is never charged to
    # the lockout it could be sent without end.
    if device_id in state.proven_devices:
        raise errors.failed_precondition("this device's key was already proven in this session",
                                         "DEVICE_ALREADY_PROVEN")


class DeviceFactor(Factor):
    name = "device"

    def validate(self, ctx: FactorContext, ev: mfa_pb2.DeviceProof) -> None:
        assert ctx.proofs is not None
        ctx.proofs.device_shape(ctx, ev)
        _not_again(ctx.state, ev.device_id)

    def check(self, ctx: FactorContext, ev: mfa_pb2.DeviceProof) -> FactorOutcome:
        assert ctx.proofs is not None
        try:
            proven = ctx.proofs.device_proof(ctx, ev)
        except Refused as refused:
            return FactorOutcome(self.name, False, reasons=(refused.reason,))
        ctx.store.devices.touch(ctx.tenant, ev.device_id, ctx.now)
        ctx.notes["proven"] = ev.device_id
        reasons = (Reason("DEVICE_KEY_OK", "possession of the bound device key proven"),) + proven.reasons
        return FactorOutcome(self.name, True, ctx.policy.factors.device.evidence, reasons=reasons,
                             binding=proven.kind, authenticator=proven.authenticator)

    def settle(self, ctx: FactorContext, state: SessionState, ev: mfa_pb2.DeviceProof) -> None:
        if "proven" in ctx.notes:  # it passed: a copy that raced past validate() is refused here
            _not_again(state, ctx.notes["proven"])
            state.proven_devices.append(ctx.notes["proven"])
