"""MfaService wiring: servicer and the service definition for the bootstrap."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from services.common.api.v1 import mfa_pb2, mfa_pb2_grpc
from services.common.context import caller
from services.mfa.config import MfaSettings
from services.common.runtime import Runtime
from services.common.server.bootstrap import ServiceDefinition
from services.common.server.streams import BoundedStream
from services.mfa import subjects
from services.mfa.clients import check_credentials
from services.mfa.service import Orchestrator, budget_of
from services.mfa.webhooks import Worker
from services.mfa.wellknown import WellKnownServer


class MfaServicer(mfa_pb2_grpc.MfaServiceServicer):
    # Each RPC hands the orchestrator its principal (caller()), which decides and audits with it and
    # reads no RPC state itself.
    def __init__(self, rt: Runtime, orchestrator: Orchestrator) -> None:
        self.rt = rt
        self.mfa = orchestrator

    # --- authentication sessions
    def StartAuthentication(self, request, context):
        return self.mfa.start(request, caller=caller())

    def StartBiometricChallenge(self, request, context):
        return self.mfa.start_challenge(request, budget_of(context), caller=caller())

    def SubmitFactor(self, request, context):
        return self.mfa.submit(request, budget_of(context), caller=caller())

    def StreamVoiceFactor(self, request_iterator, context):
        if isinstance(request_iterator, BoundedStream):  # the interceptor's budgets, with the IVR's idle limit
            request_iterator.tighten(self.mfa.settings.mfa.ivr_stream.idle_timeout_s)
        return self.mfa.submit_voice_stream(request_iterator, budget_of(context), caller=caller())

    def SendOtp(self, request, context):
        return self.mfa.send_otp(request, caller=caller())

    def Decide(self, request, context):
        return self.mfa.decide(request, caller=caller())

    # --- push confirmation
    def SendPushConfirmation(self, request, context):
        return self.mfa.send_push(request, caller=caller())

    def ConfirmTransaction(self, request, context):
        return self.mfa.confirm_transaction(request, budget_of(context), caller=caller())

    def GetPushConfirmation(self, request, context):
        return self.mfa.get_push_confirmation(request, caller=caller())

    def SetPushToken(self, request, context):
        return self.mfa.set_push_token(request, caller=caller())

    # --- devices
    def StartDeviceRegistration(self, request, context):
        return self.mfa.start_device_registration(request, caller=caller())

    def RegisterDevice(self, request, context):
        return self.mfa.register_device(request, caller=caller())

    def ListDevices(self, request, context):
        return self.mfa.list_devices(request)

    def RevokeDevice(self, request, context):
        return self.mfa.revoke_device(request, caller=caller())

    # --- administration
    def UnlockSubject(self, request, context):
        return self.mfa.unlock(request, caller=caller())

    def ListReviews(self, request, context):
        return self.mfa.list_reviews(request)

    def ResolveReview(self, request, context):
        return self.mfa.resolve_review(request, caller=caller())

    def GetReview(self, request, context):
        return self.mfa.get_review(request)

    def GetSigningKeys(self, request, context):
        return self.mfa.jwks()

    # --- consent, contact and erasure
    def RecordConsent(self, request, context):
        return subjects.record_consent(self.rt, request, caller=caller())

    def WithdrawConsent(self, request, context):
        return subjects.withdraw_consent(self.rt, request, caller=caller())

    def GetConsent(self, request, context):
        return subjects.get_consent(self.rt, request)

    def DeleteSubject(self, request, context):
        return subjects.delete_subject(self.rt, self.mfa.store, self.mfa.clients, request, budget_of(context),
                                       self.mfa.rate_limit_keys, caller=caller())

    def SetPhoneNumber(self, request, context):
        return subjects.set_phone_number(self.rt, request, self.mfa.store, self.mfa.clock(), caller=caller())


def worker_tasks(orchestrator: Orchestrator) -> list[Callable[[], object]]:
    """What the review worker runs each sweep: review expiry and webhook delivery. Delivered and
    abandoned events are deleted by `biogate purge` alone (webhook_events): in batches, once per
    database rather than by every replica each sweep, and counted in its audit record."""
    return [orchestrator.reviews.expire_due, orchestrator.outbox.deliver_due]


def definition(settings: MfaSettings, clock: Callable[[], datetime] | None = None) -> ServiceDefinition:
    rt = Runtime.open(settings, "mfa")
    orchestrator = Orchestrator(rt, clock=clock)
    try:
        check_credentials(orchestrator.clients)  # refuse to start with credentials face/voice refuse
    except Exception:
        orchestrator.close()
        rt.close()
        raise
    servicer = MfaServicer(rt, orchestrator)
    cfg = settings.mfa
    wellknown = WellKnownServer(cfg.http, orchestrator.signing, cfg.issuer) if cfg.http.enabled else None
    details: dict[str, str] = {}
    # review expiry and webhook delivery, off the RPC threads
    worker = Worker(worker_tasks(orchestrator), cfg.reviews.sweep_s, orchestrator.outbox).start()
    orchestrator.reviews.notify = worker.wake

    def start() -> None:
        if wellknown is not None:
            wellknown.start()
            details["jwks_uri"] = wellknown.base_url + "/.well-known/jwks.json"

    def close() -> None:
        worker.stop()
        if wellknown is not None:
            wellknown.close()
        orchestrator.close()
        rt.close()

    result = ServiceDefinition(
        name="mfa",
        descriptors=[mfa_pb2.DESCRIPTOR.services_by_name["MfaService"]],
        register=lambda server: mfa_pb2_grpc.add_MfaServiceServicer_to_server(servicer, server),
        start=start,
        close=close,
        details=details,
        tenant_lookups={"session": orchestrator.sessions.tenant_of, "review": orchestrator.reviews.tenant_of},
        readiness=rt.readiness(),
    )
    result.service = orchestrator
    return result
