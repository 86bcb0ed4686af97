"""Face pipeline measurements on the fixtures: EER per detector x embedder (and fusion), failure to
enrol, PAD EER per liveness-box variant, and CPU latency per stage (single image).

    .venv/bin/python -m bench.face_eval_dev [--quick] [--json OUT]

Models come from the model store (SCRFD is fetched from the operator folder when missing).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from services.settings import load_config
from services.common.evaluation import metrics as m
from services.common.evaluation.runner import run_verification
from services.common.evaluation.trials import read_pad, read_trials
from services.common.models import ModelStore, ModelUnavailableError
from services.face import liveness as lv
from services.face.align import align_face
from services.face.config import FaceSettings
from services.face.evaluation import FaceVerificationScorer
from services.face.imaging import decode_image
from services.face.models import detector_config, embedder_config, liveness_specs
from services.face.pipeline import FacePipeline, FacePipelineConfig, build_detector
from services.face.quality import assess

warnings.filterwarnings("ignore", category=FutureWarning)

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
DETECTORS = ("yunet-2023mar", "scrfd-500m", "scrfd-2.5g")
EMBEDDERS = {"SFace": "sface-2021dec-batch", "MobileFaceNet": "mobilefacenet-arcface-192d"}
# The box of the SCRFD detector's median geometry in the template frame (h/w 1.24), for comparison.
SCRFD_SHAPED_BOX = (17.6, 21.5, 96.6, 119.2)


def model_path(store: ModelStore, model_id: str) -> Path:
    try:
        return store.path(model_id)
    except ModelUnavailableError:
        store.fetch(model_id)
        return store.path(model_id)


def verification(store: ModelStore, pads: list[float], detectors) -> list[dict]:
    trials = read_trials(FIXTURES / "trials_face.csv", FIXTURES)
    rows = []
    for det in detectors:
        model_path(store, det)
        for pad in pads:
            cfg = FacePipelineConfig(
                detector=detector_config(store, det, pad_ratio=pad),
                embedders=tuple(embedder_config(store, e) for e in EMBEDDERS.values()),
            )
            pipeline = FacePipeline(cfg)
            base = FaceVerificationScorer(pipeline)
            combos = [(k, (v,)) for k, v in EMBEDDERS.items()] + [("fusion", tuple(EMBEDDERS.values()))]
            for label, names in combos:
                scorer = FaceVerificationScorer(pipeline, names)
                scorer._cache = base._cache  # embeddings are computed once per detector setting
                run = run_verification(scorer, trials)
                g, i = run.genuine, run.impostor
                e = m.eer(g, i, run.genuine_failures)
                dprime = (g.mean() - i.mean()) / np.sqrt((g.var() + i.var()) / 2)
                rows.append({
                    "detector": det, "pad_ratio": pad, "embedder": label,
                    "eer": e.eer, "eer_threshold": e.threshold,
                    "genuine": int(g.size), "impostor": int(i.size),
                    "fte": f"{run.fte.failures}/{run.fte.attempts}", "fta": f"{run.fta.failures}/{run.fta.attempts}",
                    "failures": run.failure_reasons,
                    "min_genuine": float(g.min()), "max_impostor": float(i.max()), "d_prime": float(dprime),
                })
                r = rows[-1]
                print(f"{det:14s} pad={pad:<4} {label:13s} EER={r['eer']*100:5.2f}% "
                      f"(genuine {r['genuine']}, impostor {r['impostor']}) FTE {r['fte']} FTA {r['fta']} "
                      f"gap={r['min_genuine']-r['max_impostor']:+.3f} d'={r['d_prime']:.2f}", flush=True)
            pipeline.close()
    return rows


def pad_variants(store: ModelStore, detectors) -> list[dict]:
    samples = read_pad(FIXTURES / "pad_face.csv", FIXTURES)
    assert isinstance(store.settings, FaceSettings)
    specs = liveness_specs(store, store.settings.face.liveness)
    live = lv.PassiveLiveness(specs)
    images = [decode_image(s.path.read_bytes()) for s in samples]
    bona = np.array([s.bonafide for s in samples])
    rows = []
    for det in detectors:
        detector = build_detector(detector_config(store, det), ("CPUExecutionProvider",))
        faces = []
        for img in images:
            found = detector.detect(img)
            faces.append(max(found, key=lambda f: f.size) if found else None)
        ok = np.array([f is not None for f in faces])
        variants = {
            "detector box": lambda f: f.box,
            "landmark box, SCRFD-shaped": lambda f: lv.retinaface_box(f, SCRFD_SHAPED_BOX),
            "landmark box, square (default)": lambda f: lv.retinaface_box(f),
        }
        for name, box_of in variants.items():
            per_model = []
            for spec, model in zip(live.specs, live.models, strict=True):
                crops = np.stack([lv.crop_for_scale(img, box_of(f), spec.scale) for img, f in zip(images, faces, strict=True) if f is not None])
                logits = model.session.run(None, {model.input_names[0]: crops.transpose(0, 3, 1, 2).astype(np.float32)})[0]
                per_model.append(lv._softmax_live(logits))
            scores = {"MiniFASNetV2": per_model[0], "MiniFASNetV1SE": per_model[1], "mean": np.mean(per_model, axis=0)}
            for label, s in scores.items():
                b, a = s[bona[ok]], s[~bona[ok]]
                e = m.eer(b, a)
                at = m.pad_error_rates(b, {"all": a}, e.threshold)
                rows.append({"detector": det, "box": name, "model": label, "eer": e.eer, "threshold": e.threshold,
                             "apcer": at.apcer_max, "bpcer": at.bpcer, "bonafide": int(b.size), "attacks": int(a.size),
                             "no_face": int((~ok).sum())})
                r = rows[-1]
                print(f"{det:14s} {name:31s} {label:14s} EER={r['eer']*100:5.2f}% at t={r['threshold']:.3f}: "
                      f"APCER {r['apcer']*100:5.2f}% BPCER {r['bpcer']*100:5.2f}% (bona fide {r['bonafide']}, attacks {r['attacks']}, "
                      f"no face {r['no_face']})", flush=True)
    return rows


def _ms(fn, n: int) -> float:
    fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def latency(store: ModelStore, n: int) -> list[dict]:
    rows = []
    cpu = ("CPUExecutionProvider",)
    for rel in ("face/verification/joe_biden/face_recognition_examples_knn_examples_train_biden_biden2.jpg",
                "face/verification/bbt_amy/faceapi_amy1.png"):
        data = (FIXTURES / rel).read_bytes()
        img = decode_image(data)
        stages: dict[str, Callable[[], Any]] = {"decode": partial(decode_image, data)}
        face = None
        for det in ("yunet-2023mar", "scrfd-500m"):
            d = build_detector(detector_config(store, det), cpu)
            stages[f"detect {det}"] = partial(d.detect, img)
            face = face or max(d.detect(img), key=lambda f: f.size)
        assert face is not None
        aligned = align_face(img, face)
        stages["align"] = partial(align_face, img, face)
        stages["quality"] = partial(assess, img.shape, face, aligned)
        from services.face.pipeline import build_embedder

        for label, eid in EMBEDDERS.items():
            e = build_embedder(embedder_config(store, eid), cpu)
            stages[f"embed {label}"] = partial(e.embed, aligned[None])
        assert isinstance(store.settings, FaceSettings)
        live = lv.PassiveLiveness(liveness_specs(store, store.settings.face.liveness), providers=cpu)
        stages["liveness (2 models)"] = partial(live.score, img, face)
        from services.face.models import pipeline_config

        p = FacePipeline(pipeline_config(store, providers=cpu))
        stages["pipeline analyse (default, no liveness)"] = partial(p.analyse, data)
        stages["pipeline analyse (default + liveness)"] = partial(p.analyse, data, liveness=True)
        for name, fn in stages.items():
            rows.append({"image": f"{rel.split('/')[-1]} {img.shape[1]}x{img.shape[0]}", "stage": name, "ms": _ms(fn, n)})
            print(f"{rows[-1]['image']:60s} {name:42s} {rows[-1]['ms']:7.2f} ms", flush=True)
        p.close()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="YuNet and SCRFD-500M only, pad 0.25, fewer latency runs")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--skip", nargs="*", default=[], choices=["verification", "pad", "latency"])
    args = ap.parse_args()
    store = ModelStore(load_config())
    detectors = DETECTORS[:2] if args.quick else DETECTORS
    out = {}
    if "verification" not in args.skip:
        out["verification"] = verification(store, [0.25] if args.quick else [0.0, 0.25], detectors)
    if "pad" not in args.skip:
        out["pad"] = pad_variants(store, detectors[:2])
    if "latency" not in args.skip:
        out["latency"] = latency(store, 5 if args.quick else 20)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
