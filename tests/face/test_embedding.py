import numpy as np
import pytest

from face_helpers import CPU, load_bgr
from services.face.align import align_face, align_faces
from services.face.arcface import ArcFaceEmbedder
from services.face.embedding import to_rgb_nchw
from services.face.sface import SFaceEmbedder


@pytest.fixture(scope="module")
def embedders(face_models):
    return {
        "sface": SFaceEmbedder(face_models["sface-2021dec-batch"], providers=CPU),
        "mbf": ArcFaceEmbedder(face_models["mobilefacenet-arcface-192d"], providers=CPU),
    }


@pytest.fixture(scope="module")
def crops(yunet, face_dir):
    names = {
        "obama1": "barack_obama/face_recognition_examples_obama.jpg",
        "obama2": "barack_obama/face_recognition_examples_obama2.jpg",
        "biden": "joe_biden/face_recognition_examples_knn_examples_train_biden_biden.jpg",
        "penny1": "bbt_penny/faceapi_penny1.png",
        "penny2": "bbt_penny/faceapi_penny2.png",
        "amy1": "bbt_amy/faceapi_amy1.png",
    }
    out = {}
    for k, rel in names.items():
        img = load_bgr(face_dir / rel)
        out[k] = align_face(img, max(yunet.detect(img), key=lambda f: f.size))
    return out


@pytest.mark.parametrize("name,dim", [("sface", 128), ("mbf", 192)])
def test_embeddings_are_l2_normalised_float32(embedders, crops, name, dim):
    e = embedders[name].embed(np.stack(list(crops.values())))
    assert e.dtype == np.float32 and e.shape == (len(crops), dim)
    assert np.allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("name", ["sface", "mbf"])
def test_genuine_pairs_score_above_impostor_pairs(embedders, crops, name):
    e = dict(zip(crops, embedders[name].embed(np.stack(list(crops.values()))), strict=True))
    genuine = [e["obama1"] @ e["obama2"], e["penny1"] @ e["penny2"]]
    impostor = [e["obama1"] @ e["biden"], e["obama2"] @ e["biden"], e["penny1"] @ e["amy1"], e["penny2"] @ e["amy1"]]
    assert min(genuine) > max(impostor) + 0.05, (genuine, impostor)


@pytest.mark.parametrize("name", ["sface", "mbf"])
def test_batch_equals_one_by_one(embedders, crops, name):
    batch = np.stack(list(crops.values()))
    together = embedders[name].embed(batch)
    alone = np.vstack([embedders[name].embed(c[None]) for c in batch])
    assert np.abs(together - alone).max() < 1e-4
    assert embedders[name].embed(batch[:0]).shape == (0, together.shape[1])


def test_batchable_sface_matches_the_published_file(face_models, crops, embedders):
    published = SFaceEmbedder(face_models["sface-2021dec"], providers=CPU)
    assert published.max_batch == 1 and embedders["sface"].max_batch > 1
    batch = np.stack(list(crops.values()))
    assert np.abs(published.embed(batch) - embedders["sface"].embed(batch)).max() < 1e-5


def test_align_faces_batch(yunet, face_dir):
    img = load_bgr(face_dir / "bbt_penny" / "faceapi_penny1.png")
    faces = yunet.detect(img)
    batch = align_faces(img, faces)
    assert batch.shape == (len(faces), 112, 112, 3) and batch.dtype == np.uint8
    assert align_faces(img, []).shape == (0, 112, 112, 3)


def test_wrong_input_shape_refused(embedders):
    with pytest.raises(ValueError):
        embedders["mbf"].embed(np.zeros((112, 112, 3), np.uint8))


@pytest.mark.parametrize("mean,std", [(127.5, 128.0), (127.5, 127.5), (0.0, 1.0)])
def test_blob_is_the_normalised_rgb_planes(mean, std):
    batch = np.random.default_rng(3).integers(0, 256, (3, 112, 112, 3), dtype=np.uint8)
    expected = (batch[..., ::-1].transpose(0, 3, 1, 2).astype(np.float32) - np.float32(mean)) / np.float32(std)
    blob = to_rgb_nchw(batch, mean, std)
    assert blob.dtype == np.float32 and blob.flags.c_contiguous and blob.shape == (3, 3, 112, 112)
    assert np.array_equal(blob, expected)
    red = (batch[..., 2].astype(np.float32) - np.float32(mean)) / np.float32(std)
    assert np.array_equal(blob[:, 0], red)  # BGR in, RGB planes out
