"""Pretrained model files: the manifest (models/manifest.yaml), the cache, and `biogate models`.

    store = ModelStore(settings)
    store.fetch()                       # the active models; idempotent and fast when cached
    onnx_path = store.path("yunet-2023mar")
    ecapa_dir = store.path("ecapa-voxceleb").parent
    record = store.calibration("sface-2021dec-batch", "mobile-selfie")
"""

from .calibration import CalibrationRecord, LogisticLLR, OperatingPoint, PavLLR, TrialCounts
from .errors import FetchError, ManifestError, ModelError, ModelUnavailableError, UnknownModelError
from .manifest import Manifest, ModelFile, ModelSpec, load_manifest
from .store import FetchResult, ModelStatus, ModelStore, Problem

__all__ = [
    "CalibrationRecord",
    "FetchError",
    "FetchResult",
    "LogisticLLR",
    "Manifest",
    "ManifestError",
    "ModelError",
    "ModelFile",
    "ModelSpec",
    "ModelStatus",
    "ModelStore",
    "ModelUnavailableError",
    "OperatingPoint",
    "PavLLR",
    "Problem",
    "TrialCounts",
    "UnknownModelError",
    "load_manifest",
]
