"""Hand-computed cases for the verification and PAD error rates."""

from __future__ import annotations

import math

import numpy as np
import pytest

from services.common.evaluation import metrics as m


# ---------------------------------------------------------------- error rates at a threshold


def test_error_rates_ties_fall_on_the_accepting_side():
    r = m.error_rates([0.5, 0.7, 0.3], [0.5, 0.1, 0.2, 0.6], threshold=0.5)
    assert r.fmr == pytest.approx(2 / 4)  # 0.5 (tie) and 0.6 match
    assert r.fnmr == pytest.approx(1 / 3)  # only 0.3 is below


def test_genuine_failures_count_as_non_matches():
    r = m.error_rates([0.9, 0.8], [0.1], threshold=0.5, genuine_failures=2)
    assert r.fnmr == pytest.approx(2 / 4)
    # Even at the lowest threshold a failure never matches.
    assert m.error_rates([0.9], [0.1], threshold=-1e9, genuine_failures=1).fnmr == 0.5


def test_only_failed_genuine_trials_is_allowed_and_never_matches():
    r = m.error_rates([], [0.1, 0.2], threshold=0.0, genuine_failures=3)
    assert (r.fmr, r.fnmr) == (1.0, 1.0)


@pytest.mark.parametrize(
    "genuine, impostor",
    [([], [0.1]), ([0.1], []), (np.array([]), np.array([]))],
)
def test_empty_sets_raise_value_error(genuine, impostor):
    with pytest.raises(ValueError, match="no scores"):
        m.eer(genuine, impostor)
    with pytest.raises(ValueError, match="no scores"):
        m.error_rates(genuine, impostor, 0.0)
    with pytest.raises(ValueError, match="no scores"):
        m.det_curve(genuine, impostor)
    with pytest.raises(ValueError, match="no scores"):
        m.fnmr_at_fmr(genuine, impostor, 1e-2)


def test_nan_and_negative_failures_are_rejected():
    with pytest.raises(ValueError, match="finite"):
        m.eer([0.1, float("nan")], [0.2])
    with pytest.raises(ValueError, match="finite"):
        m.eer([0.1], [float("inf")])
    with pytest.raises(ValueError, match="failures"):
        m.eer([0.1], [0.2], genuine_failures=-1)


# ---------------------------------------------------------------- EER


def test_eer_on_an_operating_point():
    # t=0.75: FMR = 1/3 (0.75), FNMR = 1/3 (0.7): the first point with FNMR >= FMR, equal.
    r = m.eer([0.9, 0.8, 0.7], [0.1, 0.2, 0.75])
    assert r.eer == pytest.approx(1 / 3)
    assert r.threshold == 0.75
    assert r.lower == r.upper


def test_eer_interpolated_between_operating_points():
    genuine = [0.3, 0.6, 0.8, 0.9]
    impostor = [0.2, 0.5]
    r = m.eer(genuine, impostor)
    # t=0.5: FMR 1/2, FNMR 1/4 (d=-1/4); t=0.6: FMR 0, FNMR 1/4 (d=+1/4) -> alpha = 1/2.
    assert (r.lower.threshold, r.lower.fmr, r.lower.fnmr) == (0.5, 0.5, 0.25)
    assert (r.upper.threshold, r.upper.fmr, r.upper.fnmr) == (0.6, 0.0, 0.25)
    assert r.eer == pytest.approx(0.25)
    assert r.threshold == pytest.approx(0.55)


def test_eer_interpolation_with_unequal_steps():
    # t=0.45: FMR 1/3 (0.5), FNMR 0 -> d=-1/3.  t=0.5: FMR 1/3, FNMR 1/2 -> d=+1/6.
    genuine = [0.45, 0.9]
    impostor = [0.1, 0.4, 0.5]
    r = m.eer(genuine, impostor)
    assert (r.lower.threshold, r.upper.threshold) == (0.45, 0.5)
    alpha = (1 / 3) / (1 / 6 + 1 / 3)  # 2/3
    assert r.eer == pytest.approx(1 / 3)  # FMR stays 1/3 along the segment...
    assert r.eer == pytest.approx(alpha * 0.5)  # ...and FNMR, going 0 -> 1/2, meets it there
    assert r.threshold == pytest.approx(0.45 + alpha * 0.05)


def test_eer_all_correct_is_zero():
    r = m.eer([0.8, 0.9], [0.1, 0.2])
    assert r.eer == 0.0
    assert r.threshold == 0.8  # the lowest threshold with no errors


def test_eer_fully_inverted_scores_is_one():
    r = m.eer([0.1, 0.2], [0.8, 0.9])
    assert r.eer == 1.0
    assert r.threshold == 0.8  # FMR = FNMR = 1 there


def test_eer_tiny_sets():
    assert m.eer([0.7], [0.3]).eer == 0.0
    assert m.eer([0.3], [0.7]).eer == 1.0
    tie = m.eer([0.5], [0.5])
    assert tie.eer == pytest.approx(0.5)
    assert tie.threshold == 0.5


def test_eer_identical_scores_everywhere_is_one_half():
    r = m.eer([0.4] * 5, [0.4] * 7)
    assert r.eer == pytest.approx(0.5)
    assert r.threshold == 0.4


def test_eer_all_genuine_failed_is_one():
    r = m.eer([], [0.1, 0.2], genuine_failures=2)
    assert r.eer == 1.0
    assert r.threshold == -math.inf


def test_eer_counts_failures_as_non_matches():
    # Without the failure: EER 0. With one of 4 genuine failed: FNMR never below 1/4.
    assert m.eer([0.8, 0.9, 0.95], [0.1, 0.2]).eer == 0.0
    r = m.eer([0.8, 0.9, 0.95], [0.1, 0.2], genuine_failures=1)
    # t=0.2: FMR 1/2, FNMR 1/4 (d<0); t=0.8: FMR 0, FNMR 1/4 (d>0): alpha = 1/2, EER 1/4.
    assert r.eer == pytest.approx(0.25)
    assert r.threshold == pytest.approx(0.5)


# ---------------------------------------------------------------- DET curve


def test_det_curve_points():
    c = m.det_curve([0.5, 0.7], [0.5, 0.1])
    assert c.thresholds.tolist() == [-math.inf, 0.1, 0.5, 0.7, math.inf]
    assert c.fmr.tolist() == [1.0, 1.0, 0.5, 0.0, 0.0]
    assert c.fnmr.tolist() == [0.0, 0.0, 0.0, 0.5, 1.0]
    assert (c.n_genuine, c.n_impostor) == (2, 2)


def test_det_curve_is_monotone_on_random_scores():
    rng = np.random.default_rng(1)
    c = m.det_curve(rng.normal(1, 1, 500).round(2), rng.normal(0, 1, 700).round(2), 3)
    assert np.all(np.diff(c.fmr) <= 0) and np.all(np.diff(c.fnmr) >= 0)
    assert c.fnmr[0] == pytest.approx(3 / 503)


# ---------------------------------------------------------------- FNMR at FMR


def test_threshold_at_rate_exact_and_with_ties():
    imp = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95]
    # 10 % of 10 impostors: one false match allowed -> just above the second highest, 0.9.
    t = m.threshold_at_rate(imp, 0.1)
    assert t == np.nextafter(0.9, 1.0)
    assert m.error_rates([1.0], imp, t).fmr == pytest.approx(0.1)
    # Zero allowed: just above the highest.
    assert m.threshold_at_rate(imp, 0.05) == np.nextafter(0.95, 1.0)
    # Ties: 0.9 twice at the top; one allowed, but splitting the tie is impossible -> FMR 0.
    t = m.threshold_at_rate([0.9, 0.9, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8], 0.1)
    assert t == np.nextafter(0.9, 1.0)
    # Target >= 1 allows everything.
    assert m.threshold_at_rate(imp, 1.0) == -math.inf


def test_threshold_at_rate_survives_float_products():
    # 0.07 * 100 is 7.000000000000001 and 0.29 * 100 is 28.999999999999996 in binary.
    imp = np.arange(100, dtype=float)
    assert m.threshold_at_rate(imp, 0.07) == np.nextafter(92.0, np.inf)  # 7 above: 93..99
    assert m.threshold_at_rate(imp, 0.29) == np.nextafter(70.0, np.inf)  # 29 above: 71..99


def test_fnmr_at_fmr_and_supportability():
    genuine = [0.3, 0.85, 0.9, 0.99]
    impostor = list(np.linspace(0.0, 0.8, 300))  # 0.8 is the highest
    op = m.fnmr_at_fmr(genuine, impostor, 1e-2)
    # 1 % of 300 = 3 false matches allowed: threshold just above the 4th highest impostor.
    fourth = sorted(impostor)[-4]
    assert op.threshold == np.nextafter(fourth, 1.0)
    assert op.fmr == pytest.approx(3 / 300)
    assert op.fnmr == pytest.approx(1 / 4)
    assert (op.n_impostor, op.n_needed, op.supported) == (300, 300, True)
    op3 = m.fnmr_at_fmr(genuine, impostor, 1e-3)
    assert (op3.n_needed, op3.supported) == (3000, False)
    assert op3.fmr == 0.0 and op3.threshold == np.nextafter(0.8, 1.0)
    assert m.fnmr_at_fmr(genuine, impostor[:299], 1e-2).supported is False


def test_fnmr_at_fmr_includes_failures():
    op = m.fnmr_at_fmr([0.9, 0.9, 0.9], [0.1, 0.2], 0.5, genuine_failures=1)
    assert op.fnmr == pytest.approx(1 / 4)


@pytest.mark.parametrize("target, needed", [(1e-2, 300), (1e-3, 3000), (1e-4, 30000), (5e-2, 60)])
def test_rule_of_three(target, needed):
    assert m.rule_of_three(target) == needed


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 2.0])
def test_rule_of_three_rejects_bad_targets(bad):
    with pytest.raises(ValueError):
        m.rule_of_three(bad)


def test_failure_rate():
    assert m.failure_rate(2, 8).rate == 0.25
    assert m.failure_rate(0, 0).rate is None
    with pytest.raises(ValueError):
        m.failure_rate(3, 2)


# ---------------------------------------------------------------- PAD


ATTACKS = {"print": [0.1, 0.2, 0.6, 0.3], "replay": [0.5, 0.9]}
BONAFIDE = [0.4, 0.7, 0.8, 0.95, 0.5]


def test_apcer_per_type_max_and_bpcer():
    r = m.pad_error_rates(BONAFIDE, ATTACKS, threshold=0.5)
    assert r.apcer == {"print": 0.25, "replay": 1.0}  # 0.6 | 0.5 (tie) and 0.9
    assert r.apcer_max == 1.0
    assert r.bpcer == pytest.approx(1 / 5)  # 0.4


def test_bpcer_at_apcer_takes_the_strictest_type():
    op = m.bpcer_at_apcer(BONAFIDE, ATTACKS, 0.05)
    # No attack of any type may pass: above the highest attack score, 0.9.
    assert op.rates.threshold == np.nextafter(0.9, 1.0)
    assert op.rates.apcer == {"print": 0.0, "replay": 0.0}
    assert op.rates.bpcer == pytest.approx(4 / 5)  # only 0.95 passes
    assert op.n_attacks == {"print": 4, "replay": 2}
    assert (op.n_needed, op.supported) == (60, False)
    # With 50 % allowed: print allows 2 of 4 (t just above 0.2); replay allows 1 (above 0.5).
    op = m.bpcer_at_apcer(BONAFIDE, ATTACKS, 0.5)
    assert op.rates.threshold == np.nextafter(0.5, 1.0)
    assert op.rates.apcer == {"print": 0.25, "replay": 0.5}
    assert op.rates.bpcer == pytest.approx(2 / 5)


def test_pad_eer_pools_attack_types():
    r = m.pad_eer([0.8, 0.9], {"a": [0.1], "b": [0.2]})
    assert r.eer == 0.0 and r.threshold == 0.8
    inverted = m.pad_eer([0.1, 0.2], {"a": [0.8], "b": [0.9]})
    assert inverted.eer == 1.0


def test_pad_rejects_empty_inputs():
    with pytest.raises(ValueError, match="no attack types"):
        m.pad_error_rates([0.5], {}, 0.5)
    with pytest.raises(ValueError, match="no scores"):
        m.pad_error_rates([0.5], {"print": []}, 0.5)
    with pytest.raises(ValueError, match="no scores"):
        m.bpcer_at_apcer([], {"print": [0.1]}, 0.05)


def test_split_by_type():
    groups = m.split_by_type([0.1, 0.2, 0.3], ["b", "a", "b"])
    assert list(groups) == ["a", "b"]
    assert groups["b"].tolist() == [0.1, 0.3]
