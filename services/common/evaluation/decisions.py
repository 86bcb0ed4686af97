"""Error rates of the system's own decisions (every layer), not of a score at a threshold.

What a user gets is the decision: a verification is accepted only when the comparison, the
liveness or anti-spoofing layers and the challenge all pass; a sample the system cannot process
gets no decision at all (a non-response: failure to enrol or acquire, ISO/IEC 19795-1; APNRR and
BPNRR of ISO/IEC 30107-3). The rates here count decisions:

* verification: FNMR of the system over the target trials, FMR over the zero-effort impostor
  trials, and for spoofed probes (SASV lists) the share of each attack type accepted (the impostor
  attack presentation accept rate, IAPAR of ISO/IEC 30107-3, reported as the attack's APCER);
* PAD: APCER per attack type, APCER_max and BPCER.

Non-responses are reported apart (``non_response="exclude"``, ISO/IEC 30107-3's default: they are
not in APCER/BPCER) or counted as rejections (``"reject"``: a refused capture refuses the user, and
stops the attack). Binary decisions give one operating point: no EER and no DET curve come from them.
Every rate carries its exact binomial 95 % interval (trials treated as independent, which trials
sharing people are not).
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Iterable, Literal, Sequence

from .metrics import binomial_ci
from .runner import PadResult, PadRun, TrialResult, VerificationRun

NonResponse = Literal["exclude", "reject"]
NON_RESPONSE_MODES: tuple[str, ...] = ("exclude", "reject")


def _rate(errors: int, trials: int) -> dict[str, Any]:
    if trials == 0:
        return {"errors": 0, "trials": 0, "rate": None, "ci95": None}
    return {"errors": errors, "trials": trials, "rate": errors / trials, "ci95": list(binomial_ci(errors, trials))}


def _group(results: Sequence[TrialResult | PadResult], error_when_accepted: bool,
           non_response: NonResponse) -> dict[str, Any]:
    """Decision counts of one class of trials. ``error_when_accepted``: an acceptance is the error
    (impostors, attacks); otherwise a refusal is (targets, bona fide)."""
    decided = [r.decision for r in results if r.failure is None]
    if any(d is None for d in decided):
        raise ValueError("a result without a failure has no decision: the scorer does not decide")
    decisions = [d for d in decided if d is not None]
    accepted = sum(1 for d in decisions if d.accepted)
    refused = len(decided) - accepted
    nr = len(results) - len(decided)
    errors = accepted if error_when_accepted else refused
    if non_response == "reject":
        trials = len(results)
        errors += 0 if error_when_accepted else nr
    else:
        trials = len(decided)
    refusals = Counter(d.refused_by for d in decisions if not d.accepted)
    refusals.update(f"{r.failure.layer}:{r.failure.reason}" for r in results if r.failure is not None)
    return {
        "presented": len(results),
        "accepted": accepted,
        "refused": refused,
        "non_responses": _rate(nr, len(results)),
        "error": _rate(errors, trials),
        "refused_by": dict(sorted(refusals.items())),
    }


def verification_decisions(run: VerificationRun, non_response: NonResponse = "exclude") -> dict[str, Any] | None:
    """FNMR / FMR of the system's decisions, and each attack type's acceptance (None: no decisions)."""
    if not run.has_decisions:
        return None
    targets = _group(run.of_kind("target"), False, non_response)
    nontargets = _group(run.of_kind("nontarget"), True, non_response)
    spoofs = run.of_kind("spoof")
    per_type = {t: _group([r for r in spoofs if r.trial.attack_type == t], True, non_response)
                for t in run.attack_types}
    out = {
        "non_response": non_response,
        "fnmr": targets["error"],
        "fmr": nontargets["error"],
        "targets": targets,
        "nontargets": nontargets,
    }
    if per_type:
        out["apcer_per_type"] = {t: g["error"] for t, g in per_type.items()}
        out["apcer_max"] = max((g["error"] for g in per_type.values()),
                               key=lambda e: -1.0 if e["rate"] is None else e["rate"])
        out["spoofs"] = per_type
    return out


def pad_decisions(run: PadRun, non_response: NonResponse = "exclude") -> dict[str, Any] | None:
    """APCER per attack type, APCER_max, BPCER of the system's decisions (None: no decisions)."""
    if not run.has_decisions:
        return None
    bona = _group([r for r in run.results if r.sample.bonafide], False, non_response)
    per_type = {t: _group([r for r in run.results if not r.sample.bonafide and r.sample.attack_type == t],
                          True, non_response) for t in run.attack_types}
    apcer = {t: g["error"] for t, g in per_type.items()}
    return {
        "non_response": non_response,
        "bpcer": bona["error"],
        "apcer_per_type": apcer,
        "apcer_max": max(apcer.values(), key=lambda e: -1.0 if e["rate"] is None else e["rate"]) if apcer else None,
        "bonafide": bona,
        "attacks": per_type,
    }


def summary(decisions: dict[str, Any]) -> Iterable[str]:
    """One line each for the command's output."""
    def pct(e: dict[str, Any]) -> str:
        return "n/a" if e["rate"] is None else f"{e['rate']:.2%} ({e['errors']}/{e['trials']})"

    if "fnmr" in decisions:
        yield f"system FNMR {pct(decisions['fnmr'])}, FMR {pct(decisions['fmr'])}"
    else:
        yield f"system BPCER {pct(decisions['bpcer'])}"
    for t, e in decisions.get("apcer_per_type", {}).items():
        yield f"APCER[{t}] {pct(e)}"
