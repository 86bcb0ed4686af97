"""`biogate eval --target` against a real FaceService process: the acceptance figures of the face
service, and (with --calibrate) the manifest calibrations they come from.

Starts `biogate serve face` on a free loopback port with a temporary data dir, then runs, through
gRPC: verification on trials_face.csv (EER), on all pairs of MANIFEST.csv (more impostor trials,
the calibration set), and PAD on pad_face.csv (APCER/BPCER of the service's own live decision).
The PAD EER needs scores, which the service never returns: it comes from the in-process scorer
(the service's pipeline code), which is also what the liveness calibration is fitted on; the
service's run reports its decisions (APCER per attack type, BPCER, non-responses) only.

    .venv/bin/python -m bench.face_service_eval [--calibrate] [--out var/eval/face-service]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import services.face.remote  # noqa: F401  - registers the remote (--target) scorers
from bench.eval_common import run
from bench.harness import MODEL_CACHE, ROOT, ServiceProcess

EMBEDDER = "mobilefacenet-arcface-192d"
LIVENESS = ("minifasnet-v2-2.7", "minifasnet-v1se-4.0")


def summary(report: Path) -> dict:
    r = json.loads(report.read_text())
    out = {"dataset": r["config"]["dataset"], "target": r["config"]["target"]}
    if r.get("eer"):
        out["eer"] = r["eer"]["eer"]
    for key in ("trials", "fte", "fta", "operating_point", "error_rates"):
        if key in r:
            out[key] = r[key]
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calibrate", action="store_true", help="write the calibrations into models/manifest.yaml")
    ap.add_argument("--out", default=str(ROOT / "var" / "eval" / "face-service"))
    a = ap.parse_args()
    out = Path(a.out)
    with tempfile.TemporaryDirectory(prefix="face-eval-") as tmp:
        data = Path(tmp) / "data"
        svc = ServiceProcess("face", data_dir=Path(tmp))
        os.environ["BIOGATE_DATA_DIR"] = str(data)  # the scorer records consents in the service's storage
        os.environ["BIOGATE_LOGGING__LEVEL"] = "WARNING"
        os.environ.setdefault("BIOGATE_MODELS__CACHE_DIR", str(MODEL_CACHE))
        try:
            svc.start()
            target = ["--target", svc.address]
            run(["eval", "--modality", "face", "--all-pairs", *target, "--out", str(out / "all-pairs")])
            if a.calibrate:
                run(["calibrate", str(out / "all-pairs" / "report.json"), "--model", EMBEDDER, "--channel", "default",
                     "--dataset", "fixtures/MANIFEST.csv all pairs (face), through the FaceService"])
            run(["eval", "--modality", "face", *target, "--model", EMBEDDER, "--channel", "default",
                 "--out", str(out / "trials")])
            run(["eval", "--modality", "face", "--task", "pad", "--model", LIVENESS[0], "--channel", "default",
                 "--out", str(out / "pad-local")])
            if a.calibrate:
                for model in LIVENESS:
                    run(["calibrate", str(out / "pad-local" / "report.json"), "--model", model, "--channel", "default",
                         "--dataset", "fixtures/pad_face.csv (score: mean of minifasnet-v2-2.7 and minifasnet-v1se-4.0)"])
            run(["eval", "--modality", "face", "--task", "pad", *target, "--out", str(out / "pad-service")])
            rss = svc.peak_rss_mb()
        finally:
            svc.stop()
    print(f"face service peak RSS {rss:.0f} MB")
    for name in ("trials", "all-pairs", "pad-local"):
        print(name, json.dumps(summary(out / name / "report.json"), default=str)[:1500])
    decisions = json.loads((out / "pad-service" / "report.json").read_text())["decisions"]
    apcer = {t: e["rate"] for t, e in decisions["apcer_per_type"].items()}
    print(f"service live decision on pad_face.csv: APCER {apcer}, BPCER {decisions['bpcer']['rate']:.4f} "
          f"({decisions['bpcer']['trials']} bona fide), non-responses {decisions['bonafide']['non_responses']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
