"""Voice fixtures: the real models from the model cache (fetched on first use) and the fixtures."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from services.common.config import PROJECT_ROOT
from services.settings import load_config

# The tests import their audio helpers (voice_audio.py) by module name, whatever the import mode.
if str(Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def voice_dir(fixtures_dir: Path) -> Path:
    return fixtures_dir / "voice" / "verification"


@pytest.fixture(scope="session")
def voice_models(tmp_path_factory):
    from services.common.models import ModelStore, ModelUnavailableError
    from services.voice.models import VoiceModels, model_files

    settings = load_config(None, data_dir=str(tmp_path_factory.mktemp("voice-data")),
                           models={"cache_dir": str(PROJECT_ROOT / "var" / "models")})
    store = ModelStore(settings)
    try:
        return model_files(store)
    except ModelUnavailableError:
        pass
    try:
        chosen = VoiceModels.choose(store.manifest, settings.voice)
        store.fetch([chosen.vad.id, chosen.embedder.id])
        return model_files(store)
    except Exception as err:  # noqa: BLE001 - no models: fail in CI, skip elsewhere
        (pytest.fail if os.environ.get("CI") else pytest.skip)(f"the voice models are not available: {err}")


@pytest.fixture(scope="session")
def pipeline(voice_models):
    from services.voice.ecapa import EcapaOnnx
    from services.voice.pipeline import VoicePipeline, VoicePipelineConfig
    from services.voice.vad import SileroVad

    return VoicePipeline(VoicePipelineConfig(providers=("CPUExecutionProvider",)), SileroVad(voice_models.vad),
                         EcapaOnnx(voice_models.ecapa_onnx))


class VoiceServiceUnderTest:
    """The voice service of the tests: settings, a stub with every role, its runtime."""

    def __init__(self, harness, server) -> None:
        from services.common.api.v1 import voice_pb2_grpc

        self.harness, self.server, self.settings = harness, server, harness.settings
        self.address = server.address
        self.channel = harness.channel("voice", "dev-all")
        self.stub = voice_pb2_grpc.VoiceServiceStub(self.channel)
        self.servicer = server.definition.service

    @property
    def rt(self):
        return self.servicer.rt

    @property
    def engine(self):
        return self.servicer.engine

    def consent(self, tenant: str, subject: str) -> None:
        from services.common.storage import ConsentRecord

        self.rt.storage.subjects.record_consent(
            ConsentRecord(tenant, subject, "biometric_verification", ("voice",), "v1", "test"))


def own_voice_service(tmp_path_factory, name: str, server: dict | None = None, voice: dict | None = None):
    """A voice service of a test module's own (a generator for a module fixture): ``server`` and
    ``voice`` settings over make_settings', enrolment from 1 s of net speech."""
    from tests.conftest import ServiceHarness, make_settings

    settings = make_settings(tmp_path_factory.mktemp(name) / "data", server=server or {}, voice={
        "min_net_speech_enroll_s": 1.0, "min_total_net_speech_enroll_s": 1.0, **(voice or {})})
    harness = ServiceHarness(settings)
    server_ = harness.start("voice")
    yield VoiceServiceUnderTest(harness, server_)
    harness.stop()


def audited_verifications(svc) -> list[dict]:
    """The details of the service's voice.verified audit records, oldest first."""
    import json

    from services.common.storage import open_storage

    store = open_storage(svc.settings.storage_dsn)
    try:
        return [json.loads(a.details) for a in store.audit.iter_records() if a.event_type == "voice.verified"]
    finally:
        store.close()


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The local Redis (every machine of the project has one); required in CI."""
    from tests.conftest import require_redis

    return require_redis("redis://127.0.0.1:6379/0")


@pytest.fixture(scope="session")
def voice_service(tmp_path_factory, voice_models, fixtures_dir, redis_url):
    """One VoiceService for the session: its own manifest copy (tests change calibrations), Redis
    replay store under a prefix of its own (deleted afterwards), tenants without the AASIST layer
    for the evaluation ("eval") and for synthetic-voice digit tests ("tts"). The digit challenge
    is required by default; the text-independent tests (genuine speech, evaluation, layers, bad
    inputs) run on tenants with the requirement off ("bank-a", "bank-consent", "eval", "tts"), and
    "bank-strict" keeps the default."""
    import shutil
    import uuid

    import redis

    from tests.conftest import ServiceHarness, make_settings

    root = tmp_path_factory.mktemp("voice-service")
    manifest = root / "manifest.yaml"
    shutil.copy(PROJECT_ROOT / "models" / "manifest.yaml", manifest)
    prefix = f"biogate-test:{uuid.uuid4().hex[:10]}"
    settings = make_settings(root / "data", models={"manifest": str(manifest)}, voice={
        "calibration_check_s": 0.0, "replay_store": redis_url, "replay_key_prefix": prefix,
        # Enrolment from one recording of any length, as the trial lists do (and as the local
        # evaluation): the verify minimum of net speech (the default asks 2 s each, 4 s in all).
        "min_net_speech_enroll_s": 1.0, "min_total_net_speech_enroll_s": 1.0,
        "tenants": {"eval": {"synthetic_speech_check": False, "require_challenge": False},
                    # the parity test's own: its accepted probes must not be replays for the service eval
                    "eval-parity": {"synthetic_speech_check": False, "require_challenge": False},
                    "tts": {"synthetic_speech_check": False, "require_challenge": False},
                    "bank-a": {"require_challenge": False}, "bank-consent": {"require_challenge": False}}})
    harness = ServiceHarness(settings)
    server = harness.start("voice")
    yield VoiceServiceUnderTest(harness, server)
    harness.stop()
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(f"{prefix}:*"))
    if keys:
        client.delete(*keys)
