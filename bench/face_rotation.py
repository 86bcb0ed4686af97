"""Faces on their side or upside down: how the face pipeline finds which way is up, on the fixtures.

    .venv/bin/python -m bench.face_rotation [--every N]

Every face image of trials_face.csv (and the identities set with --identities) turned by 90, 180 and
270 degrees: whether the plain pipeline still finds a face, whether the landmark geometry shows the
turn (the angle of the eye-mouth axis), and whether FacePipeline.upright turns it back; then the
score of the turned image's embedding against the upright one's, plain and corrected.
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import time
from typing import Any

import numpy as np


from services.common.config import PROJECT_ROOT
from services.settings import load_config
from services.common.models import ModelStore
from services.face.imaging import decode_image
from services.face.models import pipeline_config
from services.face.pipeline import FacePipeline

FIXTURES = PROJECT_ROOT.parent / "shared" / "fixtures"
EMBEDDER = "mobilefacenet-arcface-192d"


def up_axis_deg(landmarks5: np.ndarray) -> float:
    """Angle of the mouth-to-eyes axis against image up: about 0 for an upright face's landmarks."""
    eyes, mouth = landmarks5[:2].mean(axis=0), landmarks5[3:].mean(axis=0)
    up = eyes - mouth
    return math.degrees(math.atan2(float(up[0]), float(-up[1])))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--every", type=int, default=1, help="every N-th image only")
    ap.add_argument("--identities", action="store_true", help="the 472 photos of face/identities instead")
    args = ap.parse_args()
    settings = load_config(None, data_dir="/tmp/biogate-bench-rotation",
                           models={"cache_dir": str(PROJECT_ROOT / "var" / "models")})
    pipeline = FacePipeline(pipeline_config(ModelStore(settings), providers=("CPUExecutionProvider",)))
    if args.identities:
        paths = sorted((FIXTURES / "face" / "identities").rglob("*.jpg"))[:: args.every]
    else:
        rows = list(csv.DictReader(open(FIXTURES / "trials_face.csv", newline="")))
        paths = sorted({FIXTURES / r[k] for r in rows for k in ("enroll", "probe")})[:: args.every]
    out: dict[int, dict[str, Any]] = {k: {"n": 0, "plain_face": 0, "plain_axis": [], "plain_scores": [], "found": 0, "scores": []}
           for k in (90, 180, 270)}
    t_plain = t_upright = 0.0
    for path in paths:
        image = decode_image(path.read_bytes())
        ref = pipeline.analyse_image(image)
        if not ref.accepted:
            continue
        for deg in out:
            turned = np.ascontiguousarray(np.rot90(image, deg // 90))
            o = out[deg]
            o["n"] += 1
            t = time.perf_counter()
            plain = pipeline.analyse_image(turned, enforce_quality=False)
            t_plain += time.perf_counter() - t
            if plain.face is not None:
                o["plain_face"] += 1
                o["plain_axis"].append(up_axis_deg(plain.face.landmarks5))
            if plain.embeddings:
                o["plain_scores"].append(float(np.dot(ref.embeddings[EMBEDDER], plain.embeddings[EMBEDDER])))
            t = time.perf_counter()
            fixed = pipeline.analyse_image(turned, upright=True)
            t_upright += time.perf_counter() - t
            o["found"] += int((fixed.rotation + deg) % 360 == 0)
            if fixed.embeddings:
                o["scores"].append(float(np.dot(ref.embeddings[EMBEDDER], fixed.embeddings[EMBEDDER])))
    pipeline.close()
    for deg, o in out.items():
        axis = o["plain_axis"]
        print(f"turned {deg:3d}: {o['n']} images; plain pipeline found a face in {o['plain_face']}, landmark axis "
              f"{min(axis):.0f}..{max(axis):.0f} deg (upright: about 0), scores {min(o['plain_scores']):.2f}.."
              f"{max(o['plain_scores']):.2f}; upright() turned back {o['found']}/{o['n']}, scores after "
              f"{min(o['scores']):.3f}..{max(o['scores']):.3f} (median {statistics.median(o['scores']):.3f})")
    n = sum(o["n"] for o in out.values())
    print(f"CPU time per analysis: plain {1000 * t_plain / n:.0f} ms, upright (4 views, one batch) "
          f"{1000 * t_upright / n:.0f} ms")


if __name__ == "__main__":
    main()
