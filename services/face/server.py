"""FaceService wiring: servicer, warm-up and the service definition for the bootstrap."""

from __future__ import annotations

from services.common import subjects
from services.common.api.v1 import face_pb2, face_pb2_grpc
from services.common.config import Settings
from services.common.modelset import active_model_files
from services.common.runtime import Runtime
from services.common.server.bootstrap import ServiceDefinition

MODEL_ROLES = ("face_detector", "face_embedder", "face_liveness")


class FaceServicer(face_pb2_grpc.FaceServiceServicer):
    """RPCs not overridden here answer UNIMPLEMENTED (the face service issue builds them)."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    def GetEnrollment(self, request, context):
        return subjects.get_enrollment(self.rt, request, "face")

    def DeleteSubject(self, request, context):
        return subjects.delete_modality(self.rt, request, "face")


def definition(settings: Settings) -> ServiceDefinition:
    rt = Runtime.open(settings)
    servicer = FaceServicer(rt)
    result = ServiceDefinition(
        name="face",
        descriptors=[face_pb2.DESCRIPTOR.services_by_name["FaceService"]],
        register=lambda server: face_pb2_grpc.add_FaceServiceServicer_to_server(servicer, server),
        close=rt.close,
    )

    def warm_up() -> None:
        files = active_model_files(rt.models, MODEL_ROLES)
        result.details["models"] = ",".join(sorted(files))

    result.warm_up = warm_up
    return result
