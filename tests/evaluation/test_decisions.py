"""What the evaluation reports about the system's decisions: SASV trial lists (spoofed probes of the
enrolled identity), decisions with their refusing layer, non-responses excluded or counted as
rejections, per-trial CSV rows, and no EER or DET from binary decisions."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from evaluation_synthetic import EmbeddingScorer, build_pad_world, build_world

from services.common.evaluation import metrics as m
from services.common.evaluation import report as rp
from services.common.evaluation.runner import run_pad, run_verification
from services.common.evaluation.scorers import Decision, Failure, Scored
from services.common.evaluation.trials import read_pad, read_trials, write_trials
from tests.conftest import present

V = "face/verification"


def _csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


SASV_HEADER = ["enroll", "probe", "target", "trial_type", "enroll_identity", "probe_identity",
               "probe_presentation", "attack_type"]


@pytest.fixture
def world(tmp_path: Path) -> Path:
    build_world(tmp_path, n_ids=4, per_id=4)
    return tmp_path


def sasv_list(world: Path) -> Path:
    """id0..id3: targets, zero-effort impostors, and 'replays' of the enrolled person: another of
    their files presented as an attack (target 0, same identity), the SASV convention."""
    rows = []
    for k in range(4):
        rows.append([f"{V}/id{k}/0.npy", f"{V}/id{k}/1.npy", 1, "genuine", f"id{k}", f"id{k}", "genuine", ""])
        rows.append([f"{V}/id{k}/0.npy", f"{V}/id{(k + 1) % 4}/1.npy", 0, "impostor", f"id{k}", f"id{(k + 1) % 4}",
                     "genuine", ""])
        rows.append([f"{V}/id{k}/0.npy", f"{V}/id{k}/2.npy", 0, "spoof", f"id{k}", f"id{k}", "spoof", "replay"])
        rows.append([f"{V}/id{k}/0.npy", f"{V}/id{k}/3.npy", 0, "spoof", f"id{k}", f"id{k}", "spoof", "tts"])
    return _csv(world / "sasv.csv", SASV_HEADER, rows)


def test_sasv_lists_read_spoofed_probes_of_the_same_identity_as_non_targets(world: Path, tmp_path: Path):
    trials = read_trials(sasv_list(world))
    kinds = [t.kind for t in trials]
    assert kinds.count("target") == 4 and kinds.count("nontarget") == 4 and kinds.count("spoof") == 8
    assert {t.attack_type for t in trials if t.spoof} == {"replay", "tts"}
    # A spoof marked as a target, or a genuine probe of the same identity marked 0, is refused.
    bad = _csv(tmp_path / "bad.csv", SASV_HEADER, [[f"{V}/id0/0.npy", f"{V}/id0/2.npy", 1, "spoof", "id0", "id0",
                                                    "spoof", "replay"]])
    with pytest.raises(ValueError, match="non-target"):
        read_trials(bad, world)
    bad = _csv(tmp_path / "bad.csv", SASV_HEADER, [[f"{V}/id0/0.npy", f"{V}/id0/2.npy", 0, "x", "id0", "id0",
                                                    "genuine", ""]])
    with pytest.raises(ValueError, match="identities"):
        read_trials(bad, world)
    # The list written back reads the same.
    again = read_trials(write_trials(trials, tmp_path / "out.csv", world), world)
    assert [(t.kind, t.attack_type) for t in again] == [(t.kind, t.attack_type) for t in trials]


def test_spoofed_probes_are_reported_apart_from_zero_effort_impostors(world: Path):
    trials = read_trials(sasv_list(world))
    run = run_verification(EmbeddingScorer(), trials)
    assert run.genuine.size == 4 and run.impostor.size == 4
    assert {k: v.size for k, v in run.spoofs.items()} == {"replay": 4, "tts": 4}
    report = rp.verification_report(run, config={}, operating_fmr=0.25)
    assert report["counts"]["impostor"] == 4 and report["counts"]["spoofed"] == 8
    # FMR and EER use the zero-effort impostors only.
    assert report["eer"]["eer"] == pytest.approx(m.eer(run.genuine, run.impostor).eer)
    spoof = report["spoofed_probes"]["per_type"]["replay"]
    # These 'replays' are the person's own photos: the comparison alone accepts them as it accepts targets.
    assert spoof["spf_eer"]["eer"] == pytest.approx(m.eer(run.genuine, run.spoofs["replay"]).eer)
    t = report["operating_point"]["threshold"]
    assert spoof["accepted_by_comparison"]["errors"] == int(np.count_nonzero(run.spoofs["replay"] >= t))
    pooled = np.concatenate([run.impostor, *run.spoofs.values()])
    assert report["spoofed_probes"]["sasv_eer"]["eer"] == pytest.approx(m.eer(run.genuine, pooled).eer)


class LayeredScorer(EmbeddingScorer):
    """Decides like a system: the comparison at 0.5, then an anti-spoofing layer that refuses the
    probes named in ``spoofed`` and files ending in 3.npy give no answer (a non-response)."""

    def __init__(self, refuse: set[str]):
        super().__init__()
        self.refuse = refuse

    def score(self, handle, probe: Path):
        if probe.name == "3.npy" and probe.parent.name == "id3":
            return Failure("too_dark", "quality")
        s = super().score(handle, probe)
        assert isinstance(s, float), s
        layers = [("comparison", s >= 0.5), ("anti_spoofing", f"{probe.parent.name}/{probe.name}" not in self.refuse)]
        reasons = [c for (n, ok), c in zip(layers, ("NO_MATCH", "SPOOF_SUSPECTED"), strict=True) if not ok]
        return Scored(s, Decision.of_layers(layers, reasons))


def test_decisions_count_every_layer_and_non_responses_are_selectable(world: Path, tmp_path: Path):
    trials = read_trials(sasv_list(world))
    refuse = {f"id{k}/2.npy" for k in range(4)} | {"id0/1.npy"}  # every replay, and one genuine probe
    run = run_verification(LayeredScorer(refuse), trials)
    plain = run_verification(EmbeddingScorer(), trials)
    excl = rp.verification_report(run, config={}, operating_fmr=0.25)["decisions"]
    rej = rp.verification_report(run, config={}, operating_fmr=0.25, non_response="reject")["decisions"]
    # The genuine probe refused by the anti-spoofing layer is a false non-match of the system,
    # whatever its score: the decision, not the score at a threshold, is what the user gets.
    g0 = next(r for r in run.results if r.trial.kind == "target" and r.trial.enroll_identity == "id0")
    assert g0.score == plain.results[0].score and present(g0.decision).refused_by == "anti_spoofing"
    assert excl["targets"]["refused_by"].get("anti_spoofing") == 1
    expected_fn = sum(1 for r in run.of_kind("target") if not present(r.decision).accepted)
    assert excl["fnmr"]["errors"] == expected_fn and excl["fnmr"]["trials"] == 4
    # No replay gets through; each tts spoof is accepted exactly when it passes the comparison.
    assert excl["apcer_per_type"]["replay"]["errors"] == 0
    tts = [r for r in run.of_kind("spoof") if r.trial.attack_type == "tts"]
    decided = [r for r in tts if r.failure is None]
    assert excl["apcer_per_type"]["tts"] == {
        "errors": sum(present(r.score) >= 0.5 for r in decided), "trials": len(decided),
        "rate": sum(present(r.score) >= 0.5 for r in decided) / len(decided),
        "ci95": list(m.binomial_ci(sum(present(r.score) >= 0.5 for r in decided), len(decided)))}
    # id3's tts probe gave no answer: out of the rates by default, a rejection when asked.
    assert excl["spoofs"]["tts"]["non_responses"]["errors"] == 1
    assert excl["apcer_per_type"]["tts"]["trials"] == 3 and rej["apcer_per_type"]["tts"]["trials"] == 4
    assert rej["apcer_per_type"]["tts"]["errors"] == excl["apcer_per_type"]["tts"]["errors"]
    assert excl["spoofs"]["tts"]["refused_by"].get("quality:too_dark") == 1

    files = rp.write_verification_outputs(run, tmp_path / "out", rp.verification_report(run, config={}), root=world)
    rows = list(csv.DictReader(open(files["per_trial"], encoding="utf-8")))
    assert len(rows) == len(trials)
    by_probe = {(r["enroll"], r["probe"]): r for r in rows}
    row = by_probe[(f"{V}/id0/0.npy", f"{V}/id0/1.npy")]
    assert (row["kind"], row["accepted"], row["refused_by"], row["reasons"]) == ("target", "0", "anti_spoofing",
                                                                                   "SPOOF_SUSPECTED")
    assert float(row["score"]) == pytest.approx(g0.score, abs=1e-6)
    row = by_probe[(f"{V}/id3/0.npy", f"{V}/id3/3.npy")]
    assert (row["kind"], row["attack_type"], row["score"], row["failure_stage"], row["failure_reason"]) == (
        "spoof", "tts", "", "probe", "too_dark")


class DecisionOnlyPad:
    """A PAD system that answers live or not, never a score (as the face service's CheckLiveness)."""

    score_name = "live_decision"

    def score(self, path: Path):
        v = np.load(path)
        if v.size == 0:
            return Failure("no_face", "quality")
        return Scored(None, Decision.of_layers([("liveness", float(v[0]) >= 0.55)]))


def test_decision_only_pad_gives_rates_and_no_eer_or_det(tmp_path: Path):
    samples = read_pad(build_pad_world(tmp_path), tmp_path)
    run = run_pad(DecisionOnlyPad(), samples)
    report = rp.pad_report(run, config={})
    assert report["eer"] is None and report["bpcer_at_apcer"] == [] and report["apcer_at_bpcer"] == []
    d = report["decisions"]
    bona = [np.load(s.path) for s in samples if s.bonafide]
    expected_bpcer = sum(1 for v in bona if v.size and v[0] < 0.55)
    assert d["bpcer"]["errors"] == expected_bpcer and d["bpcer"]["trials"] == sum(1 for v in bona if v.size)
    assert set(d["apcer_per_type"]) == set(run.attack_types)
    files = rp.write_pad_outputs(run, tmp_path / "out", report)
    assert sorted(files) == ["per_trial", "report"]  # no scores, no histogram, no DET curve
    saved = json.loads(files["report"].read_text())
    assert saved["eer"] is None


def test_apcer_at_bpcer_and_eer_per_attack_type():
    bona = np.array([0.2, 0.6, 0.7, 0.8, 0.9] * 20)  # 100 bona fide
    attacks = {"print": np.array([0.1, 0.3, 0.5, 0.65] * 10), "replay": np.array([0.05, 0.15] * 20)}
    p = m.apcer_at_bpcer(bona, attacks, 0.1)  # fewer than the 20 bona fide 0.2s may be refused: none
    assert p.rates.threshold == 0.2 and p.rates.bpcer == 0.0
    assert p.rates.apcer == {"print": 0.75, "replay": 0.0}  # 0.3, 0.5 and 0.65 pass
    p = m.apcer_at_bpcer(bona, attacks, 0.2)  # the 0.2s may be refused: the threshold rises to 0.6
    assert p.rates.threshold == 0.6 and p.rates.bpcer == 0.2 and p.supported
    assert p.rates.apcer == {"print": 0.25, "replay": 0.0}
    per = m.pad_eer_per_type(bona, attacks)
    assert per["replay"].eer == 0.0 and per["print"].eer > 0.0
    assert per["print"].eer == pytest.approx(m.eer(bona, attacks["print"]).eer)


def test_the_command_runs_a_sasv_list_and_writes_every_trial(tmp_path: Path, capsys):
    """`biogate eval` on a list with spoofed probes of the enrolled identity (the list that made it
    exit before): the spoofs reported apart, one per-trial row each, no EER printed from decisions."""
    import shutil

    from test_cli import parse

    from services.commands import evaluation as cli
    from services.common.config import PROJECT_ROOT
    from services.settings import load_config
    from services.common.evaluation.scorers import unregister_scorer

    world = tmp_path / "world"
    build_world(world, n_ids=4, per_id=4)
    trials = sasv_list(world)
    manifest = tmp_path / "manifest.yaml"
    shutil.copy(PROJECT_ROOT / "models" / "manifest.yaml", manifest)
    settings = load_config(None, data_dir=str(tmp_path / "data"), models={"manifest": str(manifest)})
    saved = cli.SCORER_MODULES[("face", "verification", "local")]
    cli.SCORER_MODULES[("face", "verification", "local")] = "evaluation_synthetic:make_verification_scorer"
    unregister_scorer("face", "verification")
    try:
        args = parse(["eval", "--modality", "face", "--trials", str(trials), "--fixtures", str(world),
                      "--operating-rate", "0.25", "--out", str(tmp_path / "out")])
        assert args.func(settings, args) == 0
    finally:
        cli.SCORER_MODULES[("face", "verification", "local")] = saved
        unregister_scorer("face", "verification")
    printed = capsys.readouterr().out
    assert "SPF-EER[replay]" in printed and "per trial:" in printed
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["counts"]["spoofed"] == 8 and set(report["spoofed_probes"]["per_type"]) == {"replay", "tts"}
    rows = list(csv.DictReader(open(tmp_path / "out" / "per_trial.csv", encoding="utf-8")))
    assert len(rows) == 16 and sum(r["kind"] == "spoof" for r in rows) == 8
