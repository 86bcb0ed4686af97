"""The closed-form alignment (services/face/align.py) against insightface's ``norm_crop`` (scikit-image's
``SimilarityTransform.estimate``), on every face fixture image: the warp matrices and crops of every
detected face, and every output of the face pipeline with each alignment (plain analysis with
liveness and the upright search), the verification scores, EER and decisions on trials_face.csv at
the manifest's calibrated thresholds, and the live decisions on pad_face.csv.

    .venv/bin/python -m bench.face_align_check
"""

from __future__ import annotations

import csv
import time
import warnings

import numpy as np
from insightface.utils.face_align import estimate_norm, norm_crop

from bench.harness import FIXTURES, MODEL_CACHE
from services.common.evaluation.metrics import eer
from services.common.models import ModelStore
from services.common.modality.calibration import Calibrations, NotCalibrated
from services.face import align, pipeline as pipeline_module
from services.face.config import face_config
from services.face.models import pipeline_config
from services.face.pipeline import FacePipeline
from services.settings import load_config

warnings.filterwarnings("ignore", message="`estimate` is deprecated", category=FutureWarning)


def old_align(image_bgr: np.ndarray, face, size: int = align.ALIGNED_SIZE) -> np.ndarray:
    return norm_crop(image_bgr, face.landmarks5.astype(np.float32), image_size=size)


ARMS = {"norm_crop": old_align, "closed form": align.align_face}


def analyse_all(p: FacePipeline, images: dict[str, np.ndarray]) -> dict[str, dict]:
    out = {}
    for arm, fn in ARMS.items():
        pipeline_module.align_face = fn
        c = time.process_time()
        out[arm] = {k: (p.analyse_image(im, liveness=True), p.analyse_image(im, upright=True)) for k, im in images.items()}
        print(f"{arm}: {len(images)} images analysed twice in {time.process_time() - c:.1f} CPU s", flush=True)
    pipeline_module.align_face = align.align_face
    return out


def main() -> None:
    settings = load_config(None, data_dir="/tmp/biogate-bench-align", models={"cache_dir": str(MODEL_CACHE)})
    cfg = face_config(settings)
    p = FacePipeline(pipeline_config(ModelStore(settings), providers=("CPUExecutionProvider",)))
    paths = sorted(q for q in (FIXTURES / "face").rglob("*") if q.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp"))
    images = {str(q.relative_to(FIXTURES)): p.decode(q.read_bytes()) for q in paths}

    # 1. matrices and crops of every detected face
    m_diff, c_diff, n_faces, n_same, n_pixels_diff = 0.0, 0, 0, 0, 0
    for im in images.values():
        for f in p.detector.detect(im):
            lm = f.landmarks5.astype(np.float32)
            m_old, m_new = estimate_norm(lm), align.align_matrix(lm)
            m_diff = max(m_diff, float(np.abs(m_old - m_new).max()))
            a, b = old_align(im, f), align.align_face(im, f)
            d = np.abs(a.astype(np.int16) - b.astype(np.int16))
            c_diff, n_faces = max(c_diff, int(d.max())), n_faces + 1
            n_same += int(d.max() == 0)
            n_pixels_diff += int(np.count_nonzero(d))
    print(f"{len(images)} images, {n_faces} detected faces: matrices max abs diff {m_diff:.3g}; crops identical "
          f"{n_same} of {n_faces}, max abs pixel diff {c_diff}, differing channel values {n_pixels_diff} of "
          f"{n_faces * 112 * 112 * 3}")

    # 2. every output of the pipeline
    res = analyse_all(p, images)
    old, new = res["norm_crop"], res["closed form"]
    same_issues = sum(old[k][j].issues == new[k][j].issues and old[k][j].rotation == new[k][j].rotation
                      for k in images for j in (0, 1))
    cos, live = [], []
    for k in images:
        for j in (0, 1):
            for name, e in old[k][j].embeddings.items():
                if name in new[k][j].embeddings:
                    cos.append(float(np.dot(e, new[k][j].embeddings[name])))
        if old[k][0].liveness is not None and new[k][0].liveness is not None:
            live.append(abs(old[k][0].liveness - new[k][0].liveness))
    print(f"analyses with the same issues and turn: {same_issues} of {2 * len(images)}; embeddings compared {len(cos)}, "
          f"cosine old/new min {min(cos):.6f}, median {float(np.median(cos)):.6f}; live score max abs diff "
          f"{max(live):.3g} over {len(live)}")

    # 3. verification and liveness decisions
    cal = Calibrations(settings.models.manifest, 1e9)
    model = cfg.embedder
    rows = list(csv.DictReader(open(FIXTURES / "trials_face.csv", newline="")))
    targets = (1e-2, 1e-3, 1e-4, cfg.target_fmr)
    thresholds = {}
    for t in targets:
        try:
            thresholds[t] = cal.threshold(model, cfg.calibration_channel, t, "cosine")
        except NotCalibrated:
            pass
    for arm, r in res.items():
        gen: list[float] = []
        imp: list[float] = []
        decisions: list[tuple[bool, ...] | None] = []
        fail, scores = 0, []
        for row in rows:
            e, q = r[row["enroll"]][1], r[row["probe"]][0]  # enrolment turns upright; a probe is plain
            if not (e.accepted and q.accepted):
                fail += row["target"] == "1"
                decisions.append(None)
                continue
            s = float(np.dot(e.embeddings[model], q.embeddings[model]))
            (gen if row["target"] == "1" else imp).append(s)
            scores.append(s)
            decisions.append(tuple(s >= th for th in thresholds.values()))
        res[arm] = {"decisions": decisions, "scores": scores, "eer": eer(gen, imp, fail).eer, "n": (len(gen), len(imp), fail)}
        print(f"{arm}: trials_face.csv genuine {len(gen)} impostor {len(imp)} genuine failures {fail}: EER "
              f"{res[arm]['eer']:.4f}")
    diffs = [abs(a - b) for a, b in zip(res["norm_crop"]["scores"], res["closed form"]["scores"], strict=True)]
    print(f"trial scores max abs diff {max(diffs):.2g}")
    same = sum(a == b for a, b in zip(res["norm_crop"]["decisions"], res["closed form"]["decisions"], strict=True))
    print(f"trial decisions at FMR targets {list(thresholds)} (thresholds {[round(v, 4) for v in thresholds.values()]}): "
          f"identical on {same} of {len(rows)} trials")
    # every pair of the identities set (plain analyses), identity = the image's folder
    ids = sorted(k for k in images if k.startswith("face/identities/") and old[k][0].accepted and new[k][0].accepted)
    who = np.array([k.split("/")[2] for k in ids])
    same_id = (who[:, None] == who[None, :])[np.triu_indices(len(ids), 1)]
    pair_scores = {}
    for arm, r in (("norm_crop", old), ("closed form", new)):
        e = np.stack([r[k][0].embeddings[model] for k in ids])
        pair_scores[arm] = (e @ e.T)[np.triu_indices(len(ids), 1)]
        print(f"{arm}: identities all pairs ({len(ids)} images, {int(same_id.sum())} genuine, "
              f"{int((~same_id).sum())} impostor): EER {eer(pair_scores[arm][same_id], pair_scores[arm][~same_id]).eer:.4f}")
    a, b = pair_scores["norm_crop"], pair_scores["closed form"]
    flips = {round(th, 4): int(np.count_nonzero((a >= th) != (b >= th))) for th in thresholds.values()}
    print(f"identities all pairs: scores max abs diff {float(np.abs(a - b).max()):.2g}; decisions that differ per "
          f"threshold {flips}")
    live_t = cal.threshold(cfg.liveness[0], cfg.calibration_channel, cfg.liveness_target_apcer, "p_bonafide")
    pad = list(csv.DictReader(open(FIXTURES / "pad_face.csv", newline="")))
    key = next(k for k in pad[0] if k in ("path", "image", "file"))
    both = [(old[r[key]][0].liveness, new[r[key]][0].liveness) for r in pad if r[key] in old]
    same_live = sum((a is None and b is None) or (a is not None and b is not None and (a >= live_t) == (b >= live_t))
                    for a, b in both)
    print(f"pad_face.csv live decisions at threshold {live_t:.4f}: identical on {same_live} of {len(both)}")


if __name__ == "__main__":
    main()
