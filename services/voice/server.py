"""The voice service's process: glibc's arenas bounded, then the definition the bootstrap serves
(:mod:`services.common.modality.serving`: each RPC handed to the VoiceService method of its name)."""

from __future__ import annotations

from services.common.api.v1 import voice_pb2, voice_pb2_grpc
from services.voice.config import VoiceSettings
from services.common.modality import serving
from services.common.server.bootstrap import ServiceDefinition

from .service import VoiceService


def _limit_malloc_arenas(n: int = 2) -> None:
    """glibc gives each thread that allocates its own arena (up to 8 per core): with 16 RPC
    threads and the inference workers, freed activations then stay resident. Two arenas kept the
    service's peak RSS ~300 MB lower under load (bench/voice_bench.py)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name:
        try:
            ctypes.CDLL(name).mallopt(-8, n)  # M_ARENA_MAX
        except (OSError, AttributeError):
            pass


def definition(settings: VoiceSettings) -> ServiceDefinition:
    _limit_malloc_arenas()
    return serving.definition(settings, "voice", VoiceService, voice_pb2.DESCRIPTOR.services_by_name["VoiceService"],
                              voice_pb2_grpc.VoiceServiceServicer, voice_pb2_grpc.add_VoiceServiceServicer_to_server)
