"""The one catalogue of reason codes of the face and voice services: code -> default message and the
gRPC status a refusal with that code carries.

A code is either a refusal (the RPC fails with the entry's status and an ErrorInfo reason) or a
reason inside an answer (a decision's ``reasons``, a capture's quality issues); an entry with a
status may be both (NO_FACE refuses an enrolment and explains a Verify answer). The same failure
is the same code and status from every service: a bank's integration, and the MFA that passes
these on, handles one vocabulary. tests/services/test_modality_kit.py walks the catalogue against
the code of both services.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

import grpc

from services.common import errors
from services.common.api.v1 import common_pb2

_INVALID = grpc.StatusCode.INVALID_ARGUMENT
_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION


@dataclass(frozen=True)
class Entry:
    status: grpc.StatusCode | None  # None: only ever a reason inside an answer, never a refusal
    message: str


CATALOGUE: Mapping[str, Entry] = MappingProxyType({
    # -- the request itself
    "INVALID_ARGUMENT": Entry(_INVALID, "the request is malformed; the field violations name the fields"),
    "UNSUPPORTED_FORMAT": Entry(_INVALID, "the data is not in a supported format"),
    "UTTERANCE_COUNT": Entry(_INVALID, "the number of utterances is out of range"),
    "MIXED_CHANNELS": Entry(_INVALID, "the utterances mix telephone and wideband audio"),
    "HEADER_REQUIRED": Entry(_INVALID, "the first message of a stream must be its header"),
    "UNEXPECTED_HEADER": Entry(_INVALID, "only audio chunks may follow the header"),
    "BAD_AUDIO_FORMAT": Entry(_INVALID, "the declared sample rate or channel count is out of range"),
    # -- images (services/face/imaging.py)
    "EMPTY_IMAGE": Entry(_INVALID, "the image is empty"),
    "TRUNCATED_IMAGE": Entry(_INVALID, "the image is truncated"),
    "IMAGE_TOO_LARGE": Entry(_INVALID, "the image is too large"),
    "IMAGE_TOO_COMPLEX": Entry(_INVALID, "the image would take too long to decode (a JPEG of too many scans)"),
    "IMAGE_TOO_SMALL": Entry(_INVALID, "the image is too small"),
    # -- faces in an image (services/face/subject.py, quality.py)
    "NO_FACE": Entry(_INVALID, "no face found"),
    "MULTIPLE_FACES": Entry(_INVALID, "more than one face of comparable size"),
    "FACE_TOO_SMALL": Entry(_INVALID, "the face is too small"),
    "BLUR": Entry(_INVALID, "the image is blurred"),
    "EXTREME_POSE": Entry(_INVALID, "the head is turned too far"),
    "UNDER_EXPOSED": Entry(_INVALID, "the face is too dark"),
    "OVER_EXPOSED": Entry(_INVALID, "the face is too bright"),
    "FACE_CUT_OFF": Entry(_INVALID, "the face is cut off by the frame"),
    "NO_USABLE_IMAGE": Entry(_INVALID, "no image holds a usable face"),
    "IDENTITY_INCONSISTENT": Entry(_INVALID, "the enrolment images do not all show the same person"),
    # -- audio (services/voice/ingest.py): malformed is INVALID_ARGUMENT, unusable speech FAILED_PRECONDITION
    "EMPTY_AUDIO": Entry(_INVALID, "the audio is empty"),
    "TOO_SHORT": Entry(_INVALID, "the audio is too short"),
    "TOO_LONG": Entry(_INVALID, "the audio is too long"),
    "TOO_LARGE": Entry(_INVALID, "the audio is too large"),
    "MALFORMED_AUDIO": Entry(_INVALID, "the audio cannot be decoded"),
    "BAD_SAMPLE_RATE": Entry(_INVALID, "the sample rate is not supported or not the declared one"),
    "NON_FINITE": Entry(_INVALID, "the audio holds non-finite samples"),
    "SILENCE": Entry(_PRECONDITION, "the audio is silent"),
    "CLIPPING": Entry(_PRECONDITION, "the audio is clipped"),
    "NO_SPEECH": Entry(_PRECONDITION, "no speech detected"),
    "LOW_NET_SPEECH": Entry(_PRECONDITION, "too little net speech"),
    "DC_OFFSET": Entry(None, "the audio has a DC offset"),
    # -- subject, consent and templates (services/common/modality/templates.py)
    "NO_CONSENT": Entry(_PRECONDITION, "no active consent for biometric verification of this subject"),
    "NOT_ENROLLED": Entry(grpc.StatusCode.NOT_FOUND, "the subject has no template; enrol first"),
    "ALREADY_ENROLLED": Entry(grpc.StatusCode.ALREADY_EXISTS, "the subject already has a template; set replace to re-enrol"),
    "TEMPLATE_MODEL_INACTIVE": Entry(_PRECONDITION, "the subject's template was made with a model this service no longer uses; re-enrol"),
    # -- failed verifications per subject (attempts.py)
    "VERIFY_LIMITED": Entry(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many failed verifications of this subject; try again later"),
    # -- challenges (services/common/modality/challenges.py)
    "CHALLENGE_NOT_FOUND": Entry(grpc.StatusCode.NOT_FOUND, "unknown challenge nonce"),
    "CHALLENGE_EXPIRED": Entry(_PRECONDITION, "the challenge has expired; start a new one"),
    "CHALLENGE_USED": Entry(_PRECONDITION, "the challenge was already used; start a new one"),
    "CHALLENGE_MISMATCH": Entry(_PRECONDITION, "the challenge was issued for another subject or purpose"),
    "CHALLENGE_REQUIRED": Entry(_PRECONDITION, "this tenant's policy requires a challenge: start one and answer it"),
    # -- the service's models (readiness.py, calibration.py)
    "MODELS_LOADING": Entry(grpc.StatusCode.UNAVAILABLE, "the models are still loading; retry shortly"),
    "MODEL_NOT_CALIBRATED": Entry(_PRECONDITION, "the model has no calibrated threshold for this operating point"),
    # the calibration record's own refusals (services/common/models/calibration.py)
    "OPERATING_POINT_MISSING": Entry(_PRECONDITION, "the calibration has no operating point for this target"),
    "OPERATING_POINT_UNSUPPORTED": Entry(_PRECONDITION, "the calibration data cannot support this operating point"),
    "LIVENESS_UNAVAILABLE": Entry(_PRECONDITION, "no liveness model is installed in this deployment"),
    # -- decisions
    "NO_MATCH": Entry(None, "the sample does not match the enrolled template"),
    "SPOOF_SUSPECTED": Entry(_PRECONDITION, "the capture failed the anti-spoofing checks"),
    "CHALLENGE_FAILED": Entry(None, "the spoken digits do not match the challenge"),
    "LIVENESS_FAILED": Entry(None, "presentation attack suspected"),
    "MOVES_NOT_FOLLOWED": Entry(None, "the head movements did not follow the challenge"),
    "IDENTITY_CHANGED": Entry(None, "not the same person in every frame"),
    "TIMING_IMPLAUSIBLE": Entry(None, "the frame timing is not that of a live capture"),
    "DUPLICATE_FRAMES": Entry(None, "frames are repeated"),
    "FACE_NOT_FOUND": Entry(None, "no usable face in too many frames"),
})


def entry(code: str) -> Entry:
    try:
        return CATALOGUE[code]
    except KeyError:
        raise KeyError(f"reason code {code!r} is not in the catalogue (services/common/modality/reasons.py)") from None


def message(code: str) -> str:
    return entry(code).message


def reason(code: str, text: str | None = None) -> common_pb2.Reason:
    """A reason inside an answer (a decision, a quality report)."""
    return common_pb2.Reason(code=code, message=text or message(code))


def refusal(code: str, text: str | None = None, *, fields: Mapping[str, str] | None = None,
            metadata: Mapping[str, str] | None = None) -> errors.ServiceError:
    """The error that refuses an RPC with ``code``: the catalogue's status, ``text`` (default: the
    catalogue's message), field violations (proto paths -> what is wrong) and ErrorInfo metadata."""
    status = entry(code).status
    if status is None:
        raise ValueError(f"reason code {code!r} explains an answer; it never refuses a request")
    return errors.ServiceError(status, text or message(code), code, list((fields or {}).items()), dict(metadata or {}))
