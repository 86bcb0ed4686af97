import os
import shutil
import subprocess

import numpy as np
import pytest
import soundfile as sf
import soxr

from services.common.config import PROJECT_ROOT
from services.settings import load_config
from services.voice.aasist import AasistDetector, read_config
from voice_audio import read

MODELS = {"aasist": ("AASIST.pth", "AASIST_config.json"), "aasist-l": ("AASIST-L.pth", "AASIST-L.conf")}


@pytest.fixture(scope="module", params=sorted(MODELS))
def detector(request, tmp_path_factory):
    from services.common.models import ModelStore

    settings = load_config(None, data_dir=str(tmp_path_factory.mktemp("aasist")),
                           models={"cache_dir": str(PROJECT_ROOT / "var" / "models")})
    store = ModelStore(settings)
    weights, conf = MODELS[request.param]
    try:
        store.fetch([request.param])
        return AasistDetector(store.path(request.param, weights), store.path(request.param, conf), max_windows=1)
    except Exception as err:  # noqa: BLE001 - no model: fail in CI, skip elsewhere
        (pytest.fail if os.environ.get("CI") else pytest.skip)(f"{request.param} is not available: {err}")


def espeak(text: str, tmp_path) -> np.ndarray:
    exe = shutil.which("espeak-ng")
    if exe is None:
        (pytest.fail if os.environ.get("CI") else pytest.skip)("espeak-ng is not installed")
    subprocess.run([exe, "-v", "en-us", "-w", str(tmp_path / "tts.wav"), text], check=True)
    x, rate = sf.read(tmp_path / "tts.wav", dtype="float32")
    return soxr.resample(x, rate, 16000).astype(np.float32)


def test_both_config_layouts_read():
    conf = read_config(PROJECT_ROOT.parent / "shared" / "models" / "voice" / "AASIST-L.conf")
    assert conf["architecture"] == "AASIST" and conf["gat_dims"] == [24, 32]


def test_windows_tile_short_and_cut_long(detector):
    w = detector.window
    assert detector.windows(np.ones(1000, np.float32)).shape == (1, w)
    assert detector.windows(np.ones(3 * w, np.float32)).shape == (1, w)  # max_windows=1


def test_espeak_speech_scores_below_genuine_speech(detector, voice_dir, tmp_path):
    genuine = [detector.score(read(voice_dir / d / f)) for d, f in
               (("speechbrain_spk1", "spk1_snt1.wav"), ("libri_3005", "3005-163389-0000.wav"))]
    synthetic = detector.score(espeak("Please verify my identity so that I can access my account.", tmp_path))
    assert all(np.isfinite(genuine)) and np.isfinite(synthetic)
    assert min(genuine) > synthetic + 3.0


def test_windows_of_two_lengths_score_as_they_would_alone(detector):
    """The service batches the wideband (3 s) and telephone (4.04 s) windows of concurrent requests
    together: each length runs its own pass, in the callers' order."""
    from services.voice.antispoof import SyntheticSpeechDetector

    rng = np.random.default_rng(0)
    windows = [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in (48000, detector.window, 48000)]
    det = SyntheticSpeechDetector(detector)
    together = det.score_windows(windows)
    alone = [det.score_windows([w])[0] for w in windows]
    assert together == pytest.approx(alone, abs=1e-3) and len(set(together)) == 3
