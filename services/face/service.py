"""The FaceService RPCs on top of the face pipeline, the encrypted template store and the audit log.

Status conventions (reason codes and statuses from services/common/modality/reasons.py): bytes
that are not a usable image (empty, truncated, not JPEG/PNG/WebP, too large, too small) are
INVALID_ARGUMENT with the decode code as reason and the field named. An image without a usable
face refuses an enrolment or identification (INVALID_ARGUMENT, reason NO_FACE, MULTIPLE_FACES or
the quality issue), while Verify answers OK with ``match`` false and the quality report, so that a
caller can ask for another capture. Nothing is stored unless the whole enrolment succeeds.
Decisions use the calibrated threshold of the manifest; without one the service refuses
(FAILED_PRECONDITION MODEL_NOT_CALIBRATED) rather than guess.
"""

from __future__ import annotations

import contextvars
import logging
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from functools import partial
from typing import Sequence

import numpy as np

from services.common import context, errors, subjects
from services.common.api.v1 import common_pb2, face_pb2
from services.common.context import Principal
from services.face.config import FaceConfig, FaceTenantPolicy
from services.common.metrics import observe_similarity
from services.common.modality.attempts import Attempt, VerifyLimiter
from services.common.modality.calibration import Calibrations, NotCalibrated
from services.common.models.calibration import UNSUPPORTED
from services.common.modality.challenges import Challenges, nonce_field
from services.common.modality.readiness import ReadinessGate
from services.common.modality.reasons import message, reason, refusal
from services.common.modality.templates import Templates, TemplateVault
from services.common.runtime import Runtime
from services.common.subjects import template_info
from services.common.validation import identifier, subject_ref
from services.face import challenge as ch
from services.face import metrics
from services.face.gallery import Galleries
from services.face.imaging import ImageDecodeError
from services.face.models import check_choice, load_pipeline
from services.face.pipeline import FaceAnalysis, FacePipeline
from services.face.rules import EnrolmentRefused, enrolment_template, liveness_unanswerable
from services.face.subject import SubjectPolicy, subject_policy

log = logging.getLogger("biogate.face")

CHALLENGE_KIND = "face_liveness"
MOVE_ENUMS = {
    "TURN_LEFT": face_pb2.HEAD_MOVE_TURN_LEFT,
    "TURN_RIGHT": face_pb2.HEAD_MOVE_TURN_RIGHT,
    "LOOK_UP": face_pb2.HEAD_MOVE_LOOK_UP,
    "LOOK_DOWN": face_pb2.HEAD_MOVE_LOOK_DOWN,
}
EMBEDDER_SCORE = "cosine"  # what the embedders' calibration records must be fitted on
LIVENESS_SCORE = "p_bonafide"  # the ensemble's mean live probability
_NO_OVERRIDES = FaceTenantPolicy()  # a tenant's policy without its own section (read, never changed)


class FaceService:
    def __init__(self, rt: Runtime, cfg: FaceConfig) -> None:
        check_choice(rt.models.manifest, cfg)  # a wrong model id fails start-up, before any loading
        self.rt = rt
        self.cfg = cfg
        self.templates = Templates(rt, "face")
        self.calibrations = Calibrations(rt.settings.models.manifest, cfg.calibration_check_s)
        self.challenges = Challenges(rt, "face", CHALLENGE_KIND)
        self.attempts = VerifyLimiter(rt, "face", self.cfg.verify_limit, self.cfg.tenants)
        self.ready: ReadinessGate[FacePipeline] = ReadinessGate("face")
        self.galleries = Galleries(rt.storage, self.vault, cfg.gallery_check_s, cfg.gallery_full_check_s)
        # Frames and images of one request are analysed concurrently so that they share batches.
        self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="face-analyse")

    def warm_up(self) -> dict[str, str]:
        """Load and run the configured models, then open the gate; -> the health details."""
        cfg = self.cfg
        self.check_operating_points()
        details: dict[str, str] = {}
        pipeline = load_pipeline(self.rt.models, cfg, self.rt.settings.models.providers, details)
        details["models"] = ",".join([cfg.detector, cfg.embedder, *(cfg.liveness if pipeline.liveness is not None else [])])
        details.update({f"provider.{k}": v for k, v in pipeline.providers.items()})
        details["jpeg_decoder"] = pipeline.jpeg_decoder
        details["detector_canvas"] = "fitted" if pipeline.detector.fit_canvas else "full"
        details.setdefault("liveness", "available" if pipeline.liveness is not None else "not configured")
        calibrated = [m for m in (cfg.embedder, *cfg.liveness)
                      if self.calibrations.find(m, cfg.calibration_channel) is not None]
        details["calibrated"] = ",".join(calibrated) or "none"
        self.ready.open(pipeline)
        log.info("face models ready", extra=details)
        return details

    # ------------------------------------------------------------------ helpers
    @property
    def model_id(self) -> str:
        return self.cfg.embedder

    @property
    def vault(self) -> TemplateVault:
        return self.templates.vault

    @property
    def pipeline(self) -> FacePipeline | None:
        return self.ready.value

    def policy(self, tenant: str) -> FaceTenantPolicy:
        return self.cfg.tenants.get(tenant) or _NO_OVERRIDES

    def _subject_policy(self, tenant: str) -> SubjectPolicy:
        return subject_policy(self.cfg, tenant)

    def _pipeline(self) -> FacePipeline:
        return self.ready.get()

    def _threshold(self, model_id: str, target: float, score: str) -> float:
        return self.calibrations.threshold(model_id, self.cfg.calibration_channel, target, score)

    def target_fmr(self, tenant: str) -> float:
        return self.policy(tenant).target_fmr or self.cfg.target_fmr

    def threshold(self, tenant: str) -> float:
        return self._threshold(self.model_id, self.target_fmr(tenant), EMBEDDER_SCORE)

    def _operating_points(self, out, tenant: str | None, liveness: bool) -> None:
        """The response states the operating points that decided: target and measured FMR of the
        match threshold (``tenant`` given), target and measured APCER of the liveness threshold."""
        channel = self.cfg.calibration_channel
        if tenant is not None:
            target = self.target_fmr(tenant)
            out.target_fmr = target
            measured = self.calibrations.measured(self.model_id, channel, target, EMBEDDER_SCORE)
            if measured is not None:
                out.measured_fmr = measured
        if liveness:
            apcer = self.cfg.liveness_target_apcer
            out.liveness_target_apcer = apcer
            measured = self.calibrations.measured(self.cfg.liveness[0], channel, apcer, LIVENESS_SCORE)
            if measured is not None:
                out.liveness_measured_apcer = measured

    def check_operating_points(self) -> None:
        """The service does not start on a default operating point its calibration marks unsupported."""
        checks = [("face.target_fmr", self.model_id, self.cfg.target_fmr, EMBEDDER_SCORE)]
        checks += [("face.liveness_target_apcer", m, self.cfg.liveness_target_apcer, LIVENESS_SCORE)
                   for m in self.cfg.liveness[:1]]
        for setting, model, target, score in checks:
            try:
                self._threshold(model, target, score)
            except NotCalibrated as err:
                if err.reason == UNSUPPORTED:
                    raise RuntimeError(f"{setting} = {target:g}: {err.message}") from None

    def _llr(self, score: float) -> float | None:
        return self.calibrations.llr(self.model_id, self.cfg.calibration_channel, score, EMBEDDER_SCORE)

    def live_threshold(self) -> float:
        if self._pipeline().liveness is None:
            raise refusal("LIVENESS_UNAVAILABLE",
                          "no liveness model is installed in this deployment; liveness cannot be checked")
        return self._threshold(self.cfg.liveness[0], self.cfg.liveness_target_apcer, LIVENESS_SCORE)

    @staticmethod
    def _image_bytes(image: common_pb2.Image, field: str) -> bytes:
        if not image.data:
            raise refusal("EMPTY_IMAGE", f"{field}.data is empty", fields={f"{field}.data": "required"})
        return image.data

    def _decode(self, data: bytes, field: str) -> np.ndarray:
        try:
            return self._pipeline().decode(data)
        except ImageDecodeError as err:
            raise refusal(err.code.value, f"{field}: {err}", fields={f"{field}.data": err.code.value}) from None

    def _analyse_many(self, images: Sequence[np.ndarray], **options) -> list[FaceAnalysis]:
        pipeline = self._pipeline()
        # Each image's thread runs in a copy of this call's context: its model queues see the deadline.
        futures = [self._pool.submit(contextvars.copy_context().run, partial(pipeline.analyse_image, img, **options))
                   for img in images]
        return [f.result() for f in futures]

    def _probe(self, image: np.ndarray, template: np.ndarray, threshold: float, liveness: bool,
               subject: SubjectPolicy) -> FaceAnalysis:
        """The analysis of a 1:1 probe. One that shows no usable face, or does not match, is looked at
        again turned the way its face stands upright (FacePipeline.upright); the turned view replaces
        it only when the detector is more confident of a face there than upright, so the view that
        is compared is chosen by the detector, never by the score. Liveness is scored once, on the
        chosen view's face when it is usable, not on every view analysed."""
        pipeline = self._pipeline()
        a = pipeline.analyse_image(image, subject=subject)
        if not (a.accepted and float(np.dot(template, a.embeddings[self.model_id])) >= threshold):
            turned = pipeline.analyse_image(image, upright=True, subject=subject)
            a = turned if turned.rotation else a
        return pipeline.with_liveness(image, a) if liveness and a.accepted else a

    def _template(self, tenant: str, subject: str) -> np.ndarray:
        return self.templates.for_verification(tenant, subject, self.model_id)

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
    def enroll(self, req: face_pb2.EnrollFaceRequest, *, caller: Principal) -> face_pb2.EnrollFaceResponse:
        tenant, subject = subject_ref(req.subject)
        if not req.images:
            raise refusal("INVALID_ARGUMENT", "at least one image is required", fields={"images": "required"})
        if len(req.images) > self.cfg.max_images:
            raise refusal("INVALID_ARGUMENT", f"at most {self.cfg.max_images} images", fields={"images": "too many"})
        datas = [self._image_bytes(img, f"images[{i}]") for i, img in enumerate(req.images)]
        self._pipeline()
        self.templates.require_consent(tenant, subject)
        if not req.replace:
            self.templates.refuse_if_enrolled(tenant, subject, self.model_id)
        decoded = [self._decode(d, f"images[{i}]") for i, d in enumerate(datas)]
        # A template lasts: each image is turned the way its face stands upright first (a face on its
        # side or upside down made a template that matched no upright photo).
        analyses = self._analyse_many(decoded, subject=self._subject_policy(tenant), upright=True)
        context.done_with_models()
        qualities = [self._quality(i, a) for i, a in enumerate(analyses)]
        try:
            template, n_good = enrolment_template(analyses, self.model_id, self.same_person_floor())
        except EnrolmentRefused as err:
            text = err.message or (f"no usable face in the images: {message(analyses[0].issues[0])}"
                                   if err.code != "IDENTITY_INCONSISTENT" else None)
            raise refusal(err.code, text, fields=err.fields, metadata=err.metadata) from None
        quality_summary = {
            "submitted": len(analyses),
            "accepted": n_good,
            "issues": sorted({i for a in analyses for i in a.issues}),
        }
        rotated = sum(1 for a in analyses if a.accepted and a.rotation)
        stored, new = self.templates.enrol(
            tenant, subject, self.model_id, template, samples=n_good, quality=quality_summary, replace=req.replace,
            details={"samples": n_good, "submitted": len(analyses), "replace": bool(req.replace),
                     **({"turned_upright": rotated} if rotated else {})}, caller=caller)
        self.galleries.enrolled(tenant, self.model_id, subject, stored.updated_at, template, new=new)
        active = {m.id for m in self.rt.models.manifest.models if m.active}
        return face_pb2.EnrollFaceResponse(template=template_info(stored, active), images=qualities)

    def same_person_floor(self) -> float | None:
        """Images of several people must not be averaged into one template: every pair must match
        at the calibrated FMR 1e-2 threshold (None: no such point, not checked)."""
        try:
            return self._threshold(self.model_id, 1e-2, EMBEDDER_SCORE)
        except NotCalibrated:
            return None

    # ------------------------------------------------------------------ Verify
    def verify(self, req: face_pb2.VerifyFaceRequest, *, caller: Principal) -> face_pb2.VerifyFaceResponse:
        tenant, subject = subject_ref(req.subject)
        data = self._image_bytes(req.image, "image")
        self._pipeline()
        want_live = req.require_liveness or self.policy(tenant).require_liveness
        threshold = self.threshold(tenant)
        live_threshold = self.live_threshold() if want_live else None
        template = self._template(tenant, subject)
        image = self._decode(data, "image")
        with self.attempts.attempt(tenant, subject) as attempt:
            a = self._probe(image, template, threshold, want_live, self._subject_policy(tenant))
            out = self._verified(a, template, threshold, want_live, live_threshold, tenant, subject, caller)
            attempt.failed = out.quality.accepted and not out.match
        return out

    def _verified(self, a: FaceAnalysis, template: np.ndarray, threshold: float, want_live: bool, live_threshold: float | None,
                  tenant: str, subject: str, caller: Principal) -> face_pb2.VerifyFaceResponse:
        context.done_with_models()
        out = face_pb2.VerifyFaceResponse(
            model_id=self.model_id, threshold=threshold, liveness_checked=False, quality=self._quality(0, a)
        )
        details = {"model_id": self.model_id, "threshold": round(threshold, 4),
                   **({"turned_upright_deg": a.rotation} if a.rotation else {})}
        if not a.accepted:
            out.reasons.extend(reason(i) for i in a.issues)
            details.update(match=False, issues=list(a.issues))
        else:
            score = float(np.dot(template, a.embeddings[self.model_id]))
            out.score = score
            llr = self._llr(score)
            if llr is not None:
                out.llr = llr
            out.match = score >= threshold
            observe_similarity(self.model_id, self.cfg.calibration_channel, score, out.match)
            if not out.match:
                out.reasons.append(reason("NO_MATCH"))
            if want_live:
                if a.liveness is None or live_threshold is None:
                    raise RuntimeError("liveness was requested but not measured")
                out.liveness_checked = True
                out.live = a.liveness >= live_threshold
                details.update(live_score=round(a.liveness, 4), live_threshold=round(live_threshold, 4))
                if not out.live:
                    out.match = False
                    out.reasons.append(reason("LIVENESS_FAILED"))
                    metrics.LIVENESS_REFUSALS.labels("verify").inc()
            details.update(score=round(score, 4), llr=None if llr is None else round(llr, 3), match=out.match,
                           live=out.live)
        self._operating_points(out, tenant, out.liveness_checked)
        self.rt.audit.append("face.verified", caller.name, tenant, subject, details)
        return out

    # ------------------------------------------------------------------ Identify
    def identify(self, req: face_pb2.IdentifyFaceRequest, *, caller: Principal) -> face_pb2.IdentifyFaceResponse:
        tenant = identifier(req.tenant_id, "tenant_id")
        k = req.top_k or 5
        if not 1 <= k <= self.cfg.identify_max_k:
            raise refusal("INVALID_ARGUMENT", f"top_k must be 1..{self.cfg.identify_max_k}", fields={"top_k": "out of range"})
        data = self._image_bytes(req.image, "image")
        pipeline = self._pipeline()
        threshold = self.threshold(tenant)
        image = self._decode(data, "image")
        a = pipeline.analyse_image(image, subject=self._subject_policy(tenant))
        if not a.accepted:
            a = pipeline.analyse_image(image, subject=self._subject_policy(tenant), upright=True)
        if not a.accepted:
            raise refusal(a.issues[0], f"no usable face: {', '.join(message(i) for i in a.issues)}",
                          fields={"image": ",".join(a.issues)})
        top, size = self.galleries.search(tenant, self.model_id, a.embeddings[self.model_id], k)
        context.done_with_models()
        above = sum(s >= threshold for _, s in top)
        self.rt.audit.append("face.identified", caller.name, tenant, None, {
            "model_id": self.model_id, "gallery_size": size, "top_k": k, "above_threshold": above,
            "top_score": round(top[0][1], 4) if top else None, "threshold": round(threshold, 4),
        })
        return face_pb2.IdentifyFaceResponse(
            candidates=[face_pb2.Candidate(subject_id=s, score=v, above_threshold=v >= threshold) for s, v in top],
            model_id=self.model_id,
            gallery_size=size,
        )

    # ------------------------------------------------------------------ passive liveness
    def check_liveness(self, req: face_pb2.CheckLivenessRequest, *, caller: Principal) -> face_pb2.CheckLivenessResponse:
        tenant = identifier(req.tenant_id, "tenant_id")
        data = self._image_bytes(req.image, "image")
        threshold = self.live_threshold()
        a = self._pipeline().analyse_image(
            self._decode(data, "image"), liveness=True, embed=False, subject=self._subject_policy(tenant)
        )
        context.done_with_models()
        if liveness_unanswerable(a):
            self.rt.audit.append("face.liveness_checked", caller.name, tenant, None, {"live": False, "issues": list(a.issues)})
            return face_pb2.CheckLivenessResponse(live=False, reasons=[reason(i) for i in a.issues])
        if a.liveness is None:
            raise RuntimeError("liveness was requested but not measured")
        live = a.liveness >= threshold
        if not live:
            metrics.LIVENESS_REFUSALS.labels("check_liveness").inc()
        self.rt.audit.append("face.liveness_checked", caller.name, tenant, None, {
            "live": live, "live_score": round(a.liveness, 4), "live_threshold": round(threshold, 4),
        })
        return face_pb2.CheckLivenessResponse(live=live, reasons=[] if live else [reason("LIVENESS_FAILED")])

    # ------------------------------------------------------------------ active liveness
    def start_liveness_challenge(self, req: face_pb2.StartLivenessChallengeRequest, *, caller: Principal) -> face_pb2.StartLivenessChallengeResponse:
        tenant, subject = subject_ref(req.subject)
        self.live_threshold()
        c = self.cfg.challenge
        moves = ch.random_moves(c.moves)
        rec = self.challenges.issue(tenant, subject, {"moves": moves}, c.ttl_s, {"moves": len(moves)}, caller)
        return face_pb2.StartLivenessChallengeResponse(
            challenge=common_pb2.Challenge(nonce=rec.nonce, expires_at=subjects.timestamp(rec.expires_at)),
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
                identity = self._threshold(self.model_id, 1e-2, EMBEDDER_SCORE)
            except NotCalibrated as err:
                raise NotCalibrated(f"no identity threshold ({err.message}): calibrate the embedder or set "
                                    "face.challenge.identity_min_cosine", err.reason) from None
        return ch.ChallengeRules(
            turn_deg=c.turn_deg, tilt_deg=c.tilt_deg, neutral_deg=c.neutral_deg,
            min_frame_gap_ms=c.min_frame_gap_ms, max_frame_gap_ms=c.max_frame_gap_ms, min_move_ms=c.min_move_ms,
            identity_min_cosine=identity, live_threshold=self.live_threshold(),
        )

    def submit_liveness_challenge(self, req: face_pb2.SubmitLivenessChallengeRequest, *, caller: Principal) -> face_pb2.SubmitLivenessChallengeResponse:
        tenant, subject = subject_ref(req.subject)
        nonce = nonce_field(req.nonce, "nonce", required=True)
        c = self.cfg.challenge
        if not self._min_frames(c.moves) <= len(req.frames) <= c.max_frames:
            raise refusal("INVALID_ARGUMENT", f"{len(req.frames)} frames; send {self._min_frames(c.moves)}..{c.max_frames}",
                          fields={"frames": "count out of range"})
        datas = [self._image_bytes(f.image, f"frames[{i}].image") for i, f in enumerate(req.frames)]
        self._pipeline()
        rules = self._rules()
        threshold = self.threshold(tenant) if req.verify_subject else None
        images = [self._decode(d, f"frames[{i}].image") for i, d in enumerate(datas)]
        # a comparison with the subject's template is bounded (attempts.py); a bare liveness check is not
        with self.attempts.attempt(tenant, subject) if req.verify_subject else nullcontext(Attempt()) as attempt:
            spent = self.challenges.consume(tenant, subject, nonce, caller)
            moves = spent.payload["moves"]
            if len(req.frames) < self._min_frames(len(moves)):
                raise refusal("INVALID_ARGUMENT", f"at least {self._min_frames(len(moves))} frames", fields={"frames": "too few"})
            analyses = self._analyse_many(images, liveness=True, enforce_quality=False, subject=self._subject_policy(tenant))
            result = ch.evaluate(moves, self._frame_observations(req.frames, datas, analyses), spent.issued_ago_ms, rules)
            context.done_with_models()
            if not result.passed:
                metrics.LIVENESS_REFUSALS.labels("liveness_challenge").inc()
            out = face_pb2.SubmitLivenessChallengeResponse(model_id=self.model_id, reasons=[reason(r) for r in result.reasons],
                                                           challenge_passed=result.passed)
            self._operating_points(out, tenant if req.verify_subject else None, True)
            details = {"model_id": self.model_id, "challenge_passed": result.passed, "reasons": list(result.reasons),
                       **result.details}
            score: float | None = None
            if threshold is not None:  # verify_subject
                score = self._compare_with_template(out, tenant, subject, result.embedding, threshold)
                details.update(match=out.match, score=round(score, 4) if score is not None else None,
                               threshold=round(threshold, 4))
            out.passed = result.passed and (threshold is None or out.match)
            details["passed"] = out.passed
            self.rt.audit.append("face.challenge_submitted", caller.name, tenant, subject, details)
            attempt.failed = score is not None and not out.passed
            return out

    def _frame_observations(self, frames: Sequence[common_pb2.Frame], datas: Sequence[bytes],
                            analyses: Sequence[FaceAnalysis]) -> list[ch.FrameObservation]:
        """What the challenge is judged on; a frame without a usable face has no pose."""
        return [
            ch.FrameObservation(
                capture_time_ms=f.capture_time_ms,
                digest=ch.frame_digest(d),
                yaw=a.quality.yaw_deg if a.quality is not None and a.embeddings else None,
                pitch=a.quality.pitch_deg if a.quality is not None and a.embeddings else None,
                live=a.liveness,
                embedding=a.embeddings.get(self.model_id),
            )
            for f, d, a in zip(frames, datas, analyses, strict=True)
        ]

    def _compare_with_template(self, out: face_pb2.SubmitLivenessChallengeResponse, tenant: str, subject: str,
                               embedding: np.ndarray | None, threshold: float) -> float | None:
        """Sets the response's match, score, LLR and reasons from the challenge's face against the
        subject's template; -> the score, None when nothing was compared (no template, no face)."""
        out.match = False
        try:
            template = self._template(tenant, subject)
        except errors.ServiceError as err:
            out.reasons.append(reason(err.reason))
            return None
        if embedding is None:
            return None
        score = float(np.dot(template, embedding))
        out.match = score >= threshold
        observe_similarity(self.model_id, self.cfg.calibration_channel, score, out.match)
        out.score = score
        llr = self._llr(score)
        if llr is not None:
            out.llr = llr
        if not out.match:
            out.reasons.append(reason("NO_MATCH"))
        return score

    # ------------------------------------------------------------------ enrolment info and erasure
    def get_enrollment(self, req: common_pb2.GetEnrollmentRequest, *, caller: Principal) -> common_pb2.GetEnrollmentResponse:
        return subjects.get_enrollment(self.rt, req, "face")

    def delete_subject(self, req: common_pb2.DeleteSubjectRequest, *, caller: Principal) -> common_pb2.DeleteSubjectResponse:
        with self.rt.storage.transaction():  # the failure counter goes with the templates
            response = subjects.delete_modality(self.rt, req, "face", caller)
            self.attempts.erase(*subject_ref(req.subject))
        self.galleries.deleted(req.subject.tenant_id, req.subject.subject_id)
        return response

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self.pipeline is not None:
            self.pipeline.close()
