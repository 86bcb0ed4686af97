"""Runner, reports and plots end to end over the synthetic-embedding scorer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from evaluation_synthetic import (
    EmbeddingScorer,
    LivenessScorer,
    build_pad_world,
    build_world,
    write_trials,
)

from services.common.evaluation import calibration as cal
from services.common.evaluation import metrics as m
from services.common.evaluation import report as rp
from services.common.evaluation.runner import run_pad, run_verification
from services.common.evaluation.scorers import PadScorer, VerificationScorer
from services.common.evaluation.trials import all_pairs, read_manifest, read_pad, read_trials

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def world(tmp_path: Path) -> Path:
    # id1/0.npy cannot be enrolled or probed; id2/3.npy cannot be probed.
    build_world(tmp_path, unusable=("id1/0.npy", "id2/3.npy"))
    return tmp_path


def test_scorers_satisfy_the_protocols():
    assert isinstance(EmbeddingScorer(), VerificationScorer)
    assert isinstance(LivenessScorer(), PadScorer)


def test_run_counts_failures_and_caches_enrolments(world: Path):
    v = "face/verification"
    csv_path = write_trials(
        world,
        [
            (f"{v}/id0/0.npy", f"{v}/id0/1.npy", 1),
            (f"{v}/id0/0.npy", f"{v}/id1/1.npy", 0),  # same enrolment: reused
            (f"{v}/id1/0.npy", f"{v}/id1/1.npy", 1),  # enrolment fails -> genuine failure (FTE)
            (f"{v}/id1/0.npy", f"{v}/id0/1.npy", 0),  # enrolment fails -> impostor failure
            (f"{v}/id2/0.npy", f"{v}/id2/3.npy", 1),  # probe fails -> genuine failure (FTA)
            (f"{v}/id0/0.npy", f"{v}/id2/3.npy", 0),  # probe fails -> impostor failure (FTA)
            (f"{v}/id2/0.npy;{v}/id2/1.npy", f"{v}/id2/2.npy", 1),  # two-sample enrolment
        ],
    )
    trials = read_trials(csv_path)
    scorer = EmbeddingScorer()
    run = run_verification(scorer, trials)
    assert scorer.enroll_calls == 4  # id0/0, id1/0, id2/0, id2/0+id2/1
    assert (run.fte.failures, run.fte.attempts) == (1, 4)
    assert (run.fta.failures, run.fta.attempts) == (2, 5)  # trials past enrolment
    assert run.trials_failed_at_enrolment == 2
    assert (run.genuine_failures, run.impostor_failures) == (2, 2)
    assert run.genuine.size == 2 and run.impostor.size == 1
    assert run.failure_reasons == {"enrol:no_embedding": 2, "probe:no_embedding": 2}
    # The scores are the cosines themselves.
    a, b = (np.load(world / v / f"id0/{n}.npy") for n in (0, 1))
    assert run.genuine[0] == pytest.approx(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    # Failed genuine trials are non-matches in the metrics: FNMR >= 2/4 at any threshold.
    assert m.error_rates(run.genuine, run.impostor, -1.0, run.genuine_failures).fnmr == 0.5


def test_runner_rejects_non_finite_scores_and_empty_lists(world: Path):
    class NanScorer(EmbeddingScorer):
        def score(self, handle, probe):
            return float("nan")

    trials = all_pairs(read_manifest(world), "face")
    with pytest.raises(ValueError, match="non-finite"):
        run_verification(NanScorer(), trials[:3])
    with pytest.raises(ValueError, match="no trials"):
        run_verification(EmbeddingScorer(), [])


def test_verification_report_and_outputs(world: Path, tmp_path: Path):
    trials = all_pairs(read_manifest(world), "face")
    assert len(trials) == 24 * 23 // 2
    run = run_verification(EmbeddingScorer(), trials)
    report = rp.verification_report(run, config={"name": "synthetic"}, operating_fmr=1e-2)
    c = report["counts"]
    assert c["trials"] == 276 and c["genuine"] == 6 * 6
    assert c["genuine_scored"] + c["genuine_failed"] == c["genuine"]
    assert c["impostor_scored"] + c["impostor_failed"] == c["impostor"]
    # Every file but the last in path order is enrolled once: both unusable files fail there.
    assert report["failures"]["fte"] == {"failures": 2, "attempts": 23, "rate": 2 / 23}
    expected = m.eer(run.genuine, run.impostor, run.genuine_failures)
    assert report["eer"]["eer"] == pytest.approx(expected.eer)
    assert report["eer"]["threshold"] == pytest.approx(expected.threshold)
    flags = {p["target"]: p["supported"] for p in report["fnmr_at_fmr"]}
    assert flags == {0.01: False, 0.001: False, 0.0001: False}  # < 300 impostor trials
    assert report["fnmr_at_fmr"][0]["n_needed"] == 300
    op = report["operating_point"]
    assert op["source"] == "fitted_in_sample"
    assert op["threshold"] == m.threshold_at_rate(run.impostor, 1e-2)
    assert op["fmr"] <= 1e-2
    assert report["calibration"]["llr_source"] == "fitted_in_sample"
    assert 0 <= report["calibration"]["min_cllr"] <= report["calibration"]["cllr"] + 1e-9

    files = rp.write_verification_outputs(run, tmp_path / "out", report)
    assert sorted(p.name for p in files.values()) == [
        "det.png", "histogram.png", "per_trial.csv", "report.json", "scores.json"
    ]
    for name in ("det.png", "histogram.png"):
        assert files[name.split(".")[0]].read_bytes()[:8] == PNG_MAGIC
    saved = json.loads(files["report"].read_text())
    assert saved["files"]["scores"] == "scores.json"
    scores = json.loads(files["scores"].read_text())
    assert scores["genuine"] == run.genuine.tolist()
    assert scores["genuine_failures"] == run.genuine_failures


def test_report_uses_a_given_calibration(world: Path):
    run = run_verification(EmbeddingScorer(), all_pairs(read_manifest(world), "face"))
    record = cal.calibration_record(
        run.genuine, run.impostor, target_fmrs=[1e-3], dataset="other", llr_kind="pav"
    )
    record["operating_points"][0]["threshold"] = 0.5
    report = rp.verification_report(run, config={}, calibration=record)
    op = report["operating_point"]
    assert (op["source"], op["threshold"]) == ("calibration", 0.5)
    assert op["fnmr"] == pytest.approx(
        (np.count_nonzero(run.genuine < 0.5) + run.genuine_failures)
        / (run.genuine.size + run.genuine_failures)
    )
    assert report["calibration"]["llr_source"] == "calibration"
    assert report["calibration"]["cllr"] == pytest.approx(
        cal.cllr(cal.apply_llr(record, run.genuine), cal.apply_llr(record, run.impostor))
    )


def test_pad_run_and_report(tmp_path: Path):
    samples = read_pad(build_pad_world(tmp_path))
    run = run_pad(LivenessScorer(), samples)
    assert (run.bpnrr.failures, run.bpnrr.attempts) == (1, 30)
    assert (run.apnrr("replay").failures, run.apnrr("print").failures) == (1, 0)
    assert run.attack_types == ["print", "replay"]
    report = rp.pad_report(run, config={"name": "pad"}, target_apcers=[0.05, 0.01])
    assert report["counts"]["attacks"] == {"print": 20, "replay": 25}
    assert report["counts"]["attacks_scored"] == {"print": 20, "replay": 24}
    ops = report["bpcer_at_apcer"]
    assert [o["n_needed"] for o in ops] == [60, 300]
    assert not any(o["supported"] for o in ops)
    expected = m.bpcer_at_apcer(run.bonafide, run.attacks, 0.05)
    assert ops[0]["rates"]["bpcer"] == pytest.approx(expected.rates.bpcer)
    op = report["operating_point"]
    assert op["threshold"] == expected.rates.threshold
    assert set(op["apcer"]) == {"print", "replay"} and op["apcer_max"] <= 0.05
    assert report["eer"]["eer"] == pytest.approx(m.pad_eer(run.bonafide, run.attacks).eer)
    files = rp.write_pad_outputs(run, tmp_path / "pad-out", report, "p_live")
    assert files["det"].read_bytes()[:8] == PNG_MAGIC
    assert files["histogram"].read_bytes()[:8] == PNG_MAGIC


def test_pad_report_without_attacks(tmp_path: Path):
    samples = [s for s in read_pad(build_pad_world(tmp_path)) if s.bonafide]
    run = run_pad(LivenessScorer(), samples)
    report = rp.pad_report(run, config={})
    assert report["eer"] is None and report["bpcer_at_apcer"] == []
    assert report["operating_point"]["threshold"] is None
    files = rp.write_pad_outputs(run, tmp_path / "o", report)
    assert "det" not in files and files["histogram"].is_file()


def test_jsonable_turns_infinities_into_null():
    out = rp.jsonable({"a": float("inf"), "b": np.float32(0.5), "c": [np.int64(3), -np.inf],
                       "d": m.ErrorRates(float("-inf"), 1.0, 0.0), "e": np.bool_(True)})
    assert out == {"a": None, "b": 0.5, "c": [3, None],
                   "d": {"threshold": None, "fmr": 1.0, "fnmr": 0.0}, "e": True}
    json.dumps(out, allow_nan=False)
