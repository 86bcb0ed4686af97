"""FaceService wiring for the bootstrap: every RPC handed to the method of the same name of
:class:`services.face.service.FaceService`; the warm-up loads the models and opens its gate."""

from __future__ import annotations

from services.common.api.v1 import face_pb2, face_pb2_grpc
from services.face.config import FaceSettings
from services.common.modality import serving
from services.common.server.bootstrap import ServiceDefinition
from services.face.service import FaceService


def definition(settings: FaceSettings) -> ServiceDefinition:
    return serving.definition(settings, "face", lambda rt: FaceService(rt, settings.face),
                              face_pb2.DESCRIPTOR.services_by_name["FaceService"], face_pb2_grpc.FaceServiceServicer,
                              face_pb2_grpc.add_FaceServiceServicer_to_server)
