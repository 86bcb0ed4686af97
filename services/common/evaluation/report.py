"""Evaluation reports: the metrics of a run as a JSON-ready dict, the scores file that
``biogate calibrate`` reads, and the plots, all written to one output folder.

Reports hold counts, rates and thresholds only; the scores file holds the comparison scores,
never samples, embeddings or file contents.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from . import calibration as cal
from . import decisions as dec
from . import metrics as m
from .runner import PadRun, VerificationRun

REPORT_FILE = "report.json"
SCORES_FILE = "scores.json"
PER_TRIAL_FILE = "per_trial.csv"
DEFAULT_TARGET_BPCERS: tuple[float, ...] = (1e-2, 5e-2)

CONVENTIONS = {
    "decision": "match / bona fide when score >= threshold",
    "eer": "linear interpolation between the step operating points that bracket FMR = FNMR",
    "fnmr_at_fmr": "lowest threshold whose FMR <= target; no interpolation, ties never split",
    "supported": "rule of three: at least ceil(3 / target) scored impostor (attack) trials",
    "ci95": "two-sided exact (Clopper-Pearson) binomial interval; it treats trials as independent,"
    " which all-pairs trials (sharing people and images) are not",
    "consistent_with_target": "the measured FMR's 95 % interval reaches down to the target or below",
    "failures": "failed genuine trials count as non-matches in FNMR; failed impostor trials are"
    " reported but excluded from FMR; PAD non-responses are reported as APNRR / BPNRR",
    "spoofed_probes": "SASV lists: spoofed probes of the enrolled identity are non-targets kept apart"
    " from the zero-effort impostors: FMR and the EER use zero-effort impostors only; each attack type"
    " gets its own acceptance rate and EER against the targets",
    "decisions": "the system's own decisions (every layer): one operating point, never an EER or DET;"
    " non-responses excluded from the rates or counted as rejections, as the report's decisions say",
    "apcer_at_bpcer": "highest threshold whose BPCER <= target; APCER of each attack type there",
}


def jsonable(obj: Any) -> Any:
    """Dataclasses, numpy values and mappings as plain JSON values; inf and NaN become None."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _rate(r: m.FailureRate) -> dict[str, Any]:
    return {"failures": r.failures, "attempts": r.attempts, "rate": r.rate}


def _cllr_section(
    genuine: np.ndarray, impostor: np.ndarray, calibration: Mapping[str, Any] | None
) -> dict[str, Any]:
    """Cllr of the calibration's LLRs, or of an in-sample logistic fit when there is none."""
    if genuine.size == 0 or impostor.size == 0:
        return {"cllr": None, "min_cllr": None, "llr_source": None}
    if calibration is not None and calibration.get("llr") is not None:
        llr_map, source = calibration["llr"], "calibration"
    else:
        llr_map, source = cal.fit_logistic(genuine, impostor), "fitted_in_sample"
    return {
        "cllr": cal.cllr(cal.apply_llr(llr_map, genuine), cal.apply_llr(llr_map, impostor)),
        "min_cllr": cal.min_cllr(genuine, impostor),
        "llr_source": source,
        "llr": llr_map,
    }


def _rate_with_ci(errors: int, trials: int) -> dict[str, Any]:
    if trials == 0:
        return {"errors": 0, "trials": 0, "rate": None, "ci95": None}
    return {"errors": errors, "trials": trials, "rate": errors / trials, "ci95": m.binomial_ci(errors, trials)}


def calibrated_points(run: VerificationRun, calibration: Mapping[str, Any]) -> list[dict[str, Any]]:
    """FMR and FNMR measured here at each of the calibration's thresholds, with 95 % intervals,
    next to the targets they were fitted for: on trials the calibration never saw (other people),
    the check of its thresholds. Where the trials name identities, also how many distinct pairs of
    people the false matches come from: look-alike pairs give many false matches each, so the
    trials are not independent and the people pairs are the better measure of the evidence."""
    g, i, gf = run.genuine, run.impostor, run.genuine_failures
    pairs = [(frozenset((r.trial.enroll_identity, r.trial.probe_identity)), r.score) for r in run.results
             if not r.trial.target and r.score is not None and r.trial.enroll_identity and r.trial.probe_identity]
    out = []
    for p in calibration["operating_points"]:
        t = float(p["threshold"])
        fmr = _rate_with_ci(int(np.count_nonzero(i >= t)), int(i.size))
        point = {
            "target_fmr": p["target_fmr"],
            "threshold": t,
            "supported": p.get("supported"),
            "fmr": fmr,
            "fnmr": _rate_with_ci(int(np.count_nonzero(g < t)) + gf, int(g.size) + gf),
            "consistent_with_target": None if fmr["ci95"] is None else fmr["ci95"][0] <= p["target_fmr"],
        }
        if pairs:
            point["people_pairs"] = {"scored": len({k for k, _ in pairs}),
                                     "with_false_matches": len({k for k, s in pairs if s >= t})}
        out.append(point)
    return out


def verification_report(
    run: VerificationRun,
    *,
    config: Mapping[str, Any],
    target_fmrs: Sequence[float] = m.DEFAULT_TARGET_FMRS,
    operating_fmr: float = 1e-3,
    calibration: Mapping[str, Any] | None = None,
    non_response: dec.NonResponse = "exclude",
) -> dict[str, Any]:
    """Metrics of a verification run.

    The operating threshold is the calibration record's for ``operating_fmr`` when one is given,
    otherwise the one fitted here on the run's own impostor scores (in-sample).
    """
    g, i, gf = run.genuine, run.impostor, run.genuine_failures
    scored = i.size > 0 and (g.size > 0 or gf > 0)
    threshold, source = None, None
    if calibration is not None:
        threshold, source = cal.threshold_for(calibration, operating_fmr), "calibration"
    elif i.size:
        threshold, source = m.threshold_at_rate(i, operating_fmr), "fitted_in_sample"
    spoofs = run.of_kind("spoof")
    report: dict[str, Any] = {
        "kind": "verification",
        "config": dict(config),
        "counts": {
            "trials": len(run.results),
            "genuine": len(run.of_kind("target")),
            "impostor": len(run.of_kind("nontarget")),
            "spoofed": len(spoofs),
            "genuine_scored": int(g.size),
            "impostor_scored": int(i.size),
            "spoofed_scored": sum(1 for r in spoofs if r.score is not None),
            "genuine_failed": gf,
            "impostor_failed": run.impostor_failures,
            "spoofed_failed": sum(1 for r in spoofs if r.failure is not None),
        },
        "failures": {
            "fte": _rate(run.fte),
            "fta": _rate(run.fta),
            "trials_failed_at_enrolment": run.trials_failed_at_enrolment,
            "reasons": run.failure_reasons,
        },
        "eer": m.eer(g, i, gf) if scored else None,
        "fnmr_at_fmr": [m.fnmr_at_fmr(g, i, t, gf) for t in target_fmrs] if scored else [],
        "operating_point": {"source": source, "target_fmr": operating_fmr, "threshold": threshold},
        "calibration": _cllr_section(g, i, calibration),
        "conventions": CONVENTIONS,
    }
    if scored and threshold is not None:
        at = m.error_rates(g, i, threshold, gf)
        report["operating_point"] |= {
            "fmr": at.fmr,
            "fnmr": at.fnmr,
            "n_impostor": int(i.size),
            "n_needed": m.rule_of_three(operating_fmr),
            "supported": i.size >= m.rule_of_three(operating_fmr),
        }
    if spoofs:
        report["spoofed_probes"] = _spoof_section(run, threshold)
    decisions = dec.verification_decisions(run, non_response)
    if decisions is not None:
        report["decisions"] = decisions
    if calibration is not None and scored:
        report["calibrated_points"] = calibrated_points(run, calibration)
    return jsonable(report)


def _spoof_section(run: VerificationRun, threshold: float | None) -> dict[str, Any]:
    """Score-level figures of the spoofed probes: per attack type the share the comparison alone
    accepts at the operating threshold and the EER against the targets (SPF-EER), and the SASV-EER
    (targets against zero-effort impostors and spoofs pooled)."""
    g, gf, spoofs = run.genuine, run.genuine_failures, run.spoofs
    out: dict[str, Any] = {"attack_types": run.attack_types, "per_type": {}}
    for t in run.attack_types:
        results = [r for r in run.of_kind("spoof") if r.trial.attack_type == t]
        s = spoofs.get(t, np.empty(0))
        entry: dict[str, Any] = {"presented": len(results), "scored": int(s.size),
                                 "non_responses": sum(1 for r in results if r.failure is not None)}
        if s.size and threshold is not None:
            entry["accepted_by_comparison"] = _rate_with_ci(int(np.count_nonzero(s >= threshold)), int(s.size))
        if s.size and (g.size or gf):
            entry["spf_eer"] = m.eer(g, s, gf)
        out["per_type"][t] = entry
    pooled = np.concatenate([run.impostor, *spoofs.values()]) if spoofs else run.impostor
    if pooled.size and (g.size or gf):
        out["sasv_eer"] = m.eer(g, pooled, gf)
    return out


def pad_report(
    run: PadRun,
    *,
    config: Mapping[str, Any],
    target_apcers: Sequence[float] = m.DEFAULT_TARGET_APCERS,
    operating_apcer: float = 5e-2,
    calibration: Mapping[str, Any] | None = None,
    target_bpcers: Sequence[float] = DEFAULT_TARGET_BPCERS,
    non_response: dec.NonResponse = "exclude",
) -> dict[str, Any]:
    """Metrics of a PAD run (ISO/IEC 30107-3). With no attack presentations only the BPCER at
    a calibrated threshold can be given; attack-dependent figures are then None. A run of
    decisions without scores gives the decisions' rates only."""
    b, attacks = run.bonafide, run.attacks
    has_attacks = bool(attacks) and b.size > 0
    if not run.has_scores:
        threshold, source = None, None
    elif calibration is not None:
        threshold, source = cal.threshold_for(calibration, operating_apcer), "calibration"
    elif has_attacks:
        threshold = m.bpcer_at_apcer(b, attacks, operating_apcer).rates.threshold
        source = "fitted_in_sample"
    else:
        threshold, source = None, None
    operating: dict[str, Any] = {"source": source, "target_apcer": operating_apcer,
                                 "threshold": threshold}
    if threshold is not None and has_attacks:
        operating |= dataclasses.asdict(m.pad_error_rates(b, attacks, threshold))
    elif threshold is not None and b.size:
        operating["bpcer"] = float(np.count_nonzero(b < threshold) / b.size)
    report: dict[str, Any] = {
        "kind": "pad",
        "config": dict(config),
        "counts": {
            "presentations": len(run.results),
            "bonafide": run.bpnrr.attempts,
            "bonafide_scored": int(b.size),
            "attacks": {t: run.apnrr(t).attempts for t in run.attack_types},
            "attacks_scored": {t: int(v.size) for t, v in attacks.items()},
        },
        "non_response": {
            "bpnrr": _rate(run.bpnrr),
            "apnrr": _rate(run.apnrr()),
            "apnrr_per_type": {t: _rate(run.apnrr(t)) for t in run.attack_types},
            "reasons": run.failure_reasons,
        },
        "eer": m.pad_eer(b, attacks) if has_attacks else None,
        "eer_per_type": m.pad_eer_per_type(b, attacks) if has_attacks else {},
        "bpcer_at_apcer": [m.bpcer_at_apcer(b, attacks, t) for t in target_apcers]
        if has_attacks
        else [],
        "apcer_at_bpcer": [m.apcer_at_bpcer(b, attacks, t) for t in target_bpcers] if has_attacks else [],
        "operating_point": operating,
        "conventions": CONVENTIONS,
    }
    decisions = dec.pad_decisions(run, non_response)
    if decisions is not None:
        report["decisions"] = decisions
    if calibration is not None and has_attacks:
        report["calibrated_points"] = pad_calibrated_points(run, calibration)
    return jsonable(report)


def pad_calibrated_points(run: PadRun, calibration: Mapping[str, Any]) -> list[dict[str, Any]]:
    """APCER (of the worst attack type: the record's APCER is the maximum over types) and BPCER at
    each of the calibration's thresholds, with 95 % intervals: on attacks and bona fide speakers
    the calibration never saw, the check of its thresholds (``biogate calibrate --check``)."""
    b, attacks = run.bonafide, run.attacks
    out = []
    for p in calibration["operating_points"]:
        t = float(p["threshold"])
        per_type = {k: _rate_with_ci(int(np.count_nonzero(v >= t)), int(v.size)) for k, v in attacks.items()}
        worst = max(per_type, key=lambda k: (per_type[k]["rate"], per_type[k]["trials"]))
        fmr = dict(per_type[worst], attack_type=worst)
        out.append({
            "target_fmr": p["target_fmr"],
            "threshold": t,
            "supported": p.get("supported"),
            "fmr": fmr,
            "fmr_per_type": per_type,
            "fnmr": _rate_with_ci(int(np.count_nonzero(b < t)), int(b.size)),
            "consistent_with_target": fmr["ci95"][0] <= p["target_fmr"],
        })
    return out


def verification_scores(run: VerificationRun, score_name: str = "cosine") -> dict[str, Any]:
    return {
        "kind": "verification",
        "score": score_name,
        "genuine": run.genuine.tolist(),
        "impostor": run.impostor.tolist(),
        "genuine_failures": run.genuine_failures,
        "impostor_failures": run.impostor_failures,
        **({"spoofs": {t: v.tolist() for t, v in run.spoofs.items()}} if run.attack_types else {}),
    }


def pad_scores(run: PadRun, score_name: str = "p_bonafide") -> dict[str, Any]:
    return {
        "kind": "pad",
        "score": score_name,
        "bonafide": run.bonafide.tolist(),
        "attacks": {t: v.tolist() for t, v in run.attacks.items()},
        "bonafide_failures": run.bpnrr.failures,
        "attack_failures": run.apnrr().failures,
    }


def write_json(obj: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(jsonable(obj), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return path


def _with_report(files: dict[str, Path], report: dict[str, Any], out: Path) -> dict[str, Path]:
    """Write report.json, naming the other outputs in its ``files`` section."""
    files["report"] = write_json(dict(report, files={k: v.name for k, v in files.items()}),
                                 out / REPORT_FILE)
    return files


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def _decision_cells(decision, failure) -> list[Any]:
    if failure is not None:
        return ["", failure.layer, failure.reason.upper(), failure.layer, failure.reason]
    if decision is None:
        return ["", "", "", "", ""]
    return [int(decision.accepted), decision.refused_by, ";".join(decision.reasons), "", ""]


def write_per_trial(run: VerificationRun | PadRun, path: str | Path, root: str | Path | None = None) -> Path:
    """One row per trial (presentation): what was compared, the score, the system's decision, the
    layer that refused it and the failure's stage and reason. Paths relative to ``root``."""
    import os

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def rel(p: Path) -> str:
        return Path(os.path.relpath(p, root)).as_posix() if root is not None else str(p)

    tail = ["score", "accepted", "refused_by", "reasons", "failure_stage", "failure_reason"]
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        if isinstance(run, VerificationRun):
            w.writerow(["enroll", "probe", "target", "kind", "trial_type", "attack_type", "enroll_identity",
                        "probe_identity", *tail])
            for r in run.results:
                t = r.trial
                cells = _decision_cells(r.decision, r.failure)
                cells[3] = r.stage or ""
                w.writerow([";".join(rel(p) for p in t.enroll), rel(t.probe), int(t.target), t.kind, t.trial_type,
                            t.attack_type, t.enroll_identity, t.probe_identity, _cell(r.score), *cells])
        else:
            w.writerow(["path", "label", "attack_type", *tail])
            for pr in run.results:
                cells = _decision_cells(pr.decision, pr.failure)
                cells[3] = "presentation" if pr.failure is not None else ""
                w.writerow([rel(pr.sample.path), "bonafide" if pr.sample.bonafide else "attack", pr.sample.attack_type,
                            _cell(pr.score), *cells])
    return path


def write_verification_outputs(
    run: VerificationRun, out_dir: str | Path, report: dict[str, Any], score_name: str = "cosine",
    root: str | Path | None = None,
) -> dict[str, Path]:
    """report.json, per_trial.csv, and with scores scores.json, det.png and histogram.png in ``out_dir``."""
    from .plots import MarkedPoint, plot_det, plot_histograms  # matplotlib: only when reporting

    out = Path(out_dir)
    op = report["operating_point"]
    files = {"per_trial": write_per_trial(run, out / PER_TRIAL_FILE, root)}
    eer = report["eer"]
    if eer is not None:
        det = m.det_curve(run.genuine, run.impostor, run.genuine_failures)
        points = [MarkedPoint("EER", eer["eer"], eer["eer"], eer["threshold"])]
        if op.get("fmr") is not None:
            points.insert(0, MarkedPoint(f"operating point (FMR target {op['target_fmr']:g})", op["fmr"],
                                         op["fnmr"], op["threshold"]))
        files["det"] = plot_det([(report["config"].get("name", "system"), det)], out / "det.png", points,
                                title="DET curve (verification)")
        files["histogram"] = plot_histograms(
            {"genuine": run.genuine, "impostor": run.impostor,
             **{f"spoof: {t}": v for t, v in run.spoofs.items()}}, out / "histogram.png",
            threshold=op["threshold"], title="Comparison scores", xlabel=score_name,
        )
    if run.has_scores:
        files["scores"] = write_json(verification_scores(run, score_name), out / SCORES_FILE)
    return _with_report(files, report, out)


def write_pad_outputs(
    run: PadRun, out_dir: str | Path, report: dict[str, Any], score_name: str = "p_bonafide",
    root: str | Path | None = None,
) -> dict[str, Path]:
    """report.json, per_trial.csv, and with scores scores.json, histogram.png and (with attacks)
    det.png in ``out_dir``."""
    from .plots import MarkedPoint, plot_det, plot_histograms  # matplotlib: only when reporting

    out = Path(out_dir)
    op = report["operating_point"]
    files = {"per_trial": write_per_trial(run, out / PER_TRIAL_FILE, root)}
    if not run.has_scores:
        return _with_report(files, report, out)
    files |= {
        "histogram": plot_histograms(
            {"bona fide": run.bonafide, **{f"attack: {t}": v for t, v in run.attacks.items()}},
            out / "histogram.png", threshold=op["threshold"],
            title="PAD scores (higher = more bona fide)", xlabel=score_name,
        ),
        "scores": write_json(pad_scores(run, score_name), out / SCORES_FILE),
    }
    if report["eer"] is not None:
        pooled = np.concatenate(list(run.attacks.values()))
        det = m.det_curve(run.bonafide, pooled)
        # On the pooled curve the marker shows the pooled APCER; the report has it per type.
        pooled_apcer = float(np.count_nonzero(pooled >= op["threshold"]) / pooled.size)
        points = [MarkedPoint(f"operating point (APCER_max target {op['target_apcer']:g})",
                              pooled_apcer, op["bpcer"], op["threshold"])]
        files["det"] = plot_det([("all attacks pooled", det)], out / "det.png", points,
                                title="DET curve (PAD)", x_name="APCER", y_name="BPCER")
    return _with_report(files, report, out)
