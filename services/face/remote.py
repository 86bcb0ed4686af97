"""Face scorers for `biogate eval --target host:port`: the evaluation through a running FaceService.

Verification: each reference is enrolled (Enroll, replace=true) as a subject of the evaluation
tenant (or ``--tenant``), and each probe scored with Verify: its ``score`` is the cosine the service
decided on, and its whole decision is kept (the comparison, and liveness when the tenant's policy
requires it). A probe the service refuses for its quality is a non-response (a Failure of the
``quality`` layer), as in the local scorer.
PAD: CheckLiveness answers live or not, never a score: the result is the decision alone, and the
report gives its APCER/BPCER and no EER or DET (the local scorer gives those from scores).

Consent: enrolment requires a recorded consent, so the scorer records one for each evaluation
subject in the storage the settings name (the evaluated service's own). The caller's token comes
from $BIOGATE_EVAL_TOKEN, or the development credentials of the settings' data dir.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Sequence

import grpc

from services.common.api.v1 import common_pb2, face_pb2, face_pb2_grpc
from services.common.client import connect
from services.common.errors import details_of
from services.common.evaluation.scorers import Decision, Failure, Scored, ScorerOptions, register_scorer
from services.common.storage import ConsentRecord, open_storage

EVAL_TENANT = "biogate-eval"
_QUALITY_CODES = {"NO_FACE", "MULTIPLE_FACES"}


def _token(options: ScorerOptions) -> str | None:
    token = os.environ.get("BIOGATE_EVAL_TOKEN")
    if token:
        return token
    from services.common.server.auth import ensure_dev_credentials

    settings = options.settings
    if settings.auth.dev_credentials and not settings.auth.principals:
        return ensure_dev_credentials(settings)["dev-all"]
    return None


def _failure(err: grpc.RpcError) -> Failure:
    if err.code() != grpc.StatusCode.INVALID_ARGUMENT:
        raise err  # not a property of the sample: a bug or an outage, which stops the evaluation
    reason = details_of(err)["reason"] or "invalid_argument"
    layer = "enrolment" if reason == "IDENTITY_INCONSISTENT" else ("decode" if reason in _DECODE_CODES else "quality")
    return Failure(reason.lower(), layer)


def _decode_codes() -> frozenset[str]:
    from services.face.imaging import DecodeErrorCode

    return frozenset(c.value for c in DecodeErrorCode)


class RemoteFaceVerificationScorer:
    score_name = "cosine"

    def __init__(self, options: ScorerOptions, tenant: str = EVAL_TENANT) -> None:
        self.stub = face_pb2_grpc.FaceServiceStub(connect(options.remote_target(), _token(options)))
        self.tenant = options.tenant or tenant
        self.storage = open_storage(options.settings.storage_dsn, options.settings.storage)
        self.timeout = 60.0

    def _subject(self, paths: Sequence[Path]) -> str:
        key = "\n".join(str(Path(p).resolve()) for p in paths).encode()
        return "eval-" + hashlib.sha256(key).hexdigest()[:24]

    def enroll(self, paths: Sequence[Path]) -> str | Failure:
        subject = self._subject(paths)
        self.storage.subjects.record_consent(
            ConsentRecord(self.tenant, subject, "biometric_verification", ("face",), "eval", "biogate eval")
        )
        ref = common_pb2.SubjectRef(tenant_id=self.tenant, subject_id=subject)
        images = [common_pb2.Image(data=Path(p).read_bytes()) for p in paths]
        try:
            self.stub.Enroll(face_pb2.EnrollFaceRequest(subject=ref, images=images, replace=True), timeout=self.timeout)
        except grpc.RpcError as err:
            return _failure(err)
        return subject

    def score(self, handle: str, probe: Path) -> Scored | Failure:
        ref = common_pb2.SubjectRef(tenant_id=self.tenant, subject_id=handle)
        try:
            r = self.stub.Verify(
                face_pb2.VerifyFaceRequest(subject=ref, image=common_pb2.Image(data=Path(probe).read_bytes())),
                timeout=self.timeout,
            )
        except grpc.RpcError as err:
            return _failure(err)
        if not r.quality.accepted:
            return Failure(r.reasons[0].code.lower() if r.reasons else "rejected", "quality")
        codes = tuple(x.code for x in r.reasons)
        layers = [("comparison", "NO_MATCH" not in codes)]
        if r.liveness_checked:
            layers.append(("liveness", r.live))
        decision = Decision.of_layers(layers, codes)
        if decision.accepted != r.match:
            raise ValueError(f"Verify answered match={r.match} with reasons {codes}: the layers do not explain it")
        return Scored(float(r.score), decision)


class RemoteFacePadScorer:
    score_name = "live_decision"

    def __init__(self, options: ScorerOptions, tenant: str = EVAL_TENANT) -> None:
        self.stub = face_pb2_grpc.FaceServiceStub(connect(options.remote_target(), _token(options)))
        self.tenant = options.tenant or tenant

    def score(self, path: Path) -> Scored | Failure:
        try:
            r = self.stub.CheckLiveness(
                face_pb2.CheckLivenessRequest(tenant_id=self.tenant, image=common_pb2.Image(data=Path(path).read_bytes())),
                timeout=60.0,
            )
        except grpc.RpcError as err:
            return _failure(err)
        codes = [x.code for x in r.reasons]
        unanswered = [c for c in codes if c in _QUALITY_CODES]
        if unanswered:
            return Failure(unanswered[0].lower(), "quality")
        return Scored(None, Decision.of_layers([("liveness", r.live)], tuple(codes)))


def make_remote_verification_scorer(options: ScorerOptions) -> RemoteFaceVerificationScorer:
    return RemoteFaceVerificationScorer(options)


def make_remote_pad_scorer(options: ScorerOptions) -> RemoteFacePadScorer:
    return RemoteFacePadScorer(options)


_DECODE_CODES = _decode_codes()

register_scorer("face", "verification", make_remote_verification_scorer, mode="remote")
register_scorer("face", "pad", make_remote_pad_scorer, mode="remote")
