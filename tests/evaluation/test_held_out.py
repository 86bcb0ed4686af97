"""Held-out checks that travel with the calibration record: `biogate calibrate --check REPORT` writes
each point's check on people the calibration never saw, and ``CalibrationRecord.claim`` says what
a decision at that point can truthfully claim."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from evaluation_synthetic import build_world
from test_cli import parse, settings, synthetic_scorers  # noqa: F401 - fixtures

from services.common.models.calibration import CalibrationRecord, OperatingPointError
from services.common.models.store import ModelStore
from tests.conftest import present


def test_calibrate_with_a_held_out_check_and_the_claim_it_gives(settings, synthetic_scorers, tmp_path: Path):  # noqa: F811
    world = tmp_path / "world"
    build_world(world, n_ids=30, per_id=4, noise=0.9)
    common = ["--modality", "face", "--all-pairs", "MANIFEST.csv", "--fixtures", str(world)]
    args = parse(["eval", *common, "--people", "even", "--out", str(tmp_path / "fit")])
    assert args.func(settings, args) == 0
    args = parse(["calibrate", str(tmp_path / "fit" / "report.json"), "--target-fmr", "0.05", "0.01",
                  "--out", str(tmp_path / "record.json")])
    assert args.func(settings, args) == 0
    args = parse(["eval", *common, "--people", "odd", "--calibration", str(tmp_path / "record.json"), "--operating-rate", "0.01",
                  "--out", str(tmp_path / "check")])
    assert args.func(settings, args) == 0
    check = json.loads((tmp_path / "check" / "report.json").read_text())

    model_id = ModelStore(settings).manifest.models[0].id
    args = parse(["calibrate", str(tmp_path / "fit" / "report.json"), "--target-fmr", "0.05", "0.01",
                  "--check", str(tmp_path / "check" / "report.json"), "--model", model_id, "--channel", "synthetic"])
    assert args.func(settings, args) == 0
    record = ModelStore(settings).model(model_id).calibration["synthetic"]
    for measured in check["calibrated_points"]:
        point = present(record.point(measured["target_fmr"]))
        h = point.held_out
        assert h is not None and "odd positions" in h.dataset
        assert (h.trials.impostor, h.trials.genuine) == (measured["fmr"]["trials"], measured["fnmr"]["trials"])
        assert h.fmr == measured["fmr"]["rate"] and list(h.fmr_ci95) == measured["fmr"]["ci95"]
        assert h.consistent == (measured["fmr"]["ci95"][0] <= point.target_fmr)
        claim = record.claim(point.target_fmr)
        # The claim is the held-out measurement, not the target or the in-sample rate.
        assert (claim.source, claim.rate, claim.upper95) == ("held_out", h.fmr, h.fmr_ci95[1])
        assert claim.trials == h.trials.impostor and claim.consistent == h.consistent

    # Without a check the claim is the calibration's own measurement, bounded below by 3/N.
    bare = CalibrationRecord.model_validate(json.loads((tmp_path / "record.json").read_text()))
    c = bare.claim(0.01)
    p = present(bare.point(0.01))
    assert (c.source, c.rate, c.consistent) == ("calibration", p.fmr, None)
    assert c.upper95 == max(present(p.fmr), 3 / p.trials.impostor)
    with pytest.raises(OperatingPointError):
        bare.claim(0.2)

    # A check made at other thresholds checks another record: refused, nothing written.
    other = json.loads((tmp_path / "record.json").read_text())
    for q in other["operating_points"]:
        q["threshold"] += 0.01
    (tmp_path / "other.json").write_text(json.dumps(other))
    args = parse(["eval", *common, "--people", "odd", "--calibration", str(tmp_path / "other.json"), "--operating-rate", "0.01",
                  "--out", str(tmp_path / "check-other")])
    assert args.func(settings, args) == 0
    args = parse(["calibrate", "--check", str(tmp_path / "check-other" / "report.json"), "--model", model_id,
                  "--channel", "synthetic"])
    with pytest.raises(ValueError, match="checks another record"):
        args.func(settings, args)
    # Attached to the manifest's record afterwards, with no scores to fit: the thresholds stay, the
    # notes say what the new check showed.
    before = ModelStore(settings).model(model_id).calibration["synthetic"]
    args = parse(["calibrate", "--check", str(tmp_path / "check" / "report.json"), "--model", model_id,
                  "--channel", "synthetic", "--notes", "re-checked on other people"])
    assert args.func(settings, args) == 0
    after = ModelStore(settings).model(model_id).calibration["synthetic"]
    assert present(after.point(0.05)).held_out is not None and after.notes == "re-checked on other people" != before.notes
    assert [p.threshold for p in after.operating_points] == [p.threshold for p in before.operating_points]


def test_an_inconsistent_flag_is_refused():
    point: dict[str, Any] = {"target_fmr": 0.001, "threshold": 0.4, "fmr": 0.001, "fnmr": 0.1, "supported": True,
             "trials": {"genuine": 300, "impostor": 30000},
             "held_out": {"dataset": "other people", "trials": {"genuine": 300, "impostor": 24000}, "fmr": 0.0027,
                          "fmr_ci95": [0.0021, 0.0034], "fnmr": 0.11, "consistent": True}}
    record = {"dataset": "d", "trials": {"genuine": 300, "impostor": 30000}, "operating_points": [point],
              "date": "2026-12-04", "tool_version": "t"}
    with pytest.raises(ValueError, match="says otherwise"):
        CalibrationRecord.model_validate(record)
    point["held_out"]["consistent"] = False
    assert CalibrationRecord.model_validate(record).claim(0.001).rate == 0.0027


def test_services_ask_the_claim_through_their_calibrations():
    """The face and voice services hold a Calibrations reader: the claim of the shipped face
    record's default point is its held-out FMR, not the target."""
    from services.common.config import PROJECT_ROOT
    from services.face.config import FaceConfig
    from services.common.modality.calibration import Calibrations, NotCalibrated

    cal = Calibrations(PROJECT_ROOT / "models" / "manifest.yaml")
    target = FaceConfig().target_fmr
    claim = cal.claim("mobilefacenet-arcface-192d", "default", target, "cosine")
    point = present(cal.record("mobilefacenet-arcface-192d", "default").point(target))
    assert claim.source == "held_out" and claim.rate == present(point.held_out).fmr > target
    with pytest.raises(NotCalibrated):
        cal.claim("mobilefacenet-arcface-192d", "default", 0.123, "cosine")
