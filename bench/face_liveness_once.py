"""Passive liveness in face Verify: inferences and time per probe, the probe analysis before and after
the change that scores liveness once, on the view chosen (services/face/service.py FaceService._probe).

    .venv/bin/python -m bench.face_liveness_once [--repeat 3] [--every N]

Every trial of trials_face.csv: the enrolment image's template (turned upright, as Enroll does),
then the probe analysed both ways, interleaved (order alternating), on the CPU: the liveness
inferences each made (a counter on the real models' calls) and its time. The threshold is the
embedder's calibrated one at the default face.target_fmr, as Verify uses.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from types import SimpleNamespace

import numpy as np

from services.common.config import PROJECT_ROOT
from services.common.models import ModelStore
from services.face.imaging import decode_image
from services.face.models import pipeline_config
from services.face.pipeline import FaceAnalysis, FacePipeline
from services.face.service import FaceService
from services.settings import load_config

FIXTURES = PROJECT_ROOT.parent / "shared" / "fixtures"
EMBEDDER = "mobilefacenet-arcface-192d"


def probe_before(pipeline: FacePipeline, image: np.ndarray, template: np.ndarray, threshold: float) -> FaceAnalysis:
    """FaceService._probe as it was (commit f6a9b19): every analysed view's face scored for liveness."""
    a = pipeline.analyse_image(image, liveness=True)
    if a.accepted and float(np.dot(template, a.embeddings[EMBEDDER])) >= threshold:
        return a
    turned = pipeline.analyse_image(image, upright=True, liveness=True)
    return turned if turned.rotation else a


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3, help="timed runs of each probe, each way")
    ap.add_argument("--every", type=int, default=1, help="every N-th trial only")
    args = ap.parse_args()
    settings = load_config(None, data_dir="/tmp/biogate-bench-liveness-once",
                           models={"cache_dir": str(PROJECT_ROOT / "var" / "models")})
    store = ModelStore(settings)
    target = settings.face.target_fmr
    calibration = store.calibration(EMBEDDER, "default")
    assert calibration is not None
    [point] = [p for p in calibration.operating_points if p.target_fmr == target]
    pipeline = FacePipeline(pipeline_config(store, providers=("CPUExecutionProvider",)))
    service = SimpleNamespace(_pipeline=lambda: pipeline, model_id=EMBEDDER)  # FaceService._probe's needs
    calls: list[int] = []
    real = pipeline.liveness.score_crops  # type: ignore[union-attr]

    def counted(crops):
        calls.append(len(crops))
        return real(crops)
    pipeline.liveness.score_crops = counted  # type: ignore[union-attr, method-assign]

    ways = {"before": lambda img, t: probe_before(pipeline, img, t, point.threshold),
            "after": lambda img, t: FaceService._probe(service, img, t, point.threshold, True, None)}  # type: ignore[arg-type]
    rows = list(csv.DictReader(open(FIXTURES / "trials_face.csv", newline="")))[:: args.every]
    stats: dict[tuple[str, str], dict[str, list[float]]] = {}
    for i, row in enumerate(rows):
        ref = pipeline.analyse_image(decode_image((FIXTURES / row["enroll"]).read_bytes()), upright=True)
        if not ref.accepted:
            continue
        template = ref.embeddings[EMBEDDER]
        image = decode_image((FIXTURES / row["probe"]).read_bytes())
        for r in range(args.repeat):
            order = ("before", "after") if (i + r) % 2 == 0 else ("after", "before")
            for way in order:
                calls.clear()
                t0 = time.perf_counter()
                a = ways[way](image, template)
                ms = (time.perf_counter() - t0) * 1000
                s = stats.setdefault((row["trial_type"], way), {"ms": [], "inferences": [], "scored": []})
                s["ms"].append(ms)
                s["inferences"].append(sum(calls))
                s["scored"].append(float(a.liveness is not None))
    pipeline.close()
    print("| trials | probe analysis | runs | liveness inferences per probe: mean (max) | p50 ms | p90 ms |")
    print("|---|---|---|---|---|---|")
    for (kind, way), s in sorted(stats.items(), key=lambda kv: (kv[0][0], kv[0][1] != "before")):
        times = sorted(s["ms"])
        print(f"| {kind} | {way} | {len(times)} | {statistics.mean(s['inferences']):.2f} ({max(s['inferences']):.0f}) "
              f"| {statistics.median(times):.1f} | {times[int(0.9 * (len(times) - 1))]:.1f} |")


if __name__ == "__main__":
    main()
