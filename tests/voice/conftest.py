"""Voice fixtures: the real models from the model cache (fetched on first use) and the fixtures."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from services.common.config import PROJECT_ROOT, load_config

# The tests import their audio helpers (voice_audio.py) by module name, whatever the import mode.
if str(Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def voice_dir(fixtures_dir: Path) -> Path:
    return fixtures_dir / "voice" / "verification"


@pytest.fixture(scope="session")
def voice_models(tmp_path_factory):
    from services.common.models import ModelStore, ModelUnavailableError
    from services.voice.models import ECAPA_ID, VAD_ID, resolve

    settings = load_config(None, data_dir=str(tmp_path_factory.mktemp("voice-data")),
                           models={"cache_dir": str(PROJECT_ROOT / "var" / "models")})
    store = ModelStore(settings)
    try:
        return resolve(store)
    except ModelUnavailableError:
        pass
    try:
        store.fetch([VAD_ID, ECAPA_ID])
        return resolve(store)
    except Exception as err:  # noqa: BLE001 - no models: fail in CI, skip elsewhere
        (pytest.fail if os.environ.get("CI") else pytest.skip)(f"the voice models are not available: {err}")


@pytest.fixture(scope="session")
def pipeline(voice_models):
    from services.voice.pipeline import VoicePipeline, VoicePipelineConfig

    return VoicePipeline(VoicePipelineConfig(vad_model=voice_models.vad, ecapa_model=voice_models.ecapa_onnx,
                                             providers=("CPUExecutionProvider",)))
