"""Device: proof of possession of a bound device's key, a signature over the session nonce."""

from __future__ import annotations

from services.common import errors
from services.common.api.v1 import mfa_pb2
from services.common.validation import identifier

from ..devices import verify_signature
from ..fusion import FactorOutcome
from ..reasons import Reason
from .base import Factor, FactorContext

MAX_SIGNATURE = 256


class DeviceFactor(Factor):
    name = "device"

    def validate(self, ctx: FactorContext, ev: mfa_pb2.DeviceProof) -> None:
        identifier(ev.device_id, "device.device_id")
        if not ev.signature or len(ev.signature) > MAX_SIGNATURE:
            raise errors.invalid_argument(f"device.signature must be 1..{MAX_SIGNATURE} bytes",
                                          device__signature="missing or too long")

    def check(self, ctx: FactorContext, ev: mfa_pb2.DeviceProof) -> FactorOutcome:
        rec = ctx.store.devices.get(ctx.tenant, ev.device_id)
        if rec is None or rec.subject_id != ctx.subject or rec.revoked_at is not None or not rec.public_key:
            return FactorOutcome(self.name, False, reasons=(
                Reason("DEVICE_NOT_BOUND", "no bound device of this subject has that id"),))
        if not verify_signature(rec.public_key, ev.signature, ctx.state.nonce.encode()):
            return FactorOutcome(self.name, False, reasons=(
                Reason("DEVICE_SIGNATURE_INVALID", "the signature over the session nonce does not verify"),))
        ctx.store.devices.touch(ctx.tenant, rec.id, ctx.now)
        reasons = [Reason("DEVICE_KEY_OK", "possession of the bound device key proven")]
        if ctx.state.device.device_id not in (None, rec.id):
            reasons.append(Reason("DEVICE_INFO_MISMATCH", "the key belongs to another bound device than reported"))
        return FactorOutcome(self.name, True, ctx.policy.factors.device.evidence, reasons=tuple(reasons))
