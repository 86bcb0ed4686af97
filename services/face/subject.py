"""Choosing the subject face: the largest, most central one; refused when another face is comparable.

Sizes are eye distances (the measure of the quality gate's minimum), not the detector's box: on
news photos YuNet gives background faces cut off by the frame, or turned away, boxes nearly as
large as the subject's while their eyes are a third as far apart (fixtures/face/identities: 12 of
472 photos refused as MULTIPLE_FACES by box size, 4 by eye distance; bench/face_gates_eval.py). A
face far blurrier than the subject (an out-of-focus background person, or a detector false
positive on a blurred crowd) is no rival either: nobody presents it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Callable, Sequence

import numpy as np

from services.face.detection import Face


class SubjectIssue(str, Enum):
    NO_FACE = "NO_FACE"
    MULTIPLE_FACES = "MULTIPLE_FACES"


@dataclass(frozen=True)
class SubjectPolicy:
    # Refuse when another face's size is at least this fraction of the subject's (1.0 or more: never).
    second_face_ratio: float = 0.6
    # Weight of centrality against size: a face at the image corner counts as (1 - weight) x its size.
    centre_weight: float = 0.5
    # A rival whose sharpness is below this fraction of the subject's is ignored (0: never ignored).
    rival_min_sharpness_ratio: float = 0.25


@dataclass(frozen=True)
class SubjectChoice:
    face: Face | None
    issue: SubjectIssue | None
    n_faces: int


def landmark_size(face: Face) -> float:
    """The face's size for subject choice: its eye distance in pixels."""
    lm = np.asarray(face.landmarks5, np.float64)
    return float(np.linalg.norm(lm[1] - lm[0]))


def subject_policy(face_cfg, tenant: str | None = None) -> SubjectPolicy:
    """The policy the face service applies for ``tenant`` (its own second-face ratio, if any)."""
    own = face_cfg.tenants.get(tenant) if tenant else None
    ratio = (own.second_face_ratio if own is not None else None) or face_cfg.second_face_ratio
    return SubjectPolicy(second_face_ratio=ratio, rival_min_sharpness_ratio=face_cfg.rival_min_sharpness_ratio)


def choose_subject(faces: Sequence[Face], image_shape: tuple[int, ...], policy: SubjectPolicy = SubjectPolicy(),
                   sharpness_of: Callable[[Face], float] | None = None) -> SubjectChoice:
    """``sharpness_of``: the sharpness of a face (services/face/quality.py), asked only of faces that
    are rivals by size; without it no rival is ignored for blur."""
    if not faces:
        return SubjectChoice(None, SubjectIssue.NO_FACE, 0)
    h, w = image_shape[:2]
    half_diag = float(np.hypot(w, h)) / 2
    centre = np.array([w / 2, h / 2], np.float32)
    sizes = {id(f): landmark_size(f) for f in faces}

    def value(f: Face) -> float:
        c = (f.box[:2] + f.box[2:]) / 2
        d = min(float(np.linalg.norm(c - centre)) / half_diag, 1.0)
        return sizes[id(f)] * (1.0 - policy.centre_weight * d)

    subject = max(faces, key=value)
    rivals = [f for f in faces if f is not subject and sizes[id(f)] >= policy.second_face_ratio * sizes[id(subject)]]
    if rivals and sharpness_of is not None and policy.rival_min_sharpness_ratio > 0:
        floor = policy.rival_min_sharpness_ratio * sharpness_of(subject)
        rivals = [f for f in rivals if sharpness_of(f) >= floor]
    if rivals:
        return SubjectChoice(subject, SubjectIssue.MULTIPLE_FACES, len(faces))
    return SubjectChoice(subject, None, len(faces))
