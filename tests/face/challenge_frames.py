"""Frame bursts answering a liveness challenge, synthesised from real fixture frames.

The pool is a webcam video of one person (pad_face.csv, bona fide) or its screen replays (the
spoof set). For the requested moves, the builder picks a roughly frontal base frame, then for each
move a real frame whose head pose, relative to the base, is that move (as the service labels it),
and a neutral frame to come back to; every frame is also shown a second time rotated, scaled and
shifted a little (in-plane warps: a different image with the same head pose), with camera-like
capture times.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from face_helpers import encode_png, load_bgr
from services.face.challenge import NEUTRAL, ChallengeRules, label


@dataclass(frozen=True)
class PoolFrame:
    path: Path
    yaw: float
    pitch: float
    live: float


def measure_pool(pipeline, paths) -> list[PoolFrame]:
    out = []
    for p in paths:
        a = pipeline.analyse_image(load_bgr(p), liveness=True, enforce_quality=False)
        if a.face is not None and a.embeddings:
            out.append(PoolFrame(Path(p), a.quality.yaw_deg, a.quality.pitch_deg, a.liveness))
    return out


def warp(image: np.ndarray, seed: int) -> np.ndarray:
    """A small in-plane rotation, scale and shift: a new image, the same head pose."""
    rng = np.random.default_rng(seed)
    h, w = image.shape[:2]
    m = np.asarray(cv2.getRotationMatrix2D((w / 2, h / 2), float(rng.uniform(-3, 3)), float(rng.uniform(0.98, 1.02))), np.float64)
    m[:, 2] += rng.uniform(-2, 2, 2)
    return cv2.warpAffine(image, m, (w, h), borderMode=cv2.BORDER_REPLICATE)


def _delta(f: PoolFrame, ref: tuple[float, float]) -> tuple[float, float]:
    return f.yaw - ref[0], f.pitch - ref[1]


def _margin(f: PoolFrame, ref: tuple[float, float], move: str, r: ChallengeRules) -> float:
    dy, dp = _delta(f, ref)
    if move == NEUTRAL:
        return -max(abs(dy), abs(dp))
    return abs(dy) / r.turn_deg - abs(dp) / r.tilt_deg if move.startswith("TURN") else abs(dp) / r.tilt_deg - abs(dy) / r.turn_deg


def plan(pool: list[PoolFrame], moves: list[str], rules: ChallengeRules, min_live: float = 0.0):
    """([two leading frames], {move: [frames]}, [neutral frames]) with the clearest poses, or None.

    The service's reference pose is the median (here: mean) of the two leading frames; every
    other frame is labelled relative to it exactly as the service does."""
    usable = [f for f in pool if f.live >= min_live]
    best = None
    for base in usable:
        second = min((f for f in usable if f is not base),
                     key=lambda f: max(abs(f.yaw - base.yaw), abs(f.pitch - base.pitch)))
        ref = ((base.yaw + second.yaw) / 2, (base.pitch + second.pitch) / 2)

        def frames_labelled(m, ref=ref, lead=(base, second)):
            return [f for f in usable if f not in lead and label(*_delta(f, ref), rules) == m]

        picks = {}
        for m in moves:
            cands = sorted(frames_labelled(m), key=lambda f: _margin(f, ref, m, rules), reverse=True)
            if not cands:
                break
            picks[m] = cands[:2]  # two real frames of the pose (or one, shown again warped)
        else:
            neutral = sorted(frames_labelled(NEUTRAL), key=lambda f: _margin(f, ref, NEUTRAL, rules), reverse=True)
            score = min(_margin(picks[m][-1], ref, m, rules) + len(picks[m]) for m in moves) + base.live
            if len(neutral) >= len(moves) and (best is None or score > best[0]):
                best = (score, [base, second], picks, neutral[: len(moves)])
    return None if best is None else best[1:]


def burst(pool, moves, rules, min_live: float = 0.0, step_ms: int = 60) -> list[tuple[bytes, int]]:
    """(PNG bytes, capture time ms) frames answering ``moves``: two frontal frames, then per move
    two frames of the move and a return to frontal (a neutral frame, and that frame warped)."""
    found = plan(pool, moves, rules, min_live)
    assert found is not None, f"the fixture pool cannot answer {moves}"
    lead, picks, neutral = found
    frames = [encode_png(load_bgr(f.path)) for f in lead]
    for i, (m, n) in enumerate(zip(moves, neutral, strict=True)):
        back = load_bgr(n.path)
        held = [load_bgr(f.path) for f in picks[m]]
        if len(held) == 1:
            held.append(warp(held[0], seed=100 + i))
        frames += [encode_png(x) for x in held] + [encode_png(back), encode_png(warp(back, seed=i))]
    return [(data, 1000 + k * step_ms) for k, data in enumerate(frames)]
