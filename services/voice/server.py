"""VoiceService wiring: servicer, warm-up and the service definition for the bootstrap."""

from __future__ import annotations

from services.common import subjects
from services.common.api.v1 import voice_pb2, voice_pb2_grpc
from services.common.config import Settings
from services.common.modelset import active_model_files
from services.common.runtime import Runtime
from services.common.server.bootstrap import ServiceDefinition

MODEL_ROLES = ("speaker_embedder", "voice_antispoof", "vad")


class VoiceServicer(voice_pb2_grpc.VoiceServiceServicer):
    """RPCs not overridden here answer UNIMPLEMENTED (the voice service issue builds them)."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    def GetEnrollment(self, request, context):
        return subjects.get_enrollment(self.rt, request, "voice")

    def DeleteSubject(self, request, context):
        return subjects.delete_modality(self.rt, request, "voice")


def definition(settings: Settings) -> ServiceDefinition:
    rt = Runtime.open(settings)
    servicer = VoiceServicer(rt)
    result = ServiceDefinition(
        name="voice",
        descriptors=[voice_pb2.DESCRIPTOR.services_by_name["VoiceService"]],
        register=lambda server: voice_pb2_grpc.add_VoiceServiceServicer_to_server(servicer, server),
        close=rt.close,
    )

    def warm_up() -> None:
        files = active_model_files(rt.models, MODEL_ROLES)
        result.details["models"] = ",".join(sorted(files))

    result.warm_up = warm_up
    return result
