"""Batches padded to power-of-two sizes (what the CUDA provider runs) give the unpadded results.

The padding path is forced on CPU sessions by marking the loaded model as running on CUDA: the
arithmetic is the same, only the batch the session sees differs.
"""

import dataclasses

import numpy as np
import pytest

from face_helpers import CPU, load_bgr
from services.common.inference import LoadedModel, pad_batch
from services.face.align import align_face
from services.face.arcface import ArcFaceEmbedder
from services.face.yunet import YuNetDetector


def as_cuda(model: LoadedModel) -> LoadedModel:
    return dataclasses.replace(model, provider="CUDAExecutionProvider")


@pytest.fixture(scope="module")
def images(verification_images):
    return [load_bgr(p) for p in verification_images[:5]]


def test_buckets_are_powers_of_two_on_cuda_and_plain_on_cpu(face_models):
    cpu = ArcFaceEmbedder(face_models["mobilefacenet-arcface-192d"], providers=CPU).model
    cuda = as_cuda(cpu)
    assert [cuda.bucket(n) for n in (1, 2, 3, 5, 8, 9, 33)] == [1, 2, 4, 8, 8, 16, 64]
    assert cuda.buckets(32) == [1, 2, 4, 8, 16, 32] and cuda.buckets(20) == [1, 2, 4, 8, 16, 32]
    assert [cpu.bucket(n) for n in (1, 3, 33)] == [1, 3, 33] and cpu.buckets(32) == [1]
    x = np.arange(6, dtype=np.float32).reshape(3, 2)
    assert pad_batch(x, 4).tolist() == [[0, 1], [2, 3], [4, 5], [0, 1]] and pad_batch(x, 3) is x


def test_padded_embedder_batch_equals_unpadded(face_models, yunet, images):
    emb = ArcFaceEmbedder(face_models["mobilefacenet-arcface-192d"], providers=CPU)
    crops = np.stack([align_face(im, yunet.detect(im)[0]) for im in images])  # 5 -> padded to 8
    plain = emb.embed(crops)
    emb.model = as_cuda(emb.model)
    np.testing.assert_allclose(emb.embed(crops), plain, atol=1e-5)


def test_padded_detector_batch_equals_unpadded(model_store, images):
    det = YuNetDetector(model_store.path("yunet-2023mar-batch"), providers=CPU)
    plain = det.detect_batch(images[:3])  # 3 -> padded to 4
    det.model = as_cuda(det.model)
    padded = det.detect_batch(images[:3])
    assert [len(f) for f in padded] == [len(f) for f in plain] and all(plain)
    for a, b in zip(plain, padded, strict=True):
        np.testing.assert_allclose([f.box for f in a], [f.box for f in b], atol=1e-3)
