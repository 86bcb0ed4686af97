"""Thresholds, LLR maps and Cllr: hand cases and synthetic Gaussian scores with a known true LLR."""

from __future__ import annotations

import datetime as dt
import math

import numpy as np
import pytest

from services.common.evaluation import calibration as cal
from services.common.models.calibration import (CalibrationRecord, LogisticLLR, OperatingPointError, PavLLR, llr_caps,
                                                trials_needed)

LOG2 = math.log(2.0)


def gaussian_scores(n_gen: int, n_imp: int, seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """Genuine ~ N(1, 1), impostor ~ N(-1, 1): the true LLR is exactly 2 * s."""
    rng = np.random.default_rng(seed)
    return rng.normal(1.0, 1.0, n_gen), rng.normal(-1.0, 1.0, n_imp)


# ---------------------------------------------------------------- thresholds


def test_fit_thresholds_hand_case():
    imp = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    t = cal.fit_thresholds(imp, [0.1, 0.2, 0.01])
    assert t == {
        0.1: np.nextafter(0.9, 2.0),  # one of ten may pass: 1.0
        0.2: np.nextafter(0.8, 2.0),  # two may pass: 0.9, 1.0
        0.01: np.nextafter(1.0, 2.0),  # none may pass
    }


def test_fit_thresholds_per_attack_type_takes_the_strictest():
    groups = {"print": [0.1, 0.2, 0.3, 0.9], "replay": [0.5, 0.6]}
    # 50 %: print lets two through (t just above 0.2), replay one (just above 0.5).
    assert cal.fit_thresholds(groups, [0.5]) == {0.5: np.nextafter(0.5, 1.0)}


@pytest.mark.parametrize("bad", [0.0, 1.0, 1.5])
def test_fit_thresholds_rejects_bad_targets(bad):
    with pytest.raises(ValueError, match="target FMR"):
        cal.fit_thresholds([0.1, 0.2], [bad])


def test_fit_thresholds_rejects_empty():
    with pytest.raises(ValueError, match="no scores"):
        cal.fit_thresholds([], [0.1])


# ---------------------------------------------------------------- LLR maps


def test_logistic_recovers_the_true_llr_and_is_zero_where_classes_overlap_evenly():
    g, i = gaussian_scores(20000, 20000)
    m = cal.fit_logistic(g, i)
    assert m["kind"] == "logistic"
    assert m["a"] == pytest.approx(2.0, abs=0.08)
    assert m["b"] == pytest.approx(0.0, abs=0.06)
    assert cal.apply_llr(m, 0.0) == pytest.approx(0.0, abs=0.06)


def test_logistic_prior_weighting_removes_class_imbalance_and_the_prior():
    # 1 genuine for 10 impostors: an unweighted fit would shift b by log(1/10) = -2.3.
    g, i = gaussian_scores(3000, 30000, seed=3)
    for prior in (0.5, 0.1, 0.01):
        m = cal.fit_logistic(g, i, prior=prior)
        assert m["a"] == pytest.approx(2.0, abs=0.1), prior
        assert m["b"] == pytest.approx(0.0, abs=0.1), prior


def test_logistic_stays_finite_on_separable_scores():
    m = cal.fit_logistic([0.8, 0.9, 0.85], [0.1, 0.2, 0.15])
    assert math.isfinite(m["a"]) and m["a"] > 0
    assert cal.apply_llr(m, 0.5) == pytest.approx(0.0, abs=1e-6)  # the midpoint, by symmetry


def test_logistic_on_identical_scores_carries_no_evidence():
    assert cal.fit_logistic([0.4, 0.4], [0.4]) == {"kind": "logistic", "a": 0.0, "b": 0.0}


def test_pav_hand_case():
    # Sorted: .05 .1 .2 (i) .3 (g) .4 .5 .55 (i) .6 .8 .85 .9 .95 (g); PAV pools {.3, .4, .5, .55}:
    # 1 genuine of 4, LLR log(1/3). Pure bins would be infinite. Six trials a class support no more
    # than ln(6 / 3) either way, so every LLR is clipped to +-log(2), the pooled bin included.
    m = cal.fit_pav([0.3, 0.6, 0.8, 0.85, 0.9, 0.95], [0.05, 0.1, 0.2, 0.4, 0.5, 0.55])
    assert m["kind"] == "pav"
    assert m["scores"] == [0.05, 0.55, 0.6, 0.95]  # points inside flat runs dropped
    assert m["llrs"] == pytest.approx([-LOG2, -LOG2, LOG2, LOG2])
    assert cal.apply_llr(m, 0.4) == pytest.approx(-LOG2)
    assert cal.apply_llr(m, 0.575) == pytest.approx(0.0)
    assert cal.apply_llr(m, -10.0) == pytest.approx(-LOG2)
    assert cal.apply_llr(m, 10.0) == pytest.approx(LOG2)
    # With three trials a class the data support no evidence at all.
    flat = cal.fit_pav([0.3, 0.6, 0.8], [0.2, 0.4, 0.5])
    assert flat["llrs"] == [0.0, 0.0] and flat["scores"] == [0.2, 0.8]


def test_pav_is_monotone_and_near_zero_where_classes_overlap_evenly():
    g, i = gaussian_scores(5000, 5000, seed=11)
    m = cal.fit_pav(g, i)
    grid = np.linspace(-4, 4, 801)
    llr = cal.apply_llr(m, grid)
    assert np.all(np.diff(llr) >= 0)
    assert np.all(np.diff(m["scores"]) > 0)
    assert cal.apply_llr(m, 0.0) == pytest.approx(0.0, abs=0.35)
    assert cal.apply_llr(m, 1.0) == pytest.approx(2.0, abs=0.5)


@pytest.mark.parametrize("kind", ["logistic", "pav"])
def test_llr_maps_are_monotone_on_random_scores(kind):
    rng = np.random.default_rng(5)
    m = cal.fit_llr(rng.normal(0.6, 0.1, 300), rng.normal(0.1, 0.15, 900), kind)
    llr = cal.apply_llr(m, np.linspace(-1, 1, 401))
    assert np.all(np.diff(llr) >= 0)


def test_apply_llr_hand_cases():
    assert cal.apply_llr({"kind": "logistic", "a": 2.0, "b": -1.0}, 1.5) == 2.0
    out = cal.apply_llr({"kind": "logistic", "a": 2.0, "b": -1.0}, [0.0, 1.0])
    assert out.tolist() == [-1.0, 1.0]
    pav = {"kind": "pav", "scores": [0.0, 1.0], "llrs": [-1.0, 1.0]}
    assert cal.apply_llr(pav, 0.25) == -0.5
    record = {"operating_points": [], "llr": pav}
    assert cal.apply_llr(record, 0.75) == 0.5
    with pytest.raises(ValueError, match="no LLR map"):
        cal.apply_llr({"operating_points": [], "llr": None}, 0.5)
    with pytest.raises(ValueError, match="no LLR map"):
        cal.apply_llr({"operating_points": []}, 0.5)
    with pytest.raises(ValueError, match="kind"):
        cal.apply_llr({"kind": "spline"}, 0.5)
    with pytest.raises(ValueError, match="ascending"):
        cal.apply_llr({"kind": "pav", "scores": [1.0, 0.0], "llrs": [0.0, 1.0]}, 0.5)


@pytest.mark.parametrize("caps", [(None, None), (-2.5, 3.25)])
def test_one_score_s_llr_is_the_array_path_s_value_bit_for_bit(caps):
    """A service's decision takes the scalar path (`one`); the evaluation the array one: the same numbers."""
    rng = np.random.default_rng(11)
    scores = np.concatenate([rng.uniform(-1.0, 1.0, 5000), [-1.0, 0.0, 1.0, 0.3377, 1e-300, -0.0]])
    maps: list[LogisticLLR | PavLLR] = [LogisticLLR(a=9.73, b=-3.41, min_llr=caps[0], max_llr=caps[1]),
            PavLLR(scores=[-0.2, 0.1, 0.4, 0.7], llrs=[-2.0, -0.5, 1.0, 2.5], min_llr=caps[0], max_llr=caps[1])]
    for m in maps:
        assert [m.one(float(s)) for s in scores] == m.llr(scores).tolist()
        assert math.isnan(m.one(math.nan)) and math.isnan(float(m.llr(math.nan)))


def test_fit_llr_rejects_unknown_kind():
    with pytest.raises(ValueError, match="unknown LLR map kind"):
        cal.fit_llr([0.9], [0.1], "spline")


# ---------------------------------------------------------------- Cllr


def test_cllr_hand_cases():
    assert cal.cllr([0.0, 0.0], [0.0]) == pytest.approx(1.0)
    assert cal.cllr([math.inf], [-math.inf]) == 0.0
    # LLR log 3 for genuine and -log 3 for impostor: each term log(4/3), Cllr = log2(4/3).
    assert cal.cllr([math.log(3)], [-math.log(3)]) == pytest.approx(math.log2(4 / 3))
    with pytest.raises(ValueError):
        cal.cllr([], [0.0])


def test_calibrated_cllr_beats_an_uncalibrated_map():
    g, i = gaussian_scores(4000, 4000, seed=21)
    # A cosine-like score used as if it were an LLR: right order, wrong scale and offset.
    raw_g, raw_i = 0.1 * g + 0.5, 0.1 * i + 0.5
    uncalibrated = cal.cllr(raw_g, raw_i)
    for kind in ("logistic", "pav"):
        m = cal.fit_llr(raw_g, raw_i, kind)
        calibrated = cal.cllr(cal.apply_llr(m, raw_g), cal.apply_llr(m, raw_i))
        assert calibrated < uncalibrated - 0.2, kind
        # Nothing monotone can beat the PAV optimum on its own training data.
        assert calibrated >= cal.min_cllr(raw_g, raw_i) - 1e-9, kind
    # The true LLR 2s gives Cllr ~ 0.51 bits for d' = 2; the fitted one should be close.
    m = cal.fit_logistic(raw_g, raw_i)
    assert cal.cllr(cal.apply_llr(m, raw_g), cal.apply_llr(m, raw_i)) == pytest.approx(
        cal.cllr(2 * g, 2 * i), abs=0.01
    )


def test_min_cllr_extremes():
    assert cal.min_cllr([0.8, 0.9], [0.1, 0.2]) == 0.0
    assert cal.min_cllr([0.5, 0.5], [0.5, 0.5, 0.5]) == pytest.approx(1.0)


# ---------------------------------------------------------------- records


def test_calibration_record_matches_the_manifest_schema():
    g, i = gaussian_scores(400, 1000, seed=2)
    rec = cal.calibration_record(
        g, i, target_fmrs=[1e-2, 1e-3], dataset="synthetic", genuine_failures=4,
        date=dt.date(2025, 1, 31),
    )
    assert rec["trials"] == {"genuine": 404, "impostor": 1000} and rec["rate"] == "FMR"
    assert rec["date"] == "2025-01-31"
    assert rec["tool_version"].startswith("biogate calibrate ")
    p, p3 = rec["operating_points"]
    assert p["target_fmr"] == 0.01 and p["fmr"] <= 0.01
    assert p["threshold"] == np.nextafter(np.sort(i)[-11], np.inf)
    assert p["fnmr"] == pytest.approx((np.count_nonzero(g < p["threshold"]) + 4) / 404)
    assert p["trials"] == rec["trials"] and p["supported"] is True and "why" not in p
    assert p3["supported"] is False
    assert p3["why"] == "FMR 1e-3 needs >= 3,000 impostor trials, the calibration has 1,000"
    assert (rec["llr"]["min_llr"], rec["llr"]["max_llr"]) == llr_caps(400, 1000)
    parsed = CalibrationRecord.model_validate(rec)
    assert parsed.threshold(1e-2) == cal.threshold_for(rec, 1e-2)
    with pytest.raises(OperatingPointError, match="FMR 1e-3 needs >= 3,000") as err:
        parsed.threshold(1e-3)
    assert err.value.reason == "OPERATING_POINT_UNSUPPORTED"
    assert parsed.llr is not None and parsed.llr.llr(0.3) == pytest.approx(cal.apply_llr(rec, 0.3))
    pav = cal.calibration_record(g, i, target_fmrs=[1e-2], dataset="s", llr_kind="pav")
    pav_llr = CalibrationRecord.model_validate(pav).llr
    assert pav_llr is not None and pav_llr.llr(0.3) == pytest.approx(
        cal.apply_llr(pav, 0.3)
    )
    with pytest.raises(KeyError, match="0.01, 0.001"):
        cal.threshold_for(rec, 1e-4)


def test_pad_calibration_record_uses_apcer_max():
    rec = cal.calibration_record(
        [0.7, 0.8, 0.9, 0.95],
        {"print": [0.1, 0.2, 0.3, 0.6], "replay": [0.4, 0.75]},
        target_fmrs=[0.5],
        dataset="pad",
        llr_kind=None,
        score_name="p_bonafide",
    )
    (p,) = rec["operating_points"]
    assert p["threshold"] == np.nextafter(0.4, 1.0)  # replay: one of two may pass
    assert p["fmr"] == 0.5 and p["fnmr"] == 0.0
    assert rec["trials"] == {"genuine": 4, "impostor": 6} and "llr" not in rec
    assert rec["rate"] == "APCER" and p["supported"] is True  # 6 attacks support APCER 0.5 (3 / 0.5)
    CalibrationRecord.model_validate(rec)
    (few,) = cal.calibration_record([0.9], {"print": [0.1, 0.2]}, target_fmrs=[0.5], dataset="pad",
                                    llr_kind=None)["operating_points"]
    assert few["why"] == "APCER 5e-1 needs >= 6 attack presentations, the calibration has 2"


@pytest.mark.parametrize("kind", ["logistic", "pav"])
def test_calibration_record_refuses_scores_without_evidence(kind):
    with pytest.raises(ValueError, match="slope|single point"):
        cal.calibration_record([0.5, 0.5], [0.5], target_fmrs=[0.5], dataset="x", llr_kind=kind)
    if kind == "logistic":
        with pytest.raises(ValueError, match="not positive"):
            cal.calibration_record(
                [0.1, 0.2], [0.8, 0.9], target_fmrs=[0.5], dataset="x", llr_kind=kind
            )


# ---------------------------------------------------------------- support (rule of three)


@pytest.mark.parametrize("target, needed", [(1e-2, 300), (1e-3, 3000), (1e-4, 30000), (5e-2, 60), (0.5, 6)])
def test_support_needs_three_over_the_target_trials_exactly(target, needed):
    assert trials_needed(target) == needed
    rng = np.random.default_rng(1)
    g = rng.normal(1.0, 1.0, 50)
    at = cal.calibration_record(g, rng.normal(-1.0, 1.0, needed), target_fmrs=[target], dataset="x")
    below = cal.calibration_record(g, rng.normal(-1.0, 1.0, needed - 1), target_fmrs=[target], dataset="x")
    (p_at,), (p_below,) = at["operating_points"], below["operating_points"]
    assert p_at["supported"] is True and p_at["trials"]["impostor"] == needed
    assert p_below["supported"] is False and p_below["trials"]["impostor"] == needed - 1
    assert f"needs >= {needed:,} impostor trials, the calibration has {needed - 1:,}" in p_below["why"]
    assert CalibrationRecord.model_validate(at).threshold(target) == p_at["threshold"]
    with pytest.raises(OperatingPointError) as err:
        CalibrationRecord.model_validate(below).threshold(target)
    assert err.value.reason == "OPERATING_POINT_UNSUPPORTED" and isinstance(err.value, LookupError)


def test_a_record_cannot_claim_support_its_counts_do_not_give():
    rec = cal.calibration_record(*gaussian_scores(50, 2999), target_fmrs=[1e-3], dataset="x")
    rec["operating_points"][0] |= {"supported": True}
    with pytest.raises(ValueError, match="marked supported but was measured on 2,999"):
        CalibrationRecord.model_validate(rec)
    rec["operating_points"][0] |= {"supported": False, "why": None}
    with pytest.raises(ValueError, match="unsupported: say why"):
        CalibrationRecord.model_validate(rec)
    rec["operating_points"][0] |= {"why": "x", "trials": {"genuine": 50, "impostor": 5000}}
    with pytest.raises(ValueError, match="counts more trials than the record"):
        CalibrationRecord.model_validate(rec)


# ---------------------------------------------------------------- LLRs capped by the data


def separable(n_gen: int, n_imp: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.uniform(0.6, 0.9, n_gen), rng.uniform(0.0, 0.3, n_imp)


@pytest.mark.parametrize("kind", ["logistic", "pav"])
@pytest.mark.parametrize("n_gen, n_imp", [(300, 3000), (40, 12), (1000, 1000)])
def test_llr_never_exceeds_what_the_trials_support_even_on_separable_scores(kind, n_gen, n_imp):
    g, i = separable(n_gen, n_imp)
    rec = cal.calibration_record(g, i, target_fmrs=[0.5], dataset="x", llr_kind=kind)
    grid = np.linspace(-5.0, 5.0, 2001)
    stored = CalibrationRecord.model_validate(rec).llr
    assert stored is not None
    for llr in (cal.apply_llr(rec, grid), stored.llr(grid)):
        assert llr.max() == pytest.approx(math.log(n_imp / 3))  # reached: the classes are separable
        assert llr.min() == pytest.approx(-math.log(n_gen / 3))
        assert np.all(np.diff(llr) >= 0)


def test_the_logistic_fit_stays_finite_on_separable_scores():
    # Platt's smoothed targets: in-sample LLRs near +-ln(N + 1) of each class, not running off to
    # infinity as with hard 0/1 labels (which fit a step: slope without bound).
    for n_gen, n_imp in ((300, 3000), (1000, 1000), (30, 30)):
        g, i = separable(n_gen, n_imp, seed=n_gen)
        m = cal.fit_logistic(g, i)
        assert 0 < m["a"] < 100
        assert cal.apply_llr(m, g.mean()) == pytest.approx(math.log(n_gen + 1), abs=2.0)
        assert cal.apply_llr(m, i.mean()) == pytest.approx(-math.log(n_imp + 1), abs=2.0)
        # Wider gaps between the classes change the fit little: no saturation.
        wide = cal.fit_logistic(g + 1.0, i)
        assert cal.apply_llr(wide, g.mean() + 1.0) == pytest.approx(math.log(n_gen + 1), abs=2.5)


def test_a_record_cannot_cap_above_its_data():
    rec = cal.calibration_record(*gaussian_scores(300, 3000), target_fmrs=[1e-2], dataset="x")
    rec["llr"]["max_llr"] = math.log(3000 / 3) + 0.01
    with pytest.raises(ValueError, match=r"max_llr must be at most ln\(3000 / 3\)"):
        CalibrationRecord.model_validate(rec)
    rec["llr"] |= {"max_llr": 1.0, "min_llr": -math.log(300 / 3) - 0.01}
    with pytest.raises(ValueError, match=r"min_llr must be at least -ln\(300 / 3\)"):
        CalibrationRecord.model_validate(rec)


def test_fmr_groups_each_meet_the_target_and_each_need_the_trials_to_support_it():
    """Impostor groups (rate FMR): the strictest group sets the threshold, as attack types do, but a
    point is supported only when every group has ceil(3 / target) trials, not their pool."""
    rng = np.random.default_rng(0)
    big, small = rng.uniform(0, 0.5, 4000), rng.uniform(0, 0.9, 400)
    record = cal.calibration_record(rng.uniform(0.8, 1, 200), {"big": big, "small": small}, target_fmrs=[1e-2, 1e-3],
                                dataset="groups", llr_kind=None, rate="FMR")
    assert record["rate"] == "FMR" and record["trials"]["impostor"] == 4400
    by = {p["target_fmr"]: p for p in record["operating_points"]}
    assert by[1e-2]["supported"] and by[1e-2]["threshold"] > 0.85  # the small group's, not the pool's
    assert not by[1e-3]["supported"] and by[1e-3]["why"].startswith("small: FMR 1e-3 needs >= 3,000")
    CalibrationRecord.model_validate(record)
    pad = cal.calibration_record(rng.uniform(0.8, 1, 200), {"big": big, "small": small}, target_fmrs=[1e-3],
                             dataset="attacks", llr_kind=None)
    assert pad["rate"] == "APCER" and pad["operating_points"][0]["supported"]  # attack types pooled, as before
