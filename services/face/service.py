"""The FaceService RPCs on top of the face pipeline, the encrypted template store and the audit log.

Status conventions: bytes that are not a usable image (empty, truncated, not JPEG/PNG/WebP, too
large, too small) are INVALID_ARGUMENT with the decode code as reason and the field named. An image
without a usable face refuses an enrolment or identification (INVALID_ARGUMENT, reason NO_FACE,
MULTIPLE_FACES or the quality issue), while Verify answers OK with ``match`` false and the
quality report, so that a caller can ask for another capture. Nothing is stored unless the whole
enrolment succeeds. Decisions use the calibrated threshold of the manifest; without one the
service refuses (FAILED_PRECONDITION MODEL_NOT_CALIBRATED) rather than guess.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from typing import Sequence

import grpc
import numpy as np
from google.protobuf.timestamp_pb2 import Timestamp

from services.common import errors
from services.common.api.v1 import common_pb2, face_pb2
from services.common.config import FaceConfig, FaceTenantPolicy
from services.common.runtime import Runtime
from services.common.storage import ChallengeRecord, TemplateRecord
from services.common.storage.db import utcnow
from services.common.storage.errors import (
    AlreadyExistsError,
    ChallengeExpiredError,
    ChallengeMismatchError,
    ChallengeNotFoundError,
    ChallengeUsedError,
)
from services.common.subjects import actor, require_consent, template_info
from services.common.validation import identifier, subject_ref
from services.face import challenge as ch
from services.face.calibration import Calibrations, NotCalibrated
from services.face.embedding import l2_normalise
from services.face.gallery import Galleries
from services.face.imaging import ImageDecodeError
from services.face.pipeline import FaceAnalysis, FacePipeline
from services.face.subject import SubjectPolicy
from services.face.templates import TemplateVault

log = logging.getLogger("biogate.face")

CHALLENGE_KIND = "face_liveness"
MOVE_ENUMS = {
    "TURN_LEFT": face_pb2.HEAD_MOVE_TURN_LEFT,
    "TURN_RIGHT": face_pb2.HEAD_MOVE_TURN_RIGHT,
    "LOOK_UP": face_pb2.HEAD_MOVE_LOOK_UP,
    "LOOK_DOWN": face_pb2.HEAD_MOVE_LOOK_DOWN,
}
_REASON_TEXT = {
    "NO_FACE": "no face found",
    "MULTIPLE_FACES": "more than one face of comparable size",
    "FACE_TOO_SMALL": "the face is too small",
    "BLUR": "the image is blurred",
    "EXTREME_POSE": "the head is turned too far",
    "UNDER_EXPOSED": "the face is too dark",
    "OVER_EXPOSED": "the face is too bright",
    "FACE_CUT_OFF": "the face is cut off by the frame",
    "LIVENESS_FAILED": "presentation attack suspected",
    "MOVES_NOT_FOLLOWED": "the head movements did not follow the challenge",
    "IDENTITY_CHANGED": "not the same person in every frame",
    "TIMING_IMPLAUSIBLE": "the frame timing is not that of a live capture",
    "DUPLICATE_FRAMES": "frames are repeated",
    "FACE_NOT_FOUND": "no usable face in too many frames",
    "NO_MATCH": "the face does not match the enrolled subject",
    "NOT_ENROLLED": "the subject has no face template",
}


def reason(code: str) -> common_pb2.Reason:
    return common_pb2.Reason(code=code, message=_REASON_TEXT.get(code, code.lower().replace("_", " ")))


def _timestamp(value) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


class FaceService:
    def __init__(self, rt: Runtime, cfg: FaceConfig) -> None:
        self.rt = rt
        self.cfg = cfg
        self.vault = TemplateVault(rt.crypto)
        self.calibrations = Calibrations(rt.settings.models.manifest, cfg.calibration_channel, cfg.calibration_check_s)
        self.galleries = Galleries(rt.storage, self.vault, cfg.gallery_check_s, cfg.gallery_full_check_s)
        self.pipeline: FacePipeline | None = None  # set by the warm-up
        # Frames and images of one request are analysed concurrently so that they share batches.
        self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="face-analyse")

    # ------------------------------------------------------------------ helpers
    @property
    def model_id(self) -> str:
        return self.cfg.embedder

    def policy(self, tenant: str) -> FaceTenantPolicy:
        return self.cfg.tenants.get(tenant) or FaceTenantPolicy()

    def _subject_policy(self, tenant: str) -> SubjectPolicy:
        ratio = self.policy(tenant).second_face_ratio or self.cfg.second_face_ratio
        return SubjectPolicy(second_face_ratio=ratio)

    def _pipeline(self) -> FacePipeline:
        if self.pipeline is None:
            raise errors.unavailable("the face models are still loading", "MODELS_LOADING")
        return self.pipeline

    def threshold(self, tenant: str) -> float:
        target = self.policy(tenant).target_fmr or self.cfg.target_fmr
        try:
            return self.calibrations.threshold(self.model_id, target)
        except NotCalibrated as err:
            hint = f"; run `biogate eval` and `biogate calibrate --model {self.model_id}` first"
            raise errors.failed_precondition(f"{err}{hint if err.reason == 'MODEL_NOT_CALIBRATED' else ''}",
                                             err.reason) from None

    def check_operating_points(self) -> None:
        """The service does not start on a default operating point its calibration marks unsupported."""
        checks = [("face.target_fmr", self.model_id, self.cfg.target_fmr)]
        checks += [("face.liveness_target_apcer", m, self.cfg.liveness_target_apcer) for m in self.cfg.liveness[:1]]
        for setting, model, target in checks:
            try:
                self.calibrations.threshold(model, target)
            except NotCalibrated as err:
                if err.reason == "OPERATING_POINT_UNSUPPORTED":
                    raise RuntimeError(f"{setting} = {target:g}: {err}") from None

    def live_threshold(self) -> float:
        if self._pipeline().liveness is None:
            raise errors.failed_precondition(
                "no liveness model is installed in this deployment; liveness cannot be checked",
                "LIVENESS_UNAVAILABLE",
            )
        try:
            return self.calibrations.threshold(self.cfg.liveness[0], self.cfg.liveness_target_apcer)
        except NotCalibrated as err:
            reason = "LIVENESS_NOT_CALIBRATED" if err.reason == "MODEL_NOT_CALIBRATED" else err.reason
            raise errors.failed_precondition(f"liveness: {err}", reason) from None

    @staticmethod
    def _image_bytes(image: common_pb2.Image, field: str) -> bytes:
        if not image.data:
            raise errors.invalid_argument(f"{field}.data is empty", "EMPTY_IMAGE", **{f"{field}__data": "required"})
        return image.data

    def _decode(self, data: bytes, field: str) -> np.ndarray:
        try:
            return self._pipeline().decode(data)
        except ImageDecodeError as err:
            raise errors.invalid_argument(f"{field}: {err}", err.code.value, **{f"{field}__data": err.code.value}) from None

    def _analyse_many(self, images: Sequence[np.ndarray], **options) -> list[FaceAnalysis]:
        pipeline = self._pipeline()
        futures = [self._pool.submit(pipeline.analyse_image, img, **options) for img in images]
        return [f.result() for f in futures]

    def _template(self, tenant: str, subject: str) -> np.ndarray:
        rec = self.rt.storage.templates.get(tenant, subject, "face", self.model_id)
        if rec is not None:
            require_consent(self.rt, tenant, subject, "face")
            return self.vault.open(rec)
        others = self.rt.storage.templates.list_for_subject(tenant, subject, "face")
        if others:
            raise errors.failed_precondition(
                f"the subject's face template was made with model {others[0].model_id}, which this service "
                f"no longer uses (now {self.model_id}); re-enrol the subject with Enroll(replace=true)",
                "TEMPLATE_MODEL_INACTIVE",
            )
        raise errors.not_found("the subject has no face template; enrol first", "NOT_ENROLLED")

    @staticmethod
    def _quality(index: int, a: FaceAnalysis) -> face_pb2.ImageQuality:
        q = face_pb2.ImageQuality(index=index, accepted=a.accepted, issues=[reason(i) for i in a.issues])
        if a.quality is not None:
            q.face_size_px = a.quality.face_size_px
            q.sharpness = a.quality.sharpness
            q.yaw_deg = a.quality.yaw_deg
            q.pitch_deg = a.quality.pitch_deg
        return q

    # ------------------------------------------------------------------ Enroll
    def enroll(self, req: face_pb2.EnrollFaceRequest) -> face_pb2.EnrollFaceResponse:
        tenant, subject = subject_ref(req.subject)
        if not req.images:
            raise errors.invalid_argument("at least one image is required", images="required")
        if len(req.images) > self.cfg.max_images:
            raise errors.invalid_argument(f"at most {self.cfg.max_images} images", images="too many")
        datas = [self._image_bytes(img, f"images[{i}]") for i, img in enumerate(req.images)]
        require_consent(self.rt, tenant, subject, "face")
        if not req.replace and self.rt.storage.templates.get(tenant, subject, "face", self.model_id):
            raise errors.already_exists("the subject already has a face template; send replace=true to re-enrol")
        decoded = [self._decode(d, f"images[{i}]") for i, d in enumerate(datas)]
        analyses = self._analyse_many(decoded, subject=self._subject_policy(tenant))
        qualities = [self._quality(i, a) for i, a in enumerate(analyses)]
        good = [a.embeddings[self.model_id] for a in analyses if a.accepted]
        if not good:
            first = analyses[0].issues[0]
            raise errors.ServiceError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"no usable face in the images: {_REASON_TEXT.get(first, first)}",
                first if len(analyses) == 1 else "NO_USABLE_IMAGE",
                [(f"images[{i}]", ",".join(a.issues)) for i, a in enumerate(analyses)],
                {f"images_{i}": ",".join(a.issues) for i, a in enumerate(analyses)},
            )
        template = l2_normalise(np.mean(good, axis=0)[None])[0]
        if len(good) > 1:
            self._check_same_person(np.stack(good))
        envelope, key_id = self.vault.seal(tenant, subject, self.model_id, template)
        quality_summary = {
            "submitted": len(analyses),
            "accepted": len(good),
            "issues": sorted({i for a in analyses for i in a.issues}),
        }
        rec = TemplateRecord(tenant, subject, "face", self.model_id, "", envelope, key_id, len(good), quality_summary)
        try:
            stored = self.rt.storage.templates.put(rec, replace=req.replace)
        except AlreadyExistsError:
            raise errors.already_exists("the subject already has a face template; send replace=true to re-enrol") from None
        self.galleries.enrolled(tenant, self.model_id, subject, stored.updated_at, template, new=stored.id == rec.id)
        self.rt.audit.append("face.enrolled", actor(), tenant, subject, {
            "model_id": self.model_id, "samples": len(good), "submitted": len(analyses), "replace": bool(req.replace),
        })
        active = {m.id for m in self.rt.models.manifest.models if m.active}
        return face_pb2.EnrollFaceResponse(template=template_info(stored, active), images=qualities)

    def _check_same_person(self, embeddings: np.ndarray) -> None:
        """Images of several people must not be averaged into one template: every pair must match
        at the calibrated FMR 1e-2 threshold."""
        try:
            floor = self.calibrations.threshold(self.model_id, 1e-2)
        except NotCalibrated:
            return
        pairs = embeddings @ embeddings.T
        if float(pairs.min()) < floor:
            raise errors.invalid_argument(
                "the enrolment images do not all show the same person", "IDENTITY_INCONSISTENT", images="different people"
            )

    # ------------------------------------------------------------------ Verify
    def verify(self, req: face_pb2.VerifyFaceRequest) -> face_pb2.VerifyFaceResponse:
        tenant, subject = subject_ref(req.subject)
        data = self._image_bytes(req.image, "image")
        policy = self.policy(tenant)
        want_live = req.require_liveness or policy.require_liveness
        threshold = self.threshold(tenant)
        live_threshold = self.live_threshold() if want_live else None
        template = self._template(tenant, subject)
        image = self._decode(data, "image")
        a = self._pipeline().analyse_image(image, liveness=want_live, subject=self._subject_policy(tenant))
        out = face_pb2.VerifyFaceResponse(
            model_id=self.model_id, threshold=threshold, liveness_checked=False, quality=self._quality(0, a)
        )
        details = {"model_id": self.model_id, "threshold": round(threshold, 4)}
        if not a.accepted:
            out.reasons.extend(reason(i) for i in a.issues)
            details.update(match=False, issues=list(a.issues))
        else:
            score = float(np.dot(template, a.embeddings[self.model_id]))
            out.score = score
            out.llr = self.calibrations.llr(self.model_id, score)
            out.match = score >= threshold
            if not out.match:
                out.reasons.append(reason("NO_MATCH"))
            if want_live:
                out.liveness_checked = True
                out.live = a.liveness >= live_threshold
                details.update(live_score=round(a.liveness, 4), live_threshold=round(live_threshold, 4))
                if not out.live:
                    out.match = False
                    out.reasons.append(reason("LIVENESS_FAILED"))
            details.update(score=round(score, 4), llr=round(out.llr, 3), match=out.match, live=out.live)
        self.rt.audit.append("face.verified", actor(), tenant, subject, details)
        return out

    # ------------------------------------------------------------------ Identify
    def identify(self, req: face_pb2.IdentifyFaceRequest) -> face_pb2.IdentifyFaceResponse:
        tenant = identifier(req.tenant_id, "tenant_id")
        k = req.top_k or 5
        if not 1 <= k <= self.cfg.identify_max_k:
            raise errors.invalid_argument(f"top_k must be 1..{self.cfg.identify_max_k}", top_k="out of range")
        data = self._image_bytes(req.image, "image")
        threshold = self.threshold(tenant)
        a = self._pipeline().analyse_image(self._decode(data, "image"), subject=self._subject_policy(tenant))
        if not a.accepted:
            raise errors.invalid_argument(
                f"no usable face: {', '.join(_REASON_TEXT.get(i, i) for i in a.issues)}", a.issues[0],
                image=",".join(a.issues),
            )
        top, size = self.galleries.search(tenant, self.model_id, a.embeddings[self.model_id], k)
        above = sum(s >= threshold for _, s in top)
        self.rt.audit.append("face.identified", actor(), tenant, None, {
            "model_id": self.model_id, "gallery_size": size, "top_k": k, "above_threshold": above,
            "top_score": round(top[0][1], 4) if top else None, "threshold": round(threshold, 4),
        })
        return face_pb2.IdentifyFaceResponse(
            candidates=[face_pb2.Candidate(subject_id=s, score=v, above_threshold=v >= threshold) for s, v in top],
            model_id=self.model_id,
            gallery_size=size,
        )

    # ------------------------------------------------------------------ passive liveness
    def check_liveness(self, req: face_pb2.CheckLivenessRequest) -> face_pb2.CheckLivenessResponse:
        tenant = identifier(req.tenant_id, "tenant_id")
        data = self._image_bytes(req.image, "image")
        threshold = self.live_threshold()
        a = self._pipeline().analyse_image(
            self._decode(data, "image"), liveness=True, embed=False, subject=self._subject_policy(tenant)
        )
        if a.face is None or "MULTIPLE_FACES" in a.issues:
            self.rt.audit.append("face.liveness_checked", actor(), tenant, None, {"live": False, "issues": list(a.issues)})
            return face_pb2.CheckLivenessResponse(live=False, reasons=[reason(i) for i in a.issues])
        live = a.liveness >= threshold
        self.rt.audit.append("face.liveness_checked", actor(), tenant, None, {
            "live": live, "live_score": round(a.liveness, 4), "live_threshold": round(threshold, 4),
        })
        return face_pb2.CheckLivenessResponse(live=live, reasons=[] if live else [reason("LIVENESS_FAILED")])

    # ------------------------------------------------------------------ active liveness
    def start_challenge(self, req: face_pb2.StartLivenessChallengeRequest) -> face_pb2.StartLivenessChallengeResponse:
        tenant, subject = subject_ref(req.subject)
        self.live_threshold()
        c = self.cfg.challenge
        moves = ch.random_moves(c.moves)
        now = utcnow()
        rec = self.rt.storage.challenges.create(ChallengeRecord(
            tenant, subject, CHALLENGE_KIND, {"moves": moves, "issued_at": now.isoformat()},
            expires_at=now + timedelta(seconds=c.ttl_s), created_at=now,
        ))
        self.rt.audit.append("face.challenge_started", actor(), tenant, subject, {"moves": len(moves), "ttl_s": c.ttl_s})
        return face_pb2.StartLivenessChallengeResponse(
            challenge=common_pb2.Challenge(nonce=rec.nonce, expires_at=_timestamp(rec.expires_at)),
            moves=[MOVE_ENUMS[m] for m in moves],
            min_frames=self._min_frames(len(moves)),
            max_frames=c.max_frames,
        )

    def _min_frames(self, n_moves: int) -> int:
        return max(self.cfg.challenge.min_frames, n_moves + 1)

    def _rules(self) -> ch.ChallengeRules:
        c = self.cfg.challenge
        identity = c.identity_min_cosine
        if identity is None:
            try:
                identity = self.calibrations.threshold(self.model_id, 1e-2)
            except NotCalibrated:
                raise errors.failed_precondition(
                    "no identity threshold: calibrate the embedder or set face.challenge.identity_min_cosine",
                    "MODEL_NOT_CALIBRATED",
                ) from None
        return ch.ChallengeRules(
            turn_deg=c.turn_deg, tilt_deg=c.tilt_deg, neutral_deg=c.neutral_deg,
            min_frame_gap_ms=c.min_frame_gap_ms, max_frame_gap_ms=c.max_frame_gap_ms, min_move_ms=c.min_move_ms,
            identity_min_cosine=identity, live_threshold=self.live_threshold(),
        )

    def submit_challenge(self, req: face_pb2.SubmitLivenessChallengeRequest) -> face_pb2.SubmitLivenessChallengeResponse:
        tenant, subject = subject_ref(req.subject)
        if not req.nonce or len(req.nonce) > 128:
            raise errors.invalid_argument("nonce is required", nonce="required")
        c = self.cfg.challenge
        if not c.moves + 1 <= len(req.frames) <= c.max_frames:
            raise errors.invalid_argument(
                f"{len(req.frames)} frames; send {self._min_frames(c.moves)}..{c.max_frames}", frames="count out of range"
            )
        datas = [self._image_bytes(f.image, f"frames[{i}].image") for i, f in enumerate(req.frames)]
        rules = self._rules()
        threshold = self.threshold(tenant) if req.verify_subject else None
        # Decode before the nonce is spent: a malformed request does not burn the challenge.
        images = [self._decode(d, f"frames[{i}].image") for i, d in enumerate(datas)]
        payload, issued_ago_ms = self._consume(req.nonce, tenant, subject)
        moves = payload["moves"]
        if len(req.frames) < self._min_frames(len(moves)):
            raise errors.invalid_argument(f"at least {self._min_frames(len(moves))} frames", frames="too few")
        analyses = self._analyse_many(images, liveness=True, enforce_quality=False, subject=self._subject_policy(tenant))
        frames = [
            ch.FrameObservation(
                capture_time_ms=f.capture_time_ms,
                digest=ch.frame_digest(d),
                yaw=a.quality.yaw_deg if a.quality is not None and a.embeddings else None,
                pitch=a.quality.pitch_deg if a.quality is not None and a.embeddings else None,
                live=a.liveness,
                embedding=a.embeddings.get(self.model_id),
            )
            for f, d, a in zip(req.frames, datas, analyses)
        ]
        result = ch.evaluate(moves, frames, issued_ago_ms, rules)
        out = face_pb2.SubmitLivenessChallengeResponse(model_id=self.model_id, reasons=[reason(r) for r in result.reasons])
        details = {"model_id": self.model_id, "challenge_passed": result.passed, "reasons": list(result.reasons),
                   **result.details}
        passed = result.passed
        if req.verify_subject:
            match, score = False, None
            try:
                template = self._template(tenant, subject)
            except errors.ServiceError as err:
                out.reasons.append(reason(err.reason or "NOT_ENROLLED"))
            else:
                if result.embedding is not None:
                    score = float(np.dot(template, result.embedding))
                    match = score >= threshold
                    out.score = score
                    out.llr = self.calibrations.llr(self.model_id, score)
                    if not match:
                        out.reasons.append(reason("NO_MATCH"))
            out.match = match
            passed = passed and match
            details.update(match=match, score=round(score, 4) if score is not None else None,
                           threshold=round(threshold, 4))
        out.passed = passed
        details["passed"] = passed
        self.rt.audit.append("face.challenge_submitted", actor(), tenant, subject, details)
        return out

    def _consume(self, nonce: str, tenant: str, subject: str) -> tuple[dict, float]:
        try:
            payload = dict(self.rt.storage.challenges.consume(nonce, tenant, subject, CHALLENGE_KIND))
        except ChallengeNotFoundError:
            raise errors.not_found("unknown challenge nonce", "CHALLENGE_UNKNOWN") from None
        except ChallengeMismatchError:
            raise errors.failed_precondition("the challenge was issued for another subject", "CHALLENGE_MISMATCH") from None
        except ChallengeUsedError:
            raise errors.failed_precondition("the challenge was already used; start a new one", "CHALLENGE_USED") from None
        except ChallengeExpiredError:
            raise errors.failed_precondition("the challenge expired; start a new one", "CHALLENGE_EXPIRED") from None
        issued = datetime.fromisoformat(payload["issued_at"])
        return payload, (utcnow() - issued).total_seconds() * 1000.0

    # ------------------------------------------------------------------ erasure
    def deleted(self, tenant: str, subject: str) -> None:
        self.galleries.deleted(tenant, subject)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self.pipeline is not None:
            self.pipeline.close()

