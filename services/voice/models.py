"""Where the voice models are: the model store's files, and the ECAPA ONNX derived from them.

The manifest may carry the export as its own model (``ecapa-voxceleb-onnx``, derived by
:func:`services.voice.ecapa.export_onnx`); until it does, the export is made once into the model
cache next to the checkpoint and reused while the checkpoint's sha256 is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from services.common.models import ModelStore, UnknownModelError

from .ecapa import export_onnx

VAD_ID = "silero-vad-v6"
ECAPA_ID = "ecapa-voxceleb"
ECAPA_ONNX_ID = "ecapa-voxceleb-onnx"


@dataclass(frozen=True)
class VoiceModelPaths:
    vad: Path  # silero_vad.onnx
    ecapa_dir: Path  # the SpeechBrain model directory
    ecapa_onnx: Path  # the exported network


def resolve(store: ModelStore) -> VoiceModelPaths:
    """The verified files (raises ModelUnavailableError with a fetch hint when missing)."""
    vad = store.path(VAD_ID)
    checkpoint = store.path(ECAPA_ID)
    try:
        onnx_path = store.path(ECAPA_ONNX_ID)
    except UnknownModelError:
        import hashlib

        digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()[:16]
        onnx_path = store.cache_dir / ".derived" / f"ecapa-voxceleb-{digest}.onnx"
        if not onnx_path.exists():
            export_onnx(checkpoint.parent, onnx_path)
    return VoiceModelPaths(vad=vad, ecapa_dir=checkpoint.parent, ecapa_onnx=onnx_path)
