"""`biogate eval` and `biogate calibrate` through argparse, with the synthetic scorers registered
the way a service registers its own, and the calibration written into a real manifest copy."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
import yaml
from evaluation_synthetic import EmbeddingScorer, build_pad_world, build_world

from services.common.config import PROJECT_ROOT
from services.settings import load_config
from services.commands import evaluation as cli
from services.common.evaluation.calibration import apply_llr, threshold_for
from services.common.evaluation.scorers import (
    ScorerOptions,
    get_scorer_factory,
    register_scorer,
    unregister_scorer,
)
from services.common.models.store import ModelStore
from tests.conftest import present


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="biogate")
    cli.register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


@pytest.fixture
def settings(tmp_path: Path):
    manifest = tmp_path / "manifest.yaml"
    shutil.copy(PROJECT_ROOT / "models" / "manifest.yaml", manifest)
    return load_config(None, data_dir=str(tmp_path / "data"), models={"manifest": str(manifest)})


@pytest.fixture
def synthetic_scorers(monkeypatch: pytest.MonkeyPatch):
    """Point the CLI's table at the test scorers, as services/<x>/evaluation.py would be."""
    for task, factory in (("verification", "make_verification_scorer"), ("pad", "make_pad_scorer")):
        monkeypatch.setitem(cli.SCORER_MODULES, ("face", task, "local"), f"evaluation_synthetic:{factory}")
        unregister_scorer("face", task)
    yield
    for task in ("verification", "pad"):
        unregister_scorer("face", task)


def test_scorer_lookup_imports_the_table_entry_lazily(settings, synthetic_scorers):
    assert get_scorer_factory("face", "verification") is None
    scorer = cli.load_scorer("face", "verification", ScorerOptions(settings, channel="selfie"))
    assert isinstance(scorer, EmbeddingScorer) and present(scorer.options).channel == "selfie"
    assert get_scorer_factory("face", "verification") is not None  # registered on first use


def test_a_registered_factory_wins_over_the_table(settings, synthetic_scorers):
    marker = EmbeddingScorer()
    register_scorer("face", "verification", lambda options: marker)
    assert cli.load_scorer("face", "verification", ScorerOptions(settings)) is marker


def test_missing_scorers_are_reported_clearly(settings, monkeypatch):
    monkeypatch.delitem(cli.SCORER_MODULES, ("voice", "pad", "remote"), raising=False)
    with pytest.raises(cli.ScorerUnavailable, match="no remote scorer for voice pad"):
        cli.load_scorer("voice", "pad", ScorerOptions(settings, target="127.0.0.1:50051"))
    monkeypatch.setitem(cli.SCORER_MODULES, ("voice", "pad", "local"), "no_such_module:make")
    unregister_scorer("voice", "pad")
    with pytest.raises(cli.ScorerUnavailable, match="no_such_module"):
        cli.load_scorer("voice", "pad", ScorerOptions(settings))


def test_eval_then_calibrate_into_the_manifest(settings, synthetic_scorers, tmp_path: Path):
    world = tmp_path / "world"
    build_world(world, n_ids=8, per_id=5, unusable=("id3/1.npy",))
    out = tmp_path / "eval"
    args = parse(["eval", "--modality", "face", "--all-pairs", "--fixtures", str(world),
                  "--out", str(out), "--channel", "selfie", "--target-fmr", "0.01", "0.001"])
    assert args.func(settings, args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["all_pairs"] is True and report["config"]["channel"] == "selfie"
    assert report["config"]["score"] == "cosine"
    assert report["counts"]["trials"] == 40 * 39 // 2
    assert [p["target"] for p in report["fnmr_at_fmr"]] == [0.01, 0.001]
    assert (out / "det.png").is_file() and (out / "histogram.png").is_file()

    model_id = ModelStore(settings).manifest.models[0].id
    args = parse(["calibrate", str(out / "report.json"), "--model", model_id, "--channel",
                  "selfie", "--target-fmr", "0.01", "--llr", "pav", "--out",
                  str(tmp_path / "record.json")])
    assert args.func(settings, args) == 0
    record = json.loads((tmp_path / "record.json").read_text())
    assert record["dataset"].startswith("all pairs of")
    scores = json.loads((out / "scores.json").read_text())
    assert record["trials"]["genuine"] == len(scores["genuine"]) + scores["genuine_failures"]

    stored = ModelStore(settings).model(model_id).calibration["selfie"]
    assert stored.threshold(0.01) == threshold_for(record, 0.01)
    assert stored.llr is not None and stored.llr.llr(0.4) == pytest.approx(apply_llr(record, 0.4))
    on_disk = yaml.safe_load(Path(settings.models.manifest).read_text())
    (entry,) = [m for m in on_disk["models"] if m["id"] == model_id]
    assert entry["calibration"]["selfie"]["operating_points"][0]["target_fmr"] == 0.01

    # A later eval can take its threshold from that manifest record.
    args = parse(["eval", "--modality", "face", "--all-pairs", "--fixtures", str(world),
                  "--out", str(tmp_path / "eval2"), "--model", model_id, "--channel", "selfie",
                  "--operating-rate", "0.01"])
    assert args.func(settings, args) == 0
    again = json.loads((tmp_path / "eval2" / "report.json").read_text())
    assert again["operating_point"]["source"] == "calibration"
    assert again["operating_point"]["threshold"] == pytest.approx(stored.threshold(0.01))
    assert again["calibration"]["llr_source"] == "calibration"


def test_eval_trials_csv_and_pad(settings, synthetic_scorers, tmp_path: Path, capsys):
    world = tmp_path / "world"
    build_world(world, n_ids=3, per_id=2)
    (world / "trials_face.csv").write_text(
        "enroll,probe,target\n"
        "face/verification/id0/0.npy,face/verification/id0/1.npy,1\n"
        "face/verification/id0/0.npy,face/verification/id1/1.npy,0\n"
    )
    args = parse(["eval", "--modality", "face", "--fixtures", str(world), "--out",
                  str(tmp_path / "v")])
    assert args.func(settings, args) == 0
    assert json.loads((tmp_path / "v" / "report.json").read_text())["config"]["dataset"] == (
        "world/trials_face.csv"
    )
    assert "EER 0.00%" in capsys.readouterr().out

    pad_csv = build_pad_world(world)
    args = parse(["eval", "--modality", "face", "--task", "pad", "--trials", str(pad_csv),
                  "--fixtures", str(world), "--out", str(tmp_path / "pad")])
    assert args.func(settings, args) == 0
    report = json.loads((tmp_path / "pad" / "report.json").read_text())
    assert report["config"]["score"] == "p_live"
    assert report["non_response"]["bpnrr"]["failures"] == 1

    # 44 scored attacks support neither APCER 5 % (60 needed) nor 1 % (300): refused, nothing written ...
    calibrate = ["calibrate", str(tmp_path / "pad" / "scores.json"), "--llr", "none",
                 "--out", str(tmp_path / "pad-record.json"), "--notes", "APCER 5 %: the service's target"]
    args = parse(calibrate)
    with pytest.raises(cli.UnsupportedTargets, match="nothing written: APCER 5e-2 needs >= 60 attack presentations"
                                                     ", the calibration has 44; APCER 1e-2 needs >= 300"):
        args.func(settings, args)
    assert not (tmp_path / "pad-record.json").exists()
    assert "APCER 5e-2: threshold" in capsys.readouterr().out
    # ... unless asked to keep them, marked.
    args = parse([*calibrate, "--keep-unsupported"])
    assert args.func(settings, args) == 0
    record = json.loads((tmp_path / "pad-record.json").read_text())
    assert [p["target_fmr"] for p in record["operating_points"]] == [0.05, 0.01]
    assert [p["supported"] for p in record["operating_points"]] == [False, False]
    assert record["rate"] == "APCER" and record["trials"] == {"genuine": 29, "impostor": 44}
    assert record["score"] == "p_live" and "llr" not in record
    assert record["notes"] == "APCER 5 %: the service's target"
    assert "UNSUPPORTED: APCER 5e-2 needs >= 60" in capsys.readouterr().out


def test_eval_rejects_all_pairs_for_pad(settings, synthetic_scorers):
    args = parse(["eval", "--modality", "face", "--task", "pad", "--all-pairs"])
    with pytest.raises(ValueError, match="verification only"):
        args.func(settings, args)


def test_eval_model_needs_a_channel(settings, synthetic_scorers):
    args = parse(["eval", "--modality", "face", "--model", "some-model"])
    with pytest.raises(ValueError, match="--model needs --channel"):
        args.func(settings, args)


def test_calibrate_rejects_other_json(settings, tmp_path: Path):
    (tmp_path / "x.json").write_text('{"hello": 1}')
    args = parse(["calibrate", str(tmp_path / "x.json")])
    with pytest.raises(ValueError, match="not a scores or report file"):
        args.func(settings, args)


def test_calibrate_refusing_an_unsupported_target_exits_non_zero_and_leaves_the_manifest(
        settings, synthetic_scorers, tmp_path: Path, capsys, monkeypatch):
    from services.cli import main

    world = tmp_path / "world"
    build_world(world, n_ids=8, per_id=5)  # 700 impostor pairs: FMR 1e-2 needs 300, 1e-3 needs 3,000
    args = parse(["eval", "--modality", "face", "--all-pairs", "--fixtures", str(world), "--out", str(tmp_path / "e")])
    assert args.func(settings, args) == 0
    model_id = ModelStore(settings).manifest.models[0].id
    before = Path(settings.models.manifest).read_text()
    argv = ["calibrate", str(tmp_path / "e" / "report.json"), "--model", model_id, "--channel", "selfie",
            "--target-fmr", "0.01", "0.001"]
    capsys.readouterr()
    monkeypatch.setenv("BIOGATE_MODELS__MANIFEST", str(settings.models.manifest))
    monkeypatch.setenv("BIOGATE_DATA_DIR", str(settings.data_dir))
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "nothing written: FMR 1e-3 needs >= 3,000 impostor trials, the calibration has 700" in err
    assert "--keep-unsupported" in err
    assert Path(settings.models.manifest).read_text() == before
    assert main([*argv, "--keep-unsupported"]) == 0
    stored = ModelStore(settings).model(model_id).calibration["selfie"]
    assert [(p.target_fmr, p.supported) for p in stored.operating_points] == [(0.01, True), (0.001, False)]
    assert present(stored.point(0.001)).trials.impostor == 700


def test_eval_all_pairs_of_a_people_list_split_by_name_parity(settings, synthetic_scorers, tmp_path: Path):
    from services.common.evaluation.trials import read_trials

    world = tmp_path / "world"
    build_world(world, n_ids=8, per_id=5)  # MANIFEST.csv has the path and identity columns of a people list
    runs = {}
    for part in ("even", "odd"):
        out = tmp_path / part
        args = parse(["eval", "--modality", "face", "--all-pairs", "MANIFEST.csv", "--people", part,
                      "--fixtures", str(world), "--out", str(out)])
        assert args.func(settings, args) == 0
        report = json.loads((out / "report.json").read_text())
        assert report["counts"] == report["counts"] | {"trials": 190, "genuine": 40, "impostor": 150}
        assert report["config"]["people"] == part and f"people at {part} positions" in report["config"]["dataset"]
        trials = read_trials(out / "trials.csv", world)  # the generated list, as a trials CSV
        assert len(trials) == 190
        runs[part] = {t.enroll_identity for t in trials} | {t.probe_identity for t in trials}
    assert runs == {"even": {"id0", "id2", "id4", "id6"}, "odd": {"id1", "id3", "id5", "id7"}}

    args = parse(["eval", "--modality", "face", "--people", "odd", "--fixtures", str(world)])
    with pytest.raises(ValueError, match="--people splits an --all-pairs list"):
        args.func(settings, args)


def test_a_command_other_than_eval_does_not_load_the_plotting_libraries():
    """matplotlib and scipy.stats (about 2 s of CPU at import) load only when a report is written:
    every `biogate` command builds the whole parser, the eval command's included, and the suite
    and the operators start it many times (services, keys, migrations)."""
    import subprocess
    import sys

    code = ("import sys; from services.cli import build_parser; build_parser().parse_args(['keys', 'list']); "
            "print(sorted(m for m in ('matplotlib', 'scipy.stats') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True,
                         timeout=120, env={"PYTHONPATH": str(PROJECT_ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
