"""An operator-supplied InsightFace pack: proven with a pack laid out from the SCRFD files and
MobileFaceNet (buffalo_l itself is not obtainable here)."""

import os

import numpy as np
import pytest

from face_helpers import CPU, load_bgr
from services.face.pack import load_pack
from services.face.pipeline import FacePipeline, FacePipelineConfig


@pytest.fixture(scope="module")
def pack_root(tmp_path_factory, face_models):
    root = tmp_path_factory.mktemp("insightface")
    pack = root / "models" / "testpack"
    pack.mkdir(parents=True)
    os.symlink(face_models["scrfd-500m"], pack / "det_500m.onnx")
    os.symlink(face_models["mobilefacenet-arcface-192d"], pack / "w600k_mbf.onnx")
    return root


def test_pack_is_read_with_insightface_conventions(pack_root):
    from insightface.app import FaceAnalysis

    pack = load_pack("testpack", root=pack_root)
    assert pack.detector.architecture == "scrfd" and str(pack.detector.path).endswith("det_500m.onnx")
    assert pack.recogniser is not None
    assert pack.recogniser.architecture == "arcface-onnx" and str(pack.recogniser.path).endswith("w600k_mbf.onnx")
    # the same pack loads in insightface's own FaceAnalysis, with the same roles and normalisation
    fa = FaceAnalysis(name="testpack", root=str(pack_root), providers=list(CPU))
    assert set(fa.models) == {"detection", "recognition"}
    assert fa.models["recognition"].input_mean == pack.recogniser.input_mean
    assert fa.models["recognition"].input_std == pack.recogniser.input_std
    assert load_pack(pack_root / "models" / "testpack").detector == pack.detector  # a directory works too


def test_missing_pack_or_detector(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_pack("nope", root=tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError):
        load_pack(tmp_path / "empty")


def test_pipeline_from_pack_verifies(pack_root, face_dir):
    pack = load_pack("testpack", root=pack_root)
    assert pack.recogniser is not None
    p = FacePipeline(FacePipelineConfig(detector=pack.detector, embedders=(pack.recogniser,), providers=CPU))
    try:
        name = pack.recogniser.name
        emb = {k: p.analyse((face_dir / rel).read_bytes()).embeddings[name] for k, rel in {
            "o1": "barack_obama/face_recognition_examples_obama.jpg",
            "o2": "barack_obama/face_recognition_examples_obama2.jpg",
            "b": "joe_biden/face_recognition_examples_knn_examples_train_biden_biden.jpg",
        }.items()}
        assert emb["o1"] @ emb["o2"] > max(emb["o1"] @ emb["b"], emb["o2"] @ emb["b"]) + 0.2
        # same embedding as insightface's own recogniser on the same aligned crop
        from insightface.app import FaceAnalysis

        from services.face.align import align_face

        fa = FaceAnalysis(name="testpack", root=str(pack_root), providers=list(CPU))
        img = load_bgr(face_dir / "barack_obama" / "face_recognition_examples_obama.jpg")
        face = max(p.detector.detect(img), key=lambda f: f.size)
        ours = p.embedders[name].embed(align_face(img, face)[None])[0]
        theirs = fa.models["recognition"].get_feat([align_face(img, face)])[0]
        assert np.dot(ours, theirs / np.linalg.norm(theirs)) > 0.9999
    finally:
        p.close()
