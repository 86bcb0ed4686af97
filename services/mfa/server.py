"""MfaService wiring: servicer and the service definition for the bootstrap."""

from __future__ import annotations

from services.common.api.v1 import mfa_pb2, mfa_pb2_grpc
from services.common.config import Settings
from services.common.runtime import Runtime
from services.common.server.bootstrap import ServiceDefinition
from services.mfa import subjects


class MfaServicer(mfa_pb2_grpc.MfaServiceServicer):
    """RPCs not overridden here answer UNIMPLEMENTED (the MFA orchestrator issue builds them)."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    def RecordConsent(self, request, context):
        return subjects.record_consent(self.rt, request)

    def WithdrawConsent(self, request, context):
        return subjects.withdraw_consent(self.rt, request)

    def GetConsent(self, request, context):
        return subjects.get_consent(self.rt, request)

    def DeleteSubject(self, request, context):
        return subjects.delete_subject(self.rt, request)

    def SetPhoneNumber(self, request, context):
        return subjects.set_phone_number(self.rt, request)


def definition(settings: Settings) -> ServiceDefinition:
    rt = Runtime.open(settings)
    servicer = MfaServicer(rt)
    return ServiceDefinition(
        name="mfa",
        descriptors=[mfa_pb2.DESCRIPTOR.services_by_name["MfaService"]],
        register=lambda server: mfa_pb2_grpc.add_MfaServiceServicer_to_server(servicer, server),
        close=rt.close,
    )
