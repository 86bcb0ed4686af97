"""One code path: the local face evaluation and the evaluation through a running FaceService give
the same decision, refusing layer and failure for every trial and presentation, and the same score.

Trials: trials_face.csv, and every pair of the photos of the identities set whose people have a
photo the rules refuse (a comparable second face, a turned head), plus a copy of one photo with
the face shrunk to 0.4x in a frame of the same size, enrolled and probed (the identities set holds
no face too small for the gate since it measures the frontal eye distance), so that enrolment and
probe refusals are compared too. PAD: pad_face.csv at the calibrated liveness threshold.

Score tolerance 1e-5: the service returns the cosine as a float32 (rounding <= 6e-8 for |s| <= 1)
and its embedder runs micro-batched, where onnxruntime may sum in another order than at batch 1
(differences of about 1e-6 seen on the MobileFaceNet outputs); a different face, crop or
template would move the cosine by far more (genuine and impostor scores differ by > 0.1).
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
import pytest

from services.common.evaluation.runner import run_pad, run_verification
from services.common.evaluation.scorers import ScorerOptions
from services.common.evaluation.trials import VerificationTrial, all_pairs, read_pad, read_people, read_trials
from services.face.evaluation import make_pad_scorer, make_verification_scorer
from services.face.remote import RemoteFacePadScorer, RemoteFaceVerificationScorer
from tests.conftest import Prefetched, present, side_by_side

pytestmark = pytest.mark.eval  # evaluation-grade: a whole fixture list through the models

TOLERANCE = 1e-5
# People of fixtures/face/identities with a photo refused by the subject or pose rules
# (bench/face_gates_eval.py), and two without.
PEOPLE = ("Antonio_Banderas", "Hugh_Grant", "Sean_OKeefe", "Jake_Gyllenhaal", "Aaron_Peirsol", "Abdullah")


def _outcome(r):
    failure = (r.stage, r.failure.layer, r.failure.reason) if r.failure else None
    decision = (r.decision.accepted, r.decision.refused_by) if r.decision else None
    return failure, decision


def _same(local, remote) -> list[str]:
    diffs = []
    for a, b in zip(local.results, remote.results, strict=True):
        name = f"{getattr(a, 'trial', None) or a.sample}"
        if _outcome(a) != _outcome(b):
            diffs.append(f"{name}: local {_outcome(a)}, service {_outcome(b)}")
        elif (a.score is None) != (b.score is None) or (a.score is not None and abs(a.score - b.score) > TOLERANCE):
            diffs.append(f"{name}: local score {a.score}, service {b.score}")
    return diffs


def small_face_trials(fixtures_dir, folder) -> list[VerificationTrial]:
    """A copy of one identities photo with the face at 0.4x in a grey frame of the photo's size
    (eye distance about 18 px, under the gate's 24), enrolled against and probed by the person's
    other photo."""
    person = "Abdullah"
    photos = [fixtures_dir / "face" / "identities" / person / f"{person}_000{i}.jpg" for i in (1, 2)]
    img = cv2.imread(str(photos[0]))
    assert img is not None
    small = cv2.resize(img, None, fx=0.4, fy=0.4, interpolation=cv2.INTER_AREA)
    frame = np.full_like(img, 127)
    y, x = (img.shape[0] - small.shape[0]) // 2, (img.shape[1] - small.shape[1]) // 2
    frame[y:y + small.shape[0], x:x + small.shape[1]] = small
    shrunk = folder / f"{person}_small.jpg"
    cv2.imwrite(str(shrunk), frame)
    same: dict[str, Any] = {"target": True, "trial_type": "genuine", "enroll_identity": person, "probe_identity": person}
    return [VerificationTrial(enroll=(shrunk,), probe=photos[1], **same),
            VerificationTrial(enroll=(photos[1],), probe=shrunk, **same)]


@pytest.fixture(scope="module")
def options(face_service):
    return ScorerOptions(settings=face_service.settings, target=face_service.address)


def test_verification_decisions_are_the_same_locally_and_through_the_service(options, fixtures_dir, tmp_path):
    trials = read_trials(fixtures_dir / "trials_face.csv", fixtures_dir)
    people = [e for e in read_people(fixtures_dir / "face" / "identities" / "SOURCES.csv", "face")
              if e.identity in PEOPLE]
    trials += all_pairs(people, "face") + small_face_trials(fixtures_dir, tmp_path)
    local, remote = side_by_side(lambda: run_verification(make_verification_scorer(ScorerOptions(settings=options.settings)), trials),
                                 lambda: run_verification(Prefetched(RemoteFaceVerificationScorer(options), trials), trials))
    assert _same(local, remote) == []
    # The comparison set exercises every path: refused enrolments and probes, accepted and refused trials.
    reasons = local.failure_reasons
    assert reasons.get("enrol:multiple_faces") and reasons.get("probe:multiple_faces")
    assert reasons.get("enrol:face_too_small") and reasons.get("probe:face_too_small")
    decided = [r for r in local.results if r.decision]
    assert any(present(r.decision).accepted for r in decided) and any(not present(r.decision).accepted for r in decided)
    assert local.has_decisions and all(present(r.decision).layers[0][0] == "comparison" for r in decided)


def test_liveness_decisions_are_the_same_locally_and_through_the_service(options, fixtures_dir):
    samples = read_pad(fixtures_dir / "pad_face.csv", fixtures_dir)
    local, remote = side_by_side(lambda: run_pad(make_pad_scorer(ScorerOptions(settings=options.settings)), samples),
                                 lambda: run_pad(RemoteFacePadScorer(options), samples))
    diffs = [f"{a.sample.path.name}: local {_outcome(a)}, service {_outcome(b)}"
             for a, b in zip(local.results, remote.results, strict=True) if _outcome(a) != _outcome(b)]
    assert diffs == []
    assert remote.has_decisions and not remote.has_scores  # CheckLiveness gives decisions only
    assert any(r.decision.accepted for r in local.results if r.decision)
    assert any(not r.decision.accepted for r in local.results if r.decision)
