"""Choosing the subject face: the largest, most central one; refused when another face is comparable."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Sequence

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


@dataclass(frozen=True)
class SubjectChoice:
    face: Face | None
    issue: SubjectIssue | None
    n_faces: int


def choose_subject(faces: Sequence[Face], image_shape: tuple[int, ...], policy: SubjectPolicy = SubjectPolicy()) -> SubjectChoice:
    if not faces:
        return SubjectChoice(None, SubjectIssue.NO_FACE, 0)
    h, w = image_shape[:2]
    half_diag = float(np.hypot(w, h)) / 2
    centre = np.array([w / 2, h / 2], np.float32)

    def value(f: Face) -> float:
        c = (f.box[:2] + f.box[2:]) / 2
        d = min(float(np.linalg.norm(c - centre)) / half_diag, 1.0)
        return f.size * (1.0 - policy.centre_weight * d)

    subject = max(faces, key=value)
    rivals = [f for f in faces if f is not subject and f.size >= policy.second_face_ratio * subject.size]
    if rivals:
        return SubjectChoice(subject, SubjectIssue.MULTIPLE_FACES, len(faces))
    return SubjectChoice(subject, None, len(faces))
