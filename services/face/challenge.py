"""Active liveness: a random sequence of head moves, and the check of the frame burst answering it.

Moves are read in the captured, unmirrored image (clients must not mirror frames): the subject
turning to their own left moves the nose to the image's right (yaw > 0, see
:func:`services.face.quality.head_pose`); looking up gives pitch > 0. Every frame is labelled
NEUTRAL, one of the moves, or in between, by its pose relative to the first frame (which must be
roughly frontal; the median of the first two): relative, because the landmark pose estimate of a frontal face carries a
per-person and per-camera bias of 10-20 degrees. The collapsed sequence of move labels must be
exactly the requested one, each pose held for at least two frames. The pose comes from the 5 landmarks' 3-D
geometry (the nose tip in front of the eyes), so a flat photo turned in front of the camera
keeps its nose on the eye/mouth midline and does not read as a head turn.

Besides the trajectory: passive liveness on the frames (median live probability), the same
identity in every frame (cosine of each frame to the neutral frames' mean embedding), no repeated
frame, and plausible timing (increasing capture times, frame gaps of a real camera, a duration a
head can move in and no longer than the time since the challenge was issued).
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import numpy as np

from services.face.embedding import l2_normalise

MOVES = ("TURN_LEFT", "TURN_RIGHT", "LOOK_UP", "LOOK_DOWN")
NEUTRAL = "NEUTRAL"
BETWEEN = "BETWEEN"

# Coarse reasons for the client (the details go to the audit trail only).
MOVES_NOT_FOLLOWED = "MOVES_NOT_FOLLOWED"
LIVENESS_FAILED = "LIVENESS_FAILED"
IDENTITY_CHANGED = "IDENTITY_CHANGED"
TIMING_IMPLAUSIBLE = "TIMING_IMPLAUSIBLE"
DUPLICATE_FRAMES = "DUPLICATE_FRAMES"
FACE_NOT_FOUND = "FACE_NOT_FOUND"


def random_moves(n: int) -> list[str]:
    """``n`` distinct moves in a random order, from the OS's CSPRNG."""
    pool = list(MOVES)
    secrets.SystemRandom().shuffle(pool)
    return pool[:n]


@dataclass(frozen=True)
class ChallengeRules:
    turn_deg: float = 15.0
    tilt_deg: float = 8.0
    neutral_deg: float = 6.0
    min_frame_gap_ms: int = 20
    max_frame_gap_ms: int = 5000
    min_move_ms: int = 150
    identity_min_cosine: float = 0.4
    live_threshold: float = 0.5
    max_missing_fraction: float = 0.2  # frames without a usable face (motion blur) tolerated
    max_start_deg: float = 30.0  # the first frames' |yaw| and |pitch|: roughly frontal
    baseline_frames: int = 2  # leading frames whose median pose is the reference
    min_run: int = 2  # frames a pose must be held; a single frame's label is landmark jitter


@dataclass(frozen=True)
class FrameObservation:
    """What the pipeline saw in one frame; ``yaw``/``pitch`` None when no usable face was found."""

    capture_time_ms: int
    digest: bytes  # of the encoded frame, for repeats
    yaw: float | None = None
    pitch: float | None = None
    live: float | None = None
    embedding: np.ndarray | None = None


class _Seen(NamedTuple):
    """A frame with a usable face (pose and embedding known)."""

    yaw: float
    pitch: float
    live: float | None
    embedding: np.ndarray


@dataclass(frozen=True)
class ChallengeResult:
    passed: bool
    reasons: tuple[str, ...]
    details: dict = field(default_factory=dict)  # scores and measurements, for the audit trail
    embedding: np.ndarray | None = None  # the neutral frames' mean, for an optional 1:1 match


def frame_digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def label(yaw: float, pitch: float, r: ChallengeRules) -> str:
    if abs(yaw) < r.neutral_deg and abs(pitch) < r.neutral_deg:
        return NEUTRAL
    turn, tilt = abs(yaw) / r.turn_deg, abs(pitch) / r.tilt_deg
    if max(turn, tilt) < 1.0:
        return BETWEEN
    if turn >= tilt:
        return "TURN_LEFT" if yaw > 0 else "TURN_RIGHT"
    return "LOOK_UP" if pitch > 0 else "LOOK_DOWN"


def trajectory(labels: Sequence[str], min_run: int = 1) -> list[str]:
    """Runs collapsed; in-between frames, and runs shorter than ``min_run`` frames (landmark
    jitter), dropped: e.g. N N B L L B N R R -> N L N R."""
    runs: list[list] = []
    for lab in labels:
        if lab == BETWEEN:
            continue
        if runs and runs[-1][0] == lab:
            runs[-1][1] += 1
        else:
            runs.append([lab, 1])
    out: list[str] = []
    for lab, n in runs:
        if n >= min_run and (not out or out[-1] != lab):
            out.append(lab)
    return out


def follows(moves: Sequence[str], labels: Sequence[str], min_run: int = 1) -> bool:
    path = trajectory(labels, min_run)
    return bool(path) and path[0] == NEUTRAL and [p for p in path if p != NEUTRAL] == list(moves)


def _timing_ok(times: Sequence[int], n_moves: int, issued_ago_ms: float, r: ChallengeRules) -> tuple[bool, dict]:
    gaps = np.diff(np.asarray(times, np.int64))
    duration = int(times[-1] - times[0]) if len(times) > 1 else 0
    info = {"duration_ms": duration, "min_gap_ms": int(gaps.min()) if gaps.size else 0,
            "max_gap_ms": int(gaps.max()) if gaps.size else 0}
    ok = (
        gaps.size > 0
        and int(gaps.min()) >= max(r.min_frame_gap_ms, 1)
        and int(gaps.max()) <= r.max_frame_gap_ms
        and duration >= n_moves * r.min_move_ms
        and duration <= issued_ago_ms + 1000  # the burst cannot be older than its challenge
    )
    return ok, info


def evaluate(
    moves: Sequence[str], frames: Sequence[FrameObservation], issued_ago_ms: float, rules: ChallengeRules
) -> ChallengeResult:
    reasons: list[str] = []
    details: dict = {"frames": len(frames), "moves": len(moves)}

    if len({f.digest for f in frames}) != len(frames):
        reasons.append(DUPLICATE_FRAMES)
    timing_ok, timing = _timing_ok([f.capture_time_ms for f in frames], len(moves), issued_ago_ms, rules)
    details.update(timing)
    if not timing_ok:
        reasons.append(TIMING_IMPLAUSIBLE)

    seen = [_Seen(f.yaw, f.pitch, f.live, f.embedding) for f in frames
            if f.yaw is not None and f.pitch is not None and f.embedding is not None]
    missing = len(frames) - len(seen)
    details["frames_without_face"] = missing
    if not seen or missing > rules.max_missing_fraction * len(frames):
        reasons.append(FACE_NOT_FOUND)
        return ChallengeResult(False, tuple(reasons), details)

    # The reference pose: the median of the leading frames (landmark jitter moves one frame's
    # estimate by several degrees).
    lead = seen[: rules.baseline_frames]
    y0, p0 = float(np.median([f.yaw for f in lead])), float(np.median([f.pitch for f in lead]))
    labels = [label(f.yaw - y0, f.pitch - p0, rules) for f in seen]
    yaws = [f.yaw for f in seen]
    pitches = [f.pitch for f in seen]
    details.update(
        yaw_min=round(min(yaws), 1), yaw_max=round(max(yaws), 1),
        pitch_min=round(min(pitches), 1), pitch_max=round(max(pitches), 1),
        path=" ".join(trajectory(labels, rules.min_run))[:200],
    )
    if abs(y0) > rules.max_start_deg or abs(p0) > rules.max_start_deg or not follows(moves, labels, rules.min_run):
        reasons.append(MOVES_NOT_FOLLOWED)

    lives = np.array([f.live for f in seen if f.live is not None], np.float32)
    live_median = float(np.median(lives)) if lives.size else 0.0
    details.update(live_median=round(live_median, 4), live_min=round(float(lives.min()) if lives.size else 0.0, 4),
                   live_threshold=round(rules.live_threshold, 4))
    if live_median < rules.live_threshold:
        reasons.append(LIVENESS_FAILED)

    embs = np.stack([f.embedding for f in seen])
    neutral = [i for i, lab in enumerate(labels) if lab == NEUTRAL] or list(range(len(seen)))
    reference = l2_normalise(embs[neutral].mean(axis=0, keepdims=True))[0]
    cosines = embs @ reference
    details.update(identity_min_cosine=round(float(cosines.min()), 4),
                   identity_threshold=round(rules.identity_min_cosine, 4))
    if float(cosines.min()) < rules.identity_min_cosine:
        reasons.append(IDENTITY_CHANGED)

    return ChallengeResult(not reasons, tuple(reasons), details, reference)
