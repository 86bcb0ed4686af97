"""The per-subject registry of bound devices: binding only after a strong authentication in the
same session, listing, and revocation, each binding and revocation an audit record."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from services.common import errors
from services.common.api.v1 import mfa_pb2
from services.common.runtime import Runtime
from services.common.storage import AlreadyExistsError, new_id
from services.common.subjects import actor, timestamp
from services.common.validation import identifier, subject_ref

from . import devices, requests
from .fusion import ACR_RANK
from .policy import PolicyStore
from .sessions import Sessions
from .storage import DeviceRecord, MfaStore


class DeviceRegistry:
    def __init__(self, rt: Runtime, store: MfaStore, sessions: Sessions, policies: PolicyStore, device_key: bytes,
                 clock: Callable[[], datetime]) -> None:
        self.rt, self.store, self.sessions, self.policies = rt, store, sessions, policies
        self._device_key, self.clock = device_key, clock

    def register(self, req: mfa_pb2.RegisterDeviceRequest) -> mfa_pb2.RegisterDeviceResponse:
        now = self.clock()
        rec = self.sessions.load(req.session_id, now)
        policy = self.policies.get(rec.tenant_id)
        binding = policy.factors.device.binding
        if devices.is_absent(req.device):
            raise errors.invalid_argument("device is required", device="required")
        device = devices.canonical(req.device, self._device_key, rec.tenant_id)
        devices.load_public_key(req.public_key)
        label = requests.label(req.label, "label")
        decision = rec.state.decision
        if decision is None or decision.outcome != "allow" or ACR_RANK.get(decision.acr, 0) < ACR_RANK[binding.min_acr]:
            raise errors.failed_precondition(
                f"binding a device needs an ALLOW decision of at least {binding.min_acr} in this session",
                "STRONG_AUTHENTICATION_REQUIRED")
        if (now - decision.at).total_seconds() > binding.within_s:
            raise errors.failed_precondition("the authentication is too old to bind a device; authenticate again",
                                             "AUTHENTICATION_TOO_OLD")
        if device.fingerprint != rec.state.device.fp:
            raise errors.failed_precondition("only the device that authenticated in this session can be bound",
                                             "DEVICE_MISMATCH")
        if rec.state.bound_device_id:
            raise errors.failed_precondition("this session already bound a device", "ALREADY_BOUND_IN_SESSION")
        device_id = "dev_" + new_id()

        def change(st):
            if st.bound_device_id:
                raise errors.failed_precondition("this session already bound a device", "ALREADY_BOUND_IN_SESSION")
            st.bound_device_id = device_id
        rec = self.sessions.mutate(rec, change)
        try:
            self.store.devices.add(DeviceRecord(rec.tenant_id, rec.subject_id, device.fingerprint, req.public_key,
                                                device.soft, label, device.platform, id=device_id, bound_at=now))
        except AlreadyExistsError:
            raise errors.already_exists("this device is already bound to the subject", "DEVICE_ALREADY_BOUND") from None
        self.rt.audit.append("mfa.device_bound", actor(), rec.tenant_id, rec.subject_id,
                             {"session_id": rec.id, "device_id": device_id, "platform": device.platform})
        return mfa_pb2.RegisterDeviceResponse(device_id=device_id)

    def list(self, req: mfa_pb2.ListDevicesRequest) -> mfa_pb2.ListDevicesResponse:
        tenant, subject = subject_ref(req.subject)
        return mfa_pb2.ListDevicesResponse(devices=[
            mfa_pb2.BoundDevice(device_id=d.id, label=d.label, platform=d.platform, bound_at=timestamp(d.bound_at),
                                last_seen_at=timestamp(d.last_seen_at) if d.last_seen_at else None,
                                revoked=d.revoked_at is not None)
            for d in self.store.devices.list_for_subject(tenant, subject, include_revoked=True)])

    def revoke(self, req: mfa_pb2.RevokeDeviceRequest) -> mfa_pb2.RevokeDeviceResponse:
        tenant, subject = subject_ref(req.subject)
        device_id = identifier(req.device_id, "device_id")
        rec = self.store.devices.get(tenant, device_id)
        if rec is None or rec.subject_id != subject:
            raise errors.not_found("the subject has no device with that id", "DEVICE_NOT_FOUND")
        if self.store.devices.revoke(tenant, device_id, self.clock()):
            self.rt.audit.append("mfa.device_revoked", actor(), tenant, subject, {"device_id": device_id})
        return mfa_pb2.RevokeDeviceResponse()
