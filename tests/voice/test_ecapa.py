import hashlib

import numpy as np
import pytest

from services.voice.ecapa import EcapaOnnx, EcapaSpeechBrain, export_onnx
from voice_audio import read


def cosine(a, b):
    return float(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def onnx_model(voice_models):
    return EcapaOnnx(voice_models.ecapa_onnx)


@pytest.fixture(scope="module")
def reference(voice_models, tmp_path_factory):
    return EcapaSpeechBrain(voice_models.ecapa_dir, savedir=tmp_path_factory.mktemp("speechbrain"))


@pytest.fixture(scope="module")
def clips(voice_dir):
    a = read(voice_dir / "libri_1688" / "1688-142285-0000.wav")
    b = read(voice_dir / "speechbrain_spk2" / "spk2_snt1.wav")
    return [a[:48000], a[16000:16000 + 70000], b]  # 3 s, 4.4 s and a whole 2.9 s file


def test_served_embedding_equals_speechbrains_own(onnx_model, reference, clips):
    for x in clips:
        ours, theirs = onnx_model.embed(x), reference.embed(x)
        assert ours.shape == theirs.shape == (192,)
        # |values| go up to ~70; measured max difference 1.2e-4 (float32 reassociation in ORT)
        assert np.max(np.abs(ours - theirs)) < 1e-3
        assert cosine(ours, theirs) > 0.999999


def test_batches_of_unequal_length_equal_single_calls(onnx_model, clips):
    batch = onnx_model.embed_batch(clips + [clips[0]])
    for row, x in zip(batch, clips + [clips[0]], strict=True):
        assert np.allclose(row, onnx_model.embed(x), atol=1e-4)


def test_padded_batches_stay_close(voice_models, clips):
    padded = EcapaOnnx(voice_models.ecapa_onnx, max_pad_ratio=1.0)
    exact = EcapaOnnx(voice_models.ecapa_onnx)
    batch = padded.embed_batch(clips)
    for row, x in zip(batch, clips, strict=True):
        assert cosine(row, exact.embed(x)) > 0.995


def test_same_speaker_scores_above_different_speaker(onnx_model, voice_dir):
    a1 = onnx_model.embed(read(voice_dir / "libri_1688" / "1688-142285-0000.wav")[:48000])
    a2 = onnx_model.embed(read(voice_dir / "libri_1688" / "1688-142285-0005.wav")[:48000])
    b = onnx_model.embed(read(voice_dir / "libri_3005" / "3005-163389-0000.wav")[:48000])
    same, different = cosine(a1, a2), cosine(a1, b)  # measured 0.50 and about 0.0
    assert same > 0.35 > different  # the EER threshold on 3 s crops is about 0.29
    assert same - different > 0.3


def test_export_is_deterministic(voice_models, tmp_path):
    out = export_onnx(voice_models.ecapa_dir, tmp_path / "again.onnx")
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    assert digest(out) == digest(voice_models.ecapa_onnx)


def test_refuses_an_onnx_file_of_another_model(voice_models):
    with pytest.raises(ValueError, match="not an ECAPA export"):
        EcapaOnnx(voice_models.vad)
