"""Face gates chosen by generalisation: each tuned parameter is fitted on one source and measured on
another, against the untuned default, with the face pipeline of the service.

1. Subject choice (``MULTIPLE_FACES``): the previous rule (rivals by detector box size) against the
   landmark-size rule with far-blurrier rivals ignored (services/face/subject.py), on
   fixtures/face/identities (news photos), the verification fixtures and the bona fide webcam
   frames of pad_face.csv: photos refused, and whether the chosen face is the labelled person (its
   genuine pairs match at the record's FMR 1e-2 threshold).
2. Minimum face size: every photo of one part of the identities split shrunk until its eye
   distance is d pixels (probe), compared with the other photos at full size (enrolment): FNMR and
   FMR at the manifest's FMR 1e-3 threshold and the EER per d. The minimum is chosen on the even
   people (fit) and measured on the odd people (held out).
3. Liveness crop box: the landmark-derived box (tuned on pad_face.csv's webcam frames) against the
   detector's own box (untuned), per source of pad_face.csv: the webcam replay tutorial (apfol) and
   the Silent-Face samples.

    .venv/bin/python -m bench.face_gates_eval [--out var/eval/face-gates]

Writes ``results.json`` in --out; the tables are in bench/RESULTS.md ("Face gates").
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from bench.eval_common import write_results
from services.settings import load_config
from services.common.evaluation import metrics as m
from services.common.evaluation.trials import read_pad, read_people, split_people
from services.common.models import ModelStore
from services.face.detection import Face
from services.face.models import pipeline_config
from services.face.pipeline import FacePipeline
from services.face.quality import QualityThresholds

ROOT = Path(__file__).resolve().parents[1]

FIXTURES = ROOT.parent / "shared" / "fixtures"
MODEL = "mobilefacenet-arcface-192d"
EYE_DISTANCES = (12, 16, 20, 24, 28, 32)


def old_rule(faces: list[Face], shape: tuple[int, ...]) -> str | None:
    """The subject rule before: rivals by detector box size, none ignored for blur."""
    if not faces:
        return "NO_FACE"
    h, w = shape[:2]
    half, centre = float(np.hypot(w, h)) / 2, np.array([w / 2, h / 2])

    def value(f: Face) -> float:
        return f.size * (1.0 - 0.5 * min(float(np.linalg.norm((f.box[:2] + f.box[2:]) / 2 - centre)) / half, 1.0))

    subject = max(faces, key=value)
    return "MULTIPLE_FACES" if any(f is not subject and f.size >= 0.6 * subject.size for f in faces) else None


def subject_rules(pipeline: FacePipeline, sets: dict[str, list[Path]], threshold: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, paths in sets.items():
        old = new = 0
        changed = []
        for path in paths:
            image = pipeline.decode(path.read_bytes())
            faces = pipeline.detector.detect(image)
            before = old_rule(faces, image.shape) == "MULTIPLE_FACES"
            a = pipeline.analyse_image(image, embed=False)
            after = "MULTIPLE_FACES" in a.issues
            old += before
            new += after
            if before != after:
                changed.append(str(path.relative_to(FIXTURES)))
        out[name] = {"photos": len(paths), "multiple_faces_before": old, "multiple_faces_after": new,
                     "changed": changed}
        print(f"{name}: MULTIPLE_FACES {old} -> {new} of {len(paths)}", flush=True)
    # The photos let through: is the chosen face the labelled person (genuine pairs at FMR 1e-2)?
    ident = [p for p in out.get("identities", {}).get("changed", [])]
    checks = []
    for rel in ident:
        path = FIXTURES / rel
        person = path.parent
        a = pipeline.analyse(path.read_bytes())
        if not a.embeddings:
            checks.append({"photo": rel, "accepted": False, "issues": list(a.issues)})
            continue
        cos = []
        for other in sorted(person.glob("*.jpg")):
            if other == path:
                continue
            b = pipeline.analyse(other.read_bytes(), enforce_quality=False)
            if b.embeddings:
                cos.append(float(np.dot(a.embeddings[MODEL], b.embeddings[MODEL])))
        checks.append({"photo": rel, "accepted": True, "genuine_cosines": [round(c, 3) for c in cos],
                       "matches_at_1e-2": sum(c >= threshold for c in cos)})
    out["let_through"] = checks
    return out


def shrink(image: np.ndarray, eye: float, target: float) -> np.ndarray:
    s = target / eye
    return cv2.resize(image, (max(1, round(image.shape[1] * s)), max(1, round(image.shape[0] * s))),
                      interpolation=cv2.INTER_AREA)


def size_curve(pipeline: FacePipeline, part: list, thresholds: dict[float, float]) -> dict[str, Any]:
    """Enrol each photo at full size, probe every other photo of the part shrunk to eye distance d."""
    full: dict[Path, np.ndarray] = {}
    eyes: dict[Path, float] = {}
    images: dict[Path, np.ndarray] = {}
    ident = {e.path: e.identity for e in part}
    for e in part:
        image = pipeline.decode(e.path.read_bytes())
        a = pipeline.analyse_image(image)
        if a.embeddings:
            assert a.quality is not None
            full[e.path] = a.embeddings[MODEL]
            eyes[e.path] = a.quality.frontal_eye_distance_px  # the size the gate measures
            images[e.path] = image
    paths = sorted(full)
    enrolled = np.stack([full[p] for p in paths])
    rows = {}
    for d in (*EYE_DISTANCES, None):
        probes, failed = {}, 0
        for p in paths:
            if d is None:
                probes[p] = full[p]
                continue
            if eyes[p] < d:
                continue  # cannot be shrunk to d
            a = pipeline.analyse_image(shrink(images[p], eyes[p], d), enforce_quality=False)
            if a.embeddings and "MULTIPLE_FACES" not in a.issues:
                probes[p] = a.embeddings[MODEL]
            else:
                failed += 1
        gen: list[float] = []
        imp: list[float] = []
        gen_failed = 0
        for i, e in enumerate(paths):
            for p in paths:
                if p == e or (d is not None and eyes[p] < d):
                    continue
                same = ident[p] == ident[e]
                if p not in probes:
                    gen_failed += same
                    continue
                (gen if same else imp).append(float(enrolled[i] @ probes[p]))
        g, i_ = np.asarray(gen), np.asarray(imp)
        row = {"probes": len(probes), "probe_failures": failed, "genuine": len(gen), "genuine_failed": gen_failed,
               "impostor": len(imp), "eer": m.eer(g, i_, gen_failed).eer}
        for target, t in thresholds.items():
            r = m.error_rates(g, i_, t, gen_failed)
            row[f"fnmr@{target:g}"] = r.fnmr
            row[f"fmr@{target:g}"] = r.fmr
        rows["full" if d is None else str(d)] = row
        print(f"  eye distance {d or 'full'}: {json.dumps(row)}", flush=True)
    return rows


def choose_min_size(rows: dict[str, Any], target: float, max_fnmr_rise: float = 0.01) -> int:
    """The smallest d whose FNMR at the point is within ``max_fnmr_rise`` of full size and whose FMR
    there is not above full size's by more than its own binomial noise (95 % upper bound)."""
    ref = rows["full"]
    _, fmr_hi = m.binomial_ci(round(ref[f"fmr@{target:g}"] * ref["impostor"]), ref["impostor"])
    ok = [int(d) for d, r in rows.items() if d != "full"
          and r[f"fnmr@{target:g}"] <= ref[f"fnmr@{target:g}"] + max_fnmr_rise and r[f"fmr@{target:g}"] <= fmr_hi]
    # every larger d must qualify too
    for d in sorted(ok):
        if all(int(x) in ok for x in rows if x != "full" and int(x) >= d):
            return d
    return max(int(x) for x in rows if x != "full")


def liveness_boxes(store: ModelStore) -> dict[str, Any]:
    samples = read_pad(FIXTURES / "pad_face.csv", FIXTURES)
    out: dict[str, Any] = {}
    for box in ("landmarks", "detector"):
        pipeline = FacePipeline(pipeline_config(store, liveness_box=box))
        scores: dict[str, list[tuple[bool, float]]] = {"apfol": [], "silentface": []}
        for s in samples:
            a = pipeline.analyse(s.path.read_bytes(), liveness=True, embed=False)
            if a.liveness is None:
                continue
            scores["silentface" if "silentface" in s.path.name else "apfol"].append((s.bonafide, a.liveness))
        pipeline.close()
        res = {}
        for source, pairs in scores.items():
            b = [v for ok, v in pairs if ok]
            at = [v for ok, v in pairs if not ok]
            res[source] = {"bonafide": [round(v, 4) for v in b] if len(b) < 5 else len(b),
                           "attacks": [round(v, 4) for v in at] if len(at) < 5 else len(at),
                           "eer": m.eer(b, at).eer if b and at else None,
                           "attacks_below_every_bonafide": sum(v < min(b) for v in at) if b else None}
        out[box] = res
        print(f"liveness box {box}: {json.dumps(res)}", flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "var" / "eval" / "face-gates"))
    ap.add_argument("--skip", nargs="*", default=(), choices=("subject", "size", "liveness"))
    a = ap.parse_args()
    os.environ.setdefault("BIOGATE_MODELS__CACHE_DIR", str(ROOT / "var" / "models"))
    settings = load_config()
    store = ModelStore(settings)
    record = store.model(MODEL).calibration["default"]
    thresholds = {p.target_fmr: p.threshold for p in record.operating_points if p.target_fmr in (1e-2, 1e-3)}
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "thresholds": thresholds}
    people = read_people(FIXTURES / "face" / "identities" / "SOURCES.csv", "face")
    if "subject" not in a.skip:
        pipeline = FacePipeline(pipeline_config(store, liveness=()))
        with open(FIXTURES / "MANIFEST.csv", newline="", encoding="utf-8") as fh:
            verification = [FIXTURES / r["path"] for r in csv.DictReader(fh)
                            if r["modality"] == "face" and "verification" in r["task"]]
        pad_live = [s.path for s in read_pad(FIXTURES / "pad_face.csv", FIXTURES) if s.bonafide]
        results["subject"] = subject_rules(pipeline, {"identities": [e.path for e in people],
                                                       "verification": verification, "pad_bonafide": pad_live},
                                           thresholds[1e-2])
        pipeline.close()
    if "size" not in a.skip:
        pipeline = FacePipeline(pipeline_config(store, liveness=(), quality=QualityThresholds(min_eye_distance_px=0.0)))
        results["size"] = {}
        for part in ("even", "odd"):
            print(f"size curve, {part} people", flush=True)
            results["size"][part] = size_curve(pipeline, split_people(people, part), thresholds)
        chosen = choose_min_size(results["size"]["even"], 1e-3)
        results["size"]["chosen_on_even"] = chosen
        results["size"]["check_on_odd"] = results["size"]["odd"][str(chosen)]
        pipeline.close()
    if "liveness" not in a.skip:
        results["liveness_box"] = liveness_boxes(store)
    write_results(a.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
