"""The shipped face record (mobilefacenet-arcface-192d [default]) and its held-out check on the 118
identities of fixtures/face/identities: the people-disjoint split, the record's support, and the
check figures reproduced on a subset of the held-out people with the real face pipeline (the full
run is `python -m bench.face_identities`, about 3 minutes)."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest

from services.common.config import PROJECT_ROOT
from services.commands import evaluation as cli
from services.common.evaluation.trials import all_pairs, read_people, split_people
from services.common.models import load_manifest
from services.common.models.calibration import llr_caps
from tests.conftest import present

pytestmark = pytest.mark.eval  # evaluation-grade: a whole fixture list through the models

MODEL = "mobilefacenet-arcface-192d"
# bench/face_identities.py, step 6: the first 16 held-out people (odd positions of the sorted names),
# 64 photos, at the manifest record's thresholds: target -> (false matches, impostor pairs scored,
# false non-matches incl. failures, genuine pairs).
SUBSET_COUNTS = {0.01: (16, 1920, 0, 96), 0.001: (4, 1920, 2, 96), 0.0003: (1, 1920, 4, 96), 0.0001: (1, 1920, 6, 96)}


@pytest.fixture(scope="module")
def people(fixtures_dir: Path):
    return read_people(fixtures_dir / "face" / "identities" / "SOURCES.csv", "face")


def test_the_split_is_people_disjoint_and_fixed_by_name(people):
    assert len(people) == 472 and len({e.identity for e in people}) == 118
    even, odd = split_people(people, "even"), split_people(people, "odd")
    names = sorted({e.identity for e in people})
    assert {e.identity for e in even} == set(names[0::2]) and {e.identity for e in odd} == set(names[1::2])
    assert len(even) + len(odd) == len(people) and not {e.identity for e in even} & {e.identity for e in odd}
    for part in (even, odd):
        trials = all_pairs(part, "face")
        assert (len(trials), sum(t.target for t in trials)) == (27730, 354)  # C(236, 2); 59 x C(4, 2)


def test_the_manifest_record_is_supported_at_1e3_and_names_its_data_and_check():
    record = load_manifest(PROJECT_ROOT / "models" / "manifest.yaml").model(MODEL).calibration["default"]
    assert "fixtures/face/identities" in record.dataset and "even positions" in record.dataset
    p2, p3, p4 = (present(record.point(t)) for t in (1e-2, 1e-3, 1e-4))
    assert p3.supported and p3.trials.impostor >= 3000 and p2.supported
    assert p4.supported == (p4.trials.impostor >= 30000)
    assert not p4.supported and "needs >= 30,000 impostor trials" in present(p4.why)
    assert record.trials.impostor == p3.trials.impostor  # every point measured on all scored impostor pairs
    assert "odd positions" in record.notes and "Held-out check" in record.notes
    assert "1e-3: FMR " in record.notes and "95 % CI" in record.notes
    # Every point carries its held-out check, and a decision there claims the held-out FMR.
    for p in record.operating_points:
        h = p.held_out
        assert h is not None and "odd positions" in h.dataset and h.trials.impostor > 20000
        assert record.claim(p.target_fmr).rate == h.fmr and record.claim(p.target_fmr).source == "held_out"
    # The service's default point is the one whose held-out FMR reaches down to 1e-3 (3e-4).
    from services.face.config import FaceConfig

    default = present(record.point(FaceConfig().target_fmr))
    assert default.supported and present(default.held_out).fmr_ci95[0] <= 1e-3
    lo, hi = llr_caps(record.trials.genuine, record.trials.impostor)
    assert record.llr is not None and present(record.llr.max_llr) <= hi and present(record.llr.min_llr) >= lo


def test_the_held_out_check_reproduces_on_a_subset(tmp_path: Path, fixtures_dir: Path):
    from bench.face_identities import subset_list
    from tests.conftest import make_settings

    manifest = tmp_path / "manifest.yaml"
    shutil.copy(PROJECT_ROOT / "models" / "manifest.yaml", manifest)
    settings = make_settings(tmp_path / "data", models={"manifest": str(manifest)})
    listed = subset_list(tmp_path / "people.csv", fixtures_dir)
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "eval"
    args = parser.parse_args(["eval", "--modality", "face", "--all-pairs", str(listed), "--fixtures", str(fixtures_dir),
                              "--model", MODEL, "--channel", "default", "--out", str(out)])
    assert args.func(settings, args) == 0
    report = json.loads((out / "report.json").read_text())
    assert {e.identity for e in read_people(listed, "face")} <= {e.identity for e in split_people(
        read_people(fixtures_dir / "face" / "identities" / "SOURCES.csv", "face"), "odd")}
    got = {p["target_fmr"]: (p["fmr"]["errors"], p["fmr"]["trials"], p["fnmr"]["errors"], p["fnmr"]["trials"])
           for p in report["calibrated_points"]}
    assert got == SUBSET_COUNTS
    # Photos the pipeline refuses are reported as failures, by reason, not dropped.
    assert report["counts"]["genuine_failed"] + report["counts"]["genuine_scored"] == 96
    assert set(report["failures"]["reasons"]) <= {"enrol:face_too_small", "enrol:multiple_faces", "enrol:extreme_pose",
                                                  "probe:extreme_pose",
                                                  "probe:face_too_small", "probe:multiple_faces"}
    assert sum(report["failures"]["reasons"].values()) == (report["counts"]["genuine_failed"]
                                                          + report["counts"]["impostor_failed"])
