"""The face service's enrolment and refusal rules, in one place for FaceService and for the
evaluation's local scorer (services/face/evaluation.py), so that both refuse the same images and
build the same templates (tests/evaluation/test_parity.py checks it trial by trial).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from services.face.embedding import l2_normalise
from services.face.pipeline import FaceAnalysis


class EnrolmentRefused(Exception):
    """No template: ``code`` is the reason (services/common/modality/reasons.py)."""

    def __init__(self, code: str, message: str | None = None, fields: dict[str, str] | None = None,
                 metadata: dict[str, str] | None = None) -> None:
        super().__init__(message or code)
        self.code, self.message, self.fields, self.metadata = code, message, fields, metadata


def enrolment_template(analyses: Sequence[FaceAnalysis], model_id: str,
                       same_person_floor: float | None) -> tuple[np.ndarray, int]:
    """-> (the template, the number of images it averages). Images with any issue are left out; with
    none left the enrolment is refused with the first image's first issue (NO_USABLE_IMAGE for
    several images). Several accepted images must be of one person: every pair at or above
    ``same_person_floor`` (the calibrated FMR 1e-2 threshold; None: not checked)."""
    good = [a.embeddings[model_id] for a in analyses if a.accepted]
    if not good:
        first = analyses[0].issues[0]
        issues = {f"images[{i}]": ",".join(a.issues) for i, a in enumerate(analyses)}
        raise EnrolmentRefused(first if len(analyses) == 1 else "NO_USABLE_IMAGE", None, issues,
                               {f"images_{i}": ",".join(a.issues) for i, a in enumerate(analyses)})
    if len(good) > 1 and same_person_floor is not None:
        stacked = np.stack(good)
        if float((stacked @ stacked.T).min()) < same_person_floor:
            raise EnrolmentRefused("IDENTITY_INCONSISTENT", None, {"images": "different people"})
    return l2_normalise(np.mean(good, axis=0)[None])[0], len(good)


def liveness_unanswerable(a: FaceAnalysis) -> bool:
    """CheckLiveness gives no liveness decision for an image without one clear subject face."""
    return a.face is None or "MULTIPLE_FACES" in a.issues
