"""The kit face and voice share (services/common/modality): the reason catalogue against the code of
both services, the template formats and their sealing, the calibration reader, the model routers
at start-up, and the readiness gate over gRPC."""

from __future__ import annotations

import ast
import re
import shutil
import struct
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest

from services.common.audit import AuditDataError
from services.common.api.v1 import common_pb2, face_pb2, face_pb2_grpc, voice_pb2, voice_pb2_grpc
from services.common.config import PROJECT_ROOT
from services.common.context import SYSTEM
from services.common.crypto import TemplateBinding
from services.common.errors import ServiceError, details_of
from services.common.modality import reasons
from services.common.modality.calibration import Calibrations, NotCalibrated, not_calibrated
from services.common.modality.templates import TemplateFormatError, Templates, pack, unpack
from services.common.modality.zoo import ModelChoiceError
from services.common.models import ModelStore
from services.common.runtime import Runtime
from services.common.storage import ConsentRecord, TemplateRecord
from services.face.challenge import BETWEEN, MOVES, NEUTRAL
from services.voice.ingest import Encoding
from tests.conftest import ServiceHarness, make_settings

SCANNED = ("services/face", "services/voice", "services/common/modality", "services/common/models/calibration.py")
CODE = re.compile(r"^[A-Z][A-Z0-9]+(_[A-Z0-9]+)*$")  # two characters at least
# Upper-case literals of the scanned code that are not reason codes: formats and their subtypes,
# head moves and pose labels, environment variables, a log level.
NOT_REASONS = ({e.value for e in Encoding} | set(MOVES) | {NEUTRAL, BETWEEN} | {
    "ULAW", "PCM_S8", "PCM_U8", "PCM_16", "PCM_24", "PCM_32", "FLOAT", "DOUBLE", "HQ",  # soundfile / soxr
    "JPEG", "PNG", "WEBP", "RGB", "RGBA", "LA", "PA",  # Pillow image formats and modes
    "HF_HUB_OFFLINE", "BIOGATE_EVAL_MFA_TARGET", "BIOGATE_EVAL_TOKEN", "FATAL",
    "FMR", "APCER"})  # the error rate a calibration record names


def _files(place: str) -> list[Path]:
    path = PROJECT_ROOT / place
    return [path] if path.is_file() else sorted(path.rglob("*.py"))


def _literals() -> dict[str, set[str]]:
    """Every upper-case string literal of the scanned packages (but the catalogue) -> its files."""
    found: dict[str, set[str]] = {}
    for folder in SCANNED:
        for path in _files(folder):
            if path == PROJECT_ROOT / "services/common/modality/reasons.py":
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Constant) and isinstance(node.value, str) and CODE.match(node.value):
                    found.setdefault(node.value, set()).add(str(path.relative_to(PROJECT_ROOT)))
    return found


def test_the_catalogue_holds_every_code_face_voice_and_the_kit_use_and_nothing_else():
    found = _literals()
    unknown = {code: sorted(files) for code, files in found.items() if code not in reasons.CATALOGUE
               and code not in NOT_REASONS}
    assert not unknown, f"reason codes missing from services/common/modality/reasons.py: {unknown}"
    unused = sorted(set(reasons.CATALOGUE) - set(found))
    assert not unused, f"catalogue entries no service uses: {unused}"
    for code, e in reasons.CATALOGUE.items():
        assert e.message.strip() and e.status in (None, *grpc.StatusCode), code


def test_refusals_and_reasons_are_drawn_from_the_catalogue_only():
    """No status or reason is built by hand in face, voice or the kit: the catalogue decides both."""
    hand_built = []
    for folder in SCANNED:
        for path in _files(folder):
            if path.name == "reasons.py":
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "ServiceError":
                    hand_built.append(f"{path.relative_to(PROJECT_ROOT)}:{node.lineno}")
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                    owner = node.func.value
                    if isinstance(owner, ast.Name) and (owner.id == "errors" or (owner.id == "common_pb2"
                                                                                 and node.func.attr == "Reason")):
                        hand_built.append(f"{path.relative_to(PROJECT_ROOT)}:{node.lineno}")
    assert not hand_built
    err = reasons.refusal("NOT_ENROLLED")
    assert (err.code, err.reason, err.message) == (grpc.StatusCode.NOT_FOUND, "NOT_ENROLLED", reasons.message("NOT_ENROLLED"))
    with pytest.raises(ValueError):
        reasons.refusal("NO_MATCH")  # explains an answer, never refuses
    with pytest.raises(KeyError, match="not in the catalogue"):
        reasons.reason("NOT_A_CODE")


# ---------------------------------------------------------------- templates
@pytest.fixture
def rt(tmp_path):
    runtime = Runtime.open(make_settings(tmp_path / "data"))
    yield runtime
    runtime.close()


def test_template_format_carries_modality_model_and_dimension():
    v = np.random.default_rng(1).normal(size=192).astype(np.float32)
    data = pack("voice", "ecapa-voxceleb", v)
    assert data[:4] == b"BGT1" and b"ecapa-voxceleb" in data and len(data) == 8 + 5 + 14 + 4 * 192
    assert np.array_equal(unpack(data, "voice", "ecapa-voxceleb"), v)
    for modality, model in (("face", "ecapa-voxceleb"), ("voice", "other-model")):
        with pytest.raises(TemplateFormatError):
            unpack(data, modality, model)
    with pytest.raises(TemplateFormatError):
        unpack(data[:-4], "voice", "ecapa-voxceleb")


def test_templates_of_both_old_formats_still_open(rt):
    """Databases in the field hold face BGF1 and voice BGV1 templates: read old, write new."""
    face, voice = Templates(rt, "face"), Templates(rt, "voice")
    v = np.random.default_rng(2).normal(size=128).astype(np.float32)
    old_face = b"BGF1" + struct.pack("<H", v.size) + v.astype("<f4").tobytes()
    old_voice = b"BGV1" + v.astype("<f4").tobytes()
    for templates, channel, plain in ((face, "", old_face), (voice, "telephone", old_voice)):
        binding = TemplateBinding("t", "s", templates.modality, "m", channel)
        envelope = rt.crypto.encrypt_template(binding, plain)
        rec = TemplateRecord("t", "s", templates.modality, "m", channel, envelope, "k", 1)
        assert np.array_equal(templates.vault.open(rec), v)
    # An old voice template is not a face template, whatever the envelope says.
    with pytest.raises(TemplateFormatError):
        unpack(old_voice, "face", "m")


def test_a_sealed_template_opens_only_for_its_subject_model_and_channel(rt):
    vault = Templates(rt, "voice").vault
    v = np.ones(4, np.float32) / 2
    envelope, key_id = vault.seal("t", "s", "m", v, "wideband")
    assert np.array_equal(vault.open(TemplateRecord("t", "s", "voice", "m", "wideband", envelope, key_id, 1)), v)
    for rec in (TemplateRecord("t", "s2", "voice", "m", "wideband", envelope, key_id, 1),
                TemplateRecord("t", "s", "voice", "m", "telephone", envelope, key_id, 1),
                TemplateRecord("t", "s", "voice", "m2", "wideband", envelope, key_id, 1)):
        with pytest.raises(Exception) as info:
            vault.open(rec)
        assert not isinstance(info.value, TemplateFormatError)  # the envelope itself refuses


def _refused(fn) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(ServiceError) as info:
        fn()
    return info.value.code, info.value.reason


def test_one_lookup_and_one_enrolment_path(rt):
    t = Templates(rt, "voice")
    v = np.ones(4, np.float32) / 2
    assert _refused(lambda: t.for_verification("t", "s", "m", "wideband")) == (grpc.StatusCode.NOT_FOUND, "NOT_ENROLLED")
    stored, new = t.enrol("t", "s", "m", v, channel="wideband", samples=1, quality={}, replace=False, details={}, caller=SYSTEM)
    assert new and stored.model_id == "m"
    assert _refused(lambda: t.for_verification("t", "s", "m", "wideband")) == (grpc.StatusCode.FAILED_PRECONDITION,
                                                                               "NO_CONSENT")
    rt.storage.subjects.record_consent(ConsentRecord("t", "s", "biometric_verification", ("voice",), "v1"))
    assert np.array_equal(t.for_verification("t", "s", "m", "wideband"), v)
    assert _refused(lambda: t.for_verification("t", "s", "m2", "wideband")) == (grpc.StatusCode.FAILED_PRECONDITION,
                                                                                "TEMPLATE_MODEL_INACTIVE")
    assert _refused(lambda: t.for_verification("t", "s", "m2", "telephone"))[1] == "NOT_ENROLLED"
    events = len(list(rt.storage.audit.iter_records()))
    assert _refused(lambda: t.enrol("t", "s", "m", v, channel="wideband", samples=1, quality={}, replace=False,
                                    details={}, caller=SYSTEM)) == (grpc.StatusCode.ALREADY_EXISTS, "ALREADY_ENROLLED")
    _, new = t.enrol("t", "s", "m", v, channel="wideband", samples=2, quality={}, replace=True, details={}, caller=SYSTEM)
    assert not new and len(list(rt.storage.audit.iter_records())) == events + 1
    # The template and its audit record commit together: a refused audit record stores nothing.
    with pytest.raises(AuditDataError):
        t.enrol("t", "s3", "m", v, channel="wideband", samples=1, quality={}, replace=False,
                details={"note": "+8613812345678"}, caller=SYSTEM)
    assert not rt.storage.templates.list_for_subject("t", "s3")


# ---------------------------------------------------------------- calibration
@pytest.fixture
def manifest_copy(tmp_path) -> tuple[Path, ModelStore]:
    path = tmp_path / "manifest.yaml"
    shutil.copy(PROJECT_ROOT / "models" / "manifest.yaml", path)
    return path, ModelStore(make_settings(tmp_path / "data", models={"manifest": str(path)}))


def test_calibration_reader_follows_the_file_and_claims_no_evidence_without_an_llr_map(manifest_copy):
    path, store = manifest_copy
    cal = Calibrations(path, check_s=0.0)
    model = "mobilefacenet-arcface-192d"
    record = store.calibration(model, "default")
    assert cal.threshold(model, "default", 1e-3, "cosine") == pytest.approx(record.threshold(1e-3))
    assert cal.llr(model, "default", 0.5, "cosine") == pytest.approx(float(record.llr.llr(0.5)))
    store.update_calibration(model, "default", record.model_copy(update={"llr": None}))
    assert cal.llr(model, "default", 0.5, "cosine") is None
    # no such operating point: the record's own reason is passed on
    assert _refused(lambda: cal.threshold(model, "default", 0.2)) == (grpc.StatusCode.FAILED_PRECONDITION,
                                                                     "OPERATING_POINT_MISSING")
    for call in (lambda: cal.threshold(model, "default", 1e-3, "asnorm50:0123"),  # another score
                 lambda: cal.threshold(model, "telephony-8k", 1e-3)):  # no record for the channel
        assert _refused(call) == (grpc.StatusCode.FAILED_PRECONDITION, "MODEL_NOT_CALIBRATED")
    with pytest.raises(LookupError):  # and still a LookupError, for callers that fall back
        cal.threshold(model, "default", 0.2)


def test_a_threshold_looked_up_again_follows_a_recalibration(manifest_copy):
    """Thresholds and claims are remembered per loaded manifest: a `biogate calibrate` that moves a
    point must move the next decision, not one after a restart."""
    path, store = manifest_copy
    cal = Calibrations(path, check_s=0.0)
    model = "mobilefacenet-arcface-192d"
    record = store.calibration(model, "default")
    before = cal.threshold(model, "default", 1e-3, "cosine"), cal.measured(model, "default", 1e-3, "cosine")
    assert before == (cal.threshold(model, "default", 1e-3, "cosine"), cal.measured(model, "default", 1e-3, "cosine"))
    moved = [p.model_copy(update={"threshold": p.threshold + 0.01}) if p.target_fmr == 1e-3 else p
             for p in record.operating_points]
    store.update_calibration(model, "default", record.model_copy(update={"operating_points": moved}))
    assert cal.threshold(model, "default", 1e-3, "cosine") == pytest.approx(before[0] + 0.01)
    store.update_calibration(model, "default", None)  # and a removed record refuses at once
    assert _refused(lambda: cal.threshold(model, "default", 1e-3, "cosine")) == (
        grpc.StatusCode.FAILED_PRECONDITION, "MODEL_NOT_CALIBRATED")


def test_a_records_own_refusal_passes_on_with_its_reason_and_message():
    class Unsupported(LookupError):
        reason = "OPERATING_POINT_UNSUPPORTED"

    err = not_calibrated(Unsupported("m [default]: FMR 1e-4 needs 30,000 impostor trials, 1,791 scored"), "m", "default")
    assert isinstance(err, NotCalibrated) and err.code == grpc.StatusCode.FAILED_PRECONDITION
    assert (err.reason, err.message) == ("OPERATING_POINT_UNSUPPORTED",
                                         "m [default]: FMR 1e-4 needs 30,000 impostor trials, 1,791 scored")
    plain = not_calibrated(KeyError("no operating point for target FMR 0.2"), "m", "default")
    assert (plain.reason, plain.message) == ("MODEL_NOT_CALIBRATED", "m [default]: no operating point for target FMR 0.2")


# ---------------------------------------------------------------- the configuration chooses models that exist
@pytest.mark.parametrize("section, key, model_id, why", [
    ("face", "embedder", "no-such-model", "is not in the model manifest"),
    ("face", "embedder", "yunet-2023mar", "is a face_detector model, not a face_embedder"),
    ("face", "detector", "sface-2021dec-batch", "is a face_embedder model, not a face_detector"),
    ("face", "liveness", ["minifasnet-v2-2.7", "silero-vad-v6"], "is a vad model, not a face_liveness"),
    ("voice", "embedder", "silero-vad-v6", "is a vad model, not a speaker_embedder"),
    ("voice", "vad", "ecapa-voxceleb", "is a speaker_embedder model, not a vad"),
    ("voice", "antispoof", "aasist-xl", "is not in the model manifest"),
    ("voice", "replay", "silero-vad-v6", "is a vad model, not a voice_replay"),
])
def test_a_wrong_model_id_fails_start_up_naming_the_setting_and_the_id(tmp_path, section, key, model_id, why):
    from services.serve import definition

    settings = make_settings(tmp_path / "data", **{section: {key: model_id}})
    bad = model_id[-1] if isinstance(model_id, list) else model_id
    with pytest.raises(ModelChoiceError, match=re.escape(f"{section}.{key}: {bad!r} {why}")):
        definition(settings, section)


def test_a_replay_entry_of_another_fingerprint_version_fails_start_up():
    """The manifest's replay entry holds the threshold of one fingerprint format: a record for another
    version (a manifest copied from another release) is refused rather than applied to other numbers."""
    from services.common.models.manifest import load_manifest
    from services.voice.config import VoiceConfig
    from services.voice.models import VoiceModels

    manifest = load_manifest(PROJECT_ROOT / "models" / "manifest.yaml")
    entry = manifest.model("replay-envelope-v1")
    other = manifest.model_copy(update={"models": [m.model_copy(update={"version": "2"}) if m is entry else m
                                                   for m in manifest.models]})
    assert VoiceModels.choose(manifest, VoiceConfig()).replay.id == "replay-envelope-v1"
    with pytest.raises(ModelChoiceError, match=re.escape("voice.replay: 'replay-envelope-v1' is version '2' of the "
                                                         "fingerprint; this service computes version 1")):
        VoiceModels.choose(other, VoiceConfig())


def test_every_rpc_of_a_service_is_mapped_onto_its_service_object():
    from services.common.modality.serving import method_name, servicer
    from services.face.service import FaceService
    from services.voice.service import VoiceService

    assert method_name("StartLivenessChallenge") == "start_liveness_challenge" and method_name("Verify") == "verify"
    for service, cls in (("FaceService", FaceService), ("VoiceService", VoiceService)):
        pb2 = face_pb2 if service == "FaceService" else voice_pb2
        for m in pb2.DESCRIPTOR.services_by_name[service].methods:
            assert callable(getattr(cls, method_name(m.name), None)), (service, m.name)

    class Partial:
        def verify(self, request):
            return request

    with pytest.raises(ValueError, match="Identify"):
        servicer(face_pb2_grpc.FaceServiceServicer, face_pb2.DESCRIPTOR.services_by_name["FaceService"], Partial())

    # Every method takes the RPC's principal: one that could not be handed it is refused at wiring.
    class Blind(FaceService):
        def identify(self, req):  # type: ignore[override]
            return req

    with pytest.raises(ValueError, match=r"\['Identify'\].*caller"):
        servicer(face_pb2_grpc.FaceServiceServicer, face_pb2.DESCRIPTOR.services_by_name["FaceService"],
                 Blind.__new__(Blind))


# ---------------------------------------------------------------- readiness, over gRPC
def test_both_services_answer_models_loading_until_warm(tmp_path, fixtures_dir):
    """Services whose warm-up has not finished refuse every model-using RPC with one status."""
    from services.common.server.bootstrap import RunningServer
    from services.serve import definition, prepare

    settings = make_settings(tmp_path / "data", voice={"replay_store": "memory"})
    prepare(settings)
    harness = ServiceHarness(settings)
    release = threading.Event()
    try:
        for name in ("face", "voice"):
            d = definition(settings, name)
            d.warm_up = release.wait  # type: ignore[assignment]  # the models never load during this test
            harness.running[name] = RunningServer(settings, d, port=0).start()
        face = face_pb2_grpc.FaceServiceStub(harness.channel("face"))
        voice = voice_pb2_grpc.VoiceServiceStub(harness.channel("voice"))
        subject = common_pb2.SubjectRef(tenant_id="bank-r", subject_id="cust-r")
        image = common_pb2.Image(data=(fixtures_dir / "face/verification/barack_obama/face_recognition_examples_obama.jpg")
                                 .read_bytes())
        wav = common_pb2.Audio(data=next((fixtures_dir / "voice/verification/libri_1688").glob("*.wav")).read_bytes())
        calls = [
            lambda: face.Verify(face_pb2.VerifyFaceRequest(subject=subject, image=image)),
            lambda: face.Enroll(face_pb2.EnrollFaceRequest(subject=subject, images=[image])),
            lambda: voice.Verify(voice_pb2.VerifyVoiceRequest(subject=subject, audio=wav, challenge_nonce="n-1")),
            lambda: voice.Enroll(voice_pb2.EnrollVoiceRequest(subject=subject, utterances=[wav])),
        ]
        for call in calls:
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert (info.value.code(), details_of(info.value)["reason"]) == (grpc.StatusCode.UNAVAILABLE, "MODELS_LOADING")
            assert "still loading" in (info.value.details() or "")
    finally:
        harness.stop()
        release.set()
