"""`biogate eval` and `biogate calibrate`.

eval       run a scorer over a trial list (or all pairs of MANIFEST.csv or of a list of people's
           files, optionally one part of a people-disjoint split, or a PAD list) and write
           report.json, scores.json and PNG plots to --out.
calibrate  fit thresholds for target FMRs (APCERs for PAD) and an LLR map from an eval's
           scores.json, and write the record into the model manifest for --model / --channel.
           A target the trials do not support (rule of three) is refused unless --keep-unsupported
           writes it marked unsupported.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import sys
from pathlib import Path
from typing import Any, Callable, cast

from services.common.config import PROJECT_ROOT
from services.settings import Settings
from services.common.models.calibration import rate_text

from services.common.evaluation import calibration as cal
from services.common.evaluation import decisions as dec
from services.common.evaluation import metrics as m
from services.common.evaluation.runner import run_pad, run_verification
from services.common.evaluation.scorers import (Mode, PadScorer, Scorer, ScorerOptions, VerificationScorer,
                                                get_scorer_factory, register_scorer)
from services.common.evaluation.trials import (PEOPLE_PARTS, PadSample, all_pairs, read_manifest, read_pad, read_people, read_trials, split_people,
                     write_trials)

DEFAULT_FIXTURES = PROJECT_ROOT.parent / "shared" / "fixtures"

# Where each scorer lives: "module:factory", imported only when that scorer is asked for.
# Services may also call register_scorer() themselves; a registered factory wins.
# Remote ("--target host:port") scorers talk gRPC to a running service; none are written yet.
SCORER_MODULES: dict[tuple[str, str, Mode], str] = {
    ("face", "verification", "local"): "services.face.evaluation:make_verification_scorer",
    ("face", "pad", "local"): "services.face.evaluation:make_pad_scorer",
    ("face", "verification", "remote"): "services.face.remote:make_remote_verification_scorer",
    ("face", "pad", "remote"): "services.face.remote:make_remote_pad_scorer",
    ("voice", "verification", "local"): "services.voice.evaluation:make_verification_scorer",
    ("voice", "pad", "local"): "services.voice.evaluation:make_pad_scorer",
    ("voice", "verification", "remote"): "services.voice.remote_eval:make_remote_verification_scorer",
}

SCORE_NAMES = {"verification": "cosine", "pad": "p_bonafide"}


class ScorerUnavailable(LookupError):
    pass


class UnsupportedTargets(ValueError):
    """`biogate calibrate` was asked for targets its trials cannot support."""


def load_scorer(modality: str, task: str, options: ScorerOptions) -> Scorer:
    mode: Mode = "remote" if options.target else "local"
    factory = get_scorer_factory(modality, task, mode)
    if factory is None:
        spec = SCORER_MODULES.get((modality, task, mode))
        if spec is None:
            raise ScorerUnavailable(f"no {mode} scorer for {modality} {task}")
        module_name, _, attr = spec.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            raise ScorerUnavailable(f"{modality} {task} scorer {spec}: {err}") from err
        factory = getattr(module, attr, None)
        if factory is None:
            raise ScorerUnavailable(f"{module_name} has no {attr}")
        register_scorer(modality, task, factory, mode)
    return factory(options)


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def _load_calibration(settings: Settings, args: argparse.Namespace) -> dict[str, Any] | None:
    if args.calibration:
        return json.loads(Path(args.calibration).read_text(encoding="utf-8"))
    if args.model:
        if not args.channel:
            raise ValueError("--model needs --channel: calibrations are kept per channel")
        from services.common.models.store import ModelStore

        record = ModelStore(settings).model(args.model).calibration.get(args.channel)
        if record is None:
            raise LookupError(f"model {args.model} has no calibration for channel {args.channel!r}")
        return record.model_dump(mode="json")
    return None


def _progress(done: int, total: int) -> None:
    if done == total or done % 500 == 0:
        print(f"  {done}/{total}", file=sys.stderr, flush=True)


def _eval(settings: Settings, args: argparse.Namespace) -> int:
    from services.common.evaluation.report import (DEFAULT_TARGET_BPCERS, pad_report,  # matplotlib: only when reporting
                                                   verification_report, write_pad_outputs, write_verification_outputs)
    fixtures = Path(args.fixtures)
    calibration = _load_calibration(settings, args)
    options = ScorerOptions(settings=settings, channel=args.channel, target=args.target, tenant=args.tenant,
                            decide=not args.scores_only)
    all_pairs_of = args.all_pairs
    if all_pairs_of is not None and args.task != "verification":
        raise ValueError("--all-pairs applies to verification only")
    if args.people != "all" and all_pairs_of is None:
        raise ValueError("--people splits an --all-pairs list; give --all-pairs")
    items: list[Any]
    if all_pairs_of is not None:
        if all_pairs_of:
            listed = Path(all_pairs_of) if Path(all_pairs_of).is_absolute() else fixtures / all_pairs_of
            entries = read_people(listed, args.modality)
        else:
            listed = fixtures / "MANIFEST.csv"
            entries = read_manifest(fixtures)
        people = "" if args.people == "all" else f", people at {args.people} positions of the sorted names"
        source = f"all pairs of {_relative(listed, fixtures.parent)} ({args.modality}{people})"
        items = all_pairs(split_people(entries, args.people), args.modality)
        if not items:
            raise ValueError(f"{listed}: no {args.modality} pairs to score")
    else:
        default = "trials_{}.csv" if args.task == "verification" else "pad_{}.csv"
        csv_path = Path(args.trials) if args.trials else fixtures / default.format(args.modality)
        source = _relative(csv_path, fixtures.parent)
        reader: Callable[[Path, Path], list[Any]] = read_trials if args.task == "verification" else read_pad
        items = reader(csv_path, fixtures)
    scorer = load_scorer(args.modality, args.task, options)
    score_name = getattr(scorer, "score_name", SCORE_NAMES[args.task])
    config = {
        "name": f"{args.modality} {args.task}",
        "modality": args.modality,
        "task": args.task,
        "dataset": source,
        "all_pairs": all_pairs_of is not None,
        "people": args.people,
        "channel": args.channel,
        "target": args.target,
        "model": args.model,
        "scorer": type(scorer).__module__ + "." + type(scorer).__qualname__,
        "score": score_name,
        "non_response": args.non_response,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "tool_version": cal.tool_version().replace("calibrate", "eval"),
    }
    out = Path(args.out) if args.out else settings.data_dir / "eval" / f"{args.modality}-{args.task}"
    if all_pairs_of is not None:  # the generated list, kept with the report it produced
        print(f"trials: {write_trials(items, out / 'trials.csv', listed.parent)}")
    root = fixtures if all_pairs_of is None else listed.parent
    if args.task == "verification":
        run = run_verification(cast(VerificationScorer, scorer), items, _progress)  # the task chose the kind
        report = verification_report(
            run, config=config, target_fmrs=args.target_fmr or m.DEFAULT_TARGET_FMRS,
            operating_fmr=args.operating_rate or 1e-3, calibration=calibration, non_response=args.non_response,
        )
        files = write_verification_outputs(run, out, report, score_name, root)
        summary = ([f"EER {report['eer']['eer']:.2%}"] if report["eer"] is not None else []) + [
            f"FNMR@FMR{p['target']:g} {p['fnmr']:.2%}{'' if p['supported'] else ' (unsupported)'}"
            for p in report["fnmr_at_fmr"]
        ]
        for t, p in report.get("spoofed_probes", {}).get("per_type", {}).items():
            if "spf_eer" in p:
                summary.append(f"SPF-EER[{t}] {p['spf_eer']['eer']:.2%}")
        for p in report.get("calibrated_points", []):
            fmr, fnmr = p["fmr"], p["fnmr"]
            summary.append(
                f"calibrated {rate_text(p['target_fmr'])} (threshold {p['threshold']:.4f}): FMR "
                f"{fmr['errors']}/{fmr['trials']} [{fmr['ci95'][0]:.2e}, {fmr['ci95'][1]:.2e}]"
                f"{'' if p['consistent_with_target'] else ' ABOVE TARGET'}, FNMR {fnmr['errors']}/{fnmr['trials']}")
    else:
        pad_run = run_pad(cast(PadScorer, scorer), cast(list[PadSample], items), _progress)
        report = pad_report(
            pad_run, config=config, target_apcers=args.target_fmr or m.DEFAULT_TARGET_APCERS,
            operating_apcer=args.operating_rate or 5e-2, calibration=calibration,
            target_bpcers=args.target_bpcer or DEFAULT_TARGET_BPCERS, non_response=args.non_response,
        )
        files = write_pad_outputs(pad_run, out, report, score_name, root)
        summary = [f"BPNRR {report['non_response']['bpnrr']['rate']}"]
        if report["eer"] is not None:
            summary.insert(0, f"PAD EER {report['eer']['eer']:.2%}")
            summary += [f"EER[{t}] {e['eer']:.2%}" for t, e in report["eer_per_type"].items()]
            summary += [f"APCER_max@BPCER{p['target_bpcer']:g} {p['rates']['apcer_max']:.2%}"
                        for p in report["apcer_at_bpcer"]]
    if "decisions" in report:
        summary += list(dec.summary(report["decisions"]))
    print(f"{config['name']}: " + ", ".join(summary))
    print(f"report: {files['report']}")
    print(f"per trial: {files['per_trial']}")
    return 0


def _read_scores(path: Path) -> tuple[dict[str, Any], str]:
    """A scores.json, or a report.json pointing at its scores file; also the dataset name."""
    from services.common.evaluation.report import REPORT_FILE  # matplotlib: only when reporting
    data = json.loads(path.read_text(encoding="utf-8"))
    dataset = str(path)
    if data.get("kind") in ("verification", "pad") and "files" in data:
        dataset = data.get("config", {}).get("dataset", dataset)
        data = json.loads((path.parent / data["files"]["scores"]).read_text(encoding="utf-8"))
    elif (path.parent / REPORT_FILE).is_file():
        report = json.loads((path.parent / REPORT_FILE).read_text(encoding="utf-8"))
        dataset = report.get("config", {}).get("dataset", dataset)
    if data.get("kind") not in ("verification", "pad"):
        raise ValueError(f"{path}: not a scores or report file from `biogate eval`")
    return data, dataset


def held_out_checks(report: dict[str, Any], record: dict[str, Any]) -> dict[float, dict[str, Any]]:
    """target -> the ``held_out`` entry of each of the record's points that ``report`` (an eval on
    other data, run at the record's thresholds: ``--calibration`` or ``--model``) measured. A
    report made at other thresholds is refused: it checks another record."""
    points = report.get("calibrated_points")
    if not points:
        raise ValueError("the --check report has no calibrated points: run `biogate eval` on the held-out data "
                         "with --calibration RECORD (or --model/--channel) first")
    dataset = report.get("config", {}).get("dataset") or "held-out data"
    out = {}
    for p in record["operating_points"]:
        match = next((c for c in points if abs(c["target_fmr"] - p["target_fmr"]) <= 1e-12 * max(1.0, p["target_fmr"])), None)
        if match is None:
            continue
        if abs(match["threshold"] - p["threshold"]) > 1e-9 * max(1.0, abs(p["threshold"])):
            raise ValueError(f"the --check report measured {rate_text(p['target_fmr'])} at threshold "
                             f"{match['threshold']:.6g}, the record's is {p['threshold']:.6g}: it checks another record")
        fmr, fnmr = match["fmr"], match["fnmr"]
        if not fmr["trials"] or not fnmr["trials"]:
            raise ValueError(f"the --check report scored no impostor or genuine trials at {rate_text(p['target_fmr'])}")
        pp = match.get("people_pairs")
        attack = fmr.get("attack_type")
        note = (f"false matches from {pp['with_false_matches']} of {pp['scored']:,} people pairs" if pp else
                f"the worst attack type: {attack}" if attack else "")
        out[p["target_fmr"]] = {
            "dataset": dataset, "trials": {"genuine": fnmr["trials"], "impostor": fmr["trials"]},
            "fmr": fmr["rate"], "fmr_ci95": list(fmr["ci95"]), "fnmr": fnmr["rate"],
            "consistent": fmr["ci95"][0] <= p["target_fmr"], "date": dt.date.today().isoformat(), "notes": note,
        }
    if not out:
        raise ValueError("the --check report measured none of the record's targets")
    return out


def _with_checks(record: dict[str, Any], checks: dict[float, dict[str, Any]]) -> dict[str, Any]:
    points = [dict(p, held_out=checks[p["target_fmr"]]) if p["target_fmr"] in checks else p
              for p in record["operating_points"]]
    return dict(record, operating_points=points)


def _calibrate(settings: Settings, args: argparse.Namespace) -> int:
    from services.common.evaluation.report import write_json  # matplotlib: only when reporting
    check = json.loads(Path(args.check).read_text(encoding="utf-8")) if args.check else None
    if args.scores is None:
        return _attach_check(settings, args, check)
    scores, dataset = _read_scores(Path(args.scores))
    pad = scores["kind"] == "pad"
    targets = args.target_fmr or (m.DEFAULT_TARGET_APCERS if pad else m.DEFAULT_TARGET_FMRS)
    record = cal.calibration_record(
        scores["bonafide"] if pad else scores["genuine"],
        scores["attacks"] if pad else scores["impostor"],
        target_fmrs=targets,
        dataset=args.dataset or dataset,
        llr_kind=None if args.llr == "none" else args.llr,
        score_name=scores.get("score", SCORE_NAMES[scores["kind"]]),
        prior=args.prior,
        genuine_failures=0 if pad else int(scores.get("genuine_failures", 0)),
    )
    if args.notes:
        record["notes"] = args.notes
    if check is not None:
        record = _with_checks(record, held_out_checks(check, record))
    rate, unsupported = record["rate"], []
    for p in record["operating_points"]:
        n = p["trials"]
        status = "supported" if p["supported"] else f"UNSUPPORTED: {p['why']}"
        print(f"{rate} {rate_text(p['target_fmr'])}: threshold {p['threshold']:.6g}, measured {rate} {p['fmr']:.3%}, "
              f"{'BPCER' if pad else 'FNMR'} {p['fnmr']:.2%} on {n['impostor']:,} / {n['genuine']:,} trials; {status}")
        if p.get("held_out"):
            print("  " + _check_text(rate, p["held_out"]))
        if not p["supported"]:
            unsupported.append(p)
    if unsupported and not args.keep_unsupported:
        raise UnsupportedTargets(
            f"nothing written: {'; '.join(p['why'] for p in unsupported)}. Calibrate on more data, drop the "
            "target from --target-fmr, or pass --keep-unsupported to write it marked unsupported (services "
            "then refuse it)")
    if args.out:
        print(f"record: {write_json(record, args.out)}")
    if args.model:
        from services.common.models.store import ModelStore

        ModelStore(settings).update_calibration(args.model, args.channel, record)
        print(f"manifest: {args.model} [{args.channel}] calibration updated")
    elif not args.out:
        print(json.dumps(record, indent=2))
    return 0


def _check_text(rate: str, h: dict[str, Any]) -> str:
    lo, hi = h["fmr_ci95"]
    return (f"held out ({h['dataset']}): {rate} {h['fmr']:.2e} [{lo:.1e}, {hi:.1e}] on {h['trials']['impostor']:,}, "
            f"{'consistent' if h['consistent'] else 'NOT consistent'} with the target")


def _attach_check(settings: Settings, args: argparse.Namespace, check: dict[str, Any] | None) -> int:
    """`biogate calibrate --check REPORT --model M --channel C`: the manifest's record, its points
    carrying the held-out check of REPORT."""
    if check is None or not args.model:
        raise ValueError("give the eval's scores to calibrate, or --check REPORT with --model and --channel to "
                         "attach a held-out check to the manifest's record")
    from services.common.models.store import ModelStore

    store = ModelStore(settings)
    existing = store.model(args.model).calibration.get(args.channel)
    if existing is None:
        raise LookupError(f"model {args.model} has no calibration for channel {args.channel!r}")
    record = _with_checks(existing.model_dump(mode="json", exclude_none=True),
                          held_out_checks(check, existing.model_dump(mode="json")))
    if args.notes:  # what the new check says about the record (its thresholds are kept)
        record["notes"] = args.notes
    for p in record["operating_points"]:
        if p.get("held_out"):
            print(f"{record['rate']} {rate_text(p['target_fmr'])}: " + _check_text(record["rate"], p["held_out"]))
    store.update_calibration(args.model, args.channel, record)
    print(f"manifest: {args.model} [{args.channel}] held-out check attached")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from services.common.evaluation.report import REPORT_FILE, SCORES_FILE  # matplotlib: only when reporting
    p = subparsers.add_parser("eval", help="measure a face or voice scorer on a trial list")
    p.add_argument("--modality", choices=("face", "voice"), required=True)
    p.add_argument("--task", choices=("verification", "pad"), default="verification")
    p.add_argument("--trials", help="trials or PAD CSV (default: the fixtures' list for the task)")
    p.add_argument("--fixtures", default=str(DEFAULT_FIXTURES),
                   help="the folder the CSV paths are relative to (default: %(default)s)")
    p.add_argument("--all-pairs", nargs="?", const="", metavar="LIST",
                   help="every pair of the modality's verification files in MANIFEST.csv, or with LIST "
                        "(relative to --fixtures) every pair of the files of a list with columns path and "
                        "identity, e.g. face/identities/SOURCES.csv; the trials go to <out>/trials.csv")
    p.add_argument("--people", choices=PEOPLE_PARTS, default="all",
                   help="with --all-pairs: only the people at even / odd positions of the sorted identity "
                        "names (a people-disjoint split: calibrate on one part, check on the other)")
    p.add_argument("--out", help="output folder (default: <data_dir>/eval/<modality>-<task>)")
    p.add_argument("--target", metavar="HOST:PORT", help="score through a running service")
    p.add_argument("--channel", help="capture channel, e.g. mobile-selfie or telephony-8k")
    p.add_argument("--model", help="model id whose manifest calibration gives the threshold")
    p.add_argument("--calibration", help="calibration record JSON giving the threshold and LLRs")
    p.add_argument("--target-fmr", type=float, nargs="+",
                   help="FMR targets to report (APCER targets for PAD)")
    p.add_argument("--operating-rate", type=float,
                   help="FMR (APCER) of the operating threshold (default 1e-3; PAD 0.05)")
    p.add_argument("--target-bpcer", type=float, nargs="+",
                   help="PAD: BPCER targets at which to report each attack type's APCER (default 0.01 0.05)")
    p.add_argument("--non-response", choices=dec.NON_RESPONSE_MODES, default="exclude",
                   help="the system's decisions: leave non-responses (failures to acquire) out of the error "
                        "rates and report them apart as APNRR/BPNRR (exclude, ISO/IEC 30107-3), or count them "
                        "as rejections (reject)")
    p.add_argument("--tenant", help="with --target: the tenant whose policy the service applies "
                                    "(default: the scorer's evaluation tenant)")
    p.add_argument("--scores-only", action="store_true",
                   help="local scorers: scores only, no decision at the calibrated thresholds (e.g. before the "
                        "first calibration)")
    p.set_defaults(func=_eval)

    p = subparsers.add_parser("calibrate", help="fit thresholds and an LLR map from eval scores")
    p.add_argument("scores", nargs="?", help=f"{SCORES_FILE} or {REPORT_FILE} written by `biogate eval` (omit with "
                                             "--check and --model to attach a check to the manifest's record)")
    p.add_argument("--check", metavar="REPORT",
                   help="the report of `biogate eval` on held-out data at this record's thresholds (--calibration "
                        "or --model): each point it measured carries it as held_out {dataset, trials, fmr, "
                        "fmr_ci95, fnmr, consistent}")
    p.add_argument("--model", help="model id whose manifest calibration to write")
    p.add_argument("--channel", default="default", help="capture channel (default: %(default)s)")
    p.add_argument("--target-fmr", type=float, nargs="+",
                   help="target FMRs (APCERs for PAD); default 1e-2 1e-3 1e-4 (PAD 0.05 0.01)")
    p.add_argument("--llr", choices=("logistic", "pav", "none"), default="logistic")
    p.add_argument("--prior", type=float, default=0.5, help="target prior for the LLR fit")
    p.add_argument("--dataset", help="dataset name for the record (default: from the report)")
    p.add_argument("--notes", help="the record's notes: why these targets, what the operating point is for (with "
                                    "--check alone: replaces the manifest record's notes)")
    p.add_argument("--out", help="also write the record to this JSON file")
    p.add_argument("--keep-unsupported", action="store_true",
                   help="write targets the trials do not support (fewer than 3/target impostor or attack "
                        "trials), marked unsupported, which services refuse; without it they are refused")
    p.set_defaults(func=_calibrate)
