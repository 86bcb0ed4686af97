"""The face service's configuration sections (the ``face`` section of the one settings tree,
services/settings.py), and the part of the tree the face service reads."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from services.common.config import CommonSettings, Section, VerifyLimit


class FaceTenantPolicy(Section):
    """Per-tenant overrides of the face service's defaults (unset: the service-wide value)."""

    target_fmr: float | None = Field(None, gt=0, lt=1)  # must be a calibrated operating point
    second_face_ratio: float | None = Field(None, gt=0)  # >= 1 never refuses a second face
    require_liveness: bool = False  # every Verify of the tenant also runs passive liveness
    verify_limit: VerifyLimit | None = None  # None: the service's


class FaceChallengeConfig(Section):
    """Active liveness: a random sequence of head moves answered by a burst of frames."""

    ttl_s: int = Field(60, ge=5, le=60)
    moves: int = Field(3, ge=2, le=4)  # distinct moves per challenge
    min_frames: int = Field(5, ge=3)
    max_frames: int = Field(24, le=64)
    # Pose change from the burst's first frame (landmark estimates, which compress pitch: a
    # webcam video's head nods span about -12..+12 degrees of estimated pitch around its median).
    turn_deg: float = Field(15.0, gt=0)  # |yaw change| a turn must reach
    tilt_deg: float = Field(8.0, gt=0)  # |pitch change| a look up/down must reach
    neutral_deg: float = Field(6.0, gt=0)  # within this of the first frame's pose is neutral
    min_frame_gap_ms: int = Field(20, ge=0)  # faster than 50 frames/s is not a camera
    max_frame_gap_ms: int = Field(5000, ge=1)
    min_move_ms: int = Field(150, ge=0)  # a human head move takes at least this long
    # Cosine of every frame to the burst's mean embedding; None: the calibrated threshold at FMR 1e-2.
    identity_min_cosine: float | None = None


class FaceConfig(Section):
    detector: str = "yunet-2023mar-batch"  # model ids of models/manifest.yaml
    embedder: str = "mobilefacenet-arcface-192d"  # the model templates are made with
    liveness: list[str] = ["minifasnet-v2-2.7", "minifasnet-v1se-4.0"]  # [] = no liveness
    calibration_channel: str = "default"
    # The calibrated point the service decides at. 3e-4, not 1e-3: on the 59 people the calibration
    # never saw, the 1e-3 point false-matched at 2.8e-3 (95 % CI 2.2e-3 - 3.5e-3), the 3e-4 point at
    # 1.4e-3 (9.9e-4 - 1.9e-3), the nearest to 1e-3 that other people show, for 1.1 points of FNMR;
    # decisions state the held-out figure (CalibrationRecord.claim). bench/RESULTS.md, issue 16.
    target_fmr: float = Field(3e-4, gt=0, lt=1)
    liveness_target_apcer: float = Field(0.05, gt=0, lt=1)
    # The box the liveness crops are cut around: "detector" (the detector's own) or "landmarks" (a
    # box derived from the landmarks, services/face/liveness.py), chosen on data it was not tuned on.
    liveness_box: Literal["landmarks", "detector"] = "landmarks"
    second_face_ratio: float = Field(0.6, gt=0)  # of the subject's landmark size (services/face/subject.py)
    rival_min_sharpness_ratio: float = Field(0.25, ge=0, le=1)  # a far blurrier second face is no rival
    tenants: dict[str, FaceTenantPolicy] = {}
    max_images: int = Field(10, ge=1, le=50)  # per Enroll request
    identify_max_k: int = Field(100, ge=1, le=1000)
    batch_max: int = Field(32, ge=1, le=256)
    batch_wait_ms: float = Field(2.0, ge=0, le=50)
    # "auto": micro-batched on an accelerator, inline on the CPU (FacePipelineConfig.batching).
    micro_batching: Literal["auto", "on", "off"] = "auto"
    # "auto": the detector's canvas ends a margin past the image where the models run inline (the
    # CPU), the model's full 640x640 where they are micro-batched (FacePipelineConfig.detector_canvas).
    detector_canvas: Literal["auto", "full", "fitted"] = "auto"
    # The decoder of plain JPEGs' pixels after Pillow's checks (services/face/imaging.py): "auto" is
    # nvImageCodec's nvJPEG when the detector runs on CUDA and the package (extra gpu) loads, else OpenCV;
    # "nvimgcodec" requires the package (its CPU backend without CUDA). Every refusal is the same.
    jpeg_decoder: Literal["auto", "opencv", "nvimgcodec"] = "auto"
    intra_op_threads: int = Field(1, ge=0)  # per onnxruntime session; 0 = onnxruntime's default
    # OpenCV's own pool (resize, warps, colour conversions) per process; 0 = OpenCV's default, a thread per
    # core. One: the process model already puts a worker on each core, and the pool's idle threads spin
    # (sched_yield) after every parallel call: bench/RESULTS.md "OpenCV's thread pool".
    opencv_threads: int = Field(1, ge=0)
    calibration_check_s: float = Field(1.0, ge=0)  # how often the manifest's mtime is looked at
    gallery_check_s: float = Field(0.0, ge=0)  # template count check before Identify; 0: every time
    gallery_full_check_s: float = Field(10.0, ge=0)  # also the latest update (re-enrolments elsewhere)
    challenge: FaceChallengeConfig = FaceChallengeConfig()
    verify_limit: VerifyLimit = VerifyLimit()  # per subject; a tenant's own overrides it


class FaceSettings(CommonSettings):
    """The settings tree as the face service reads it."""

    face: FaceConfig = FaceConfig()


def face_config(settings: CommonSettings) -> FaceConfig:
    """The face section of a process's settings tree (the defaults where the tree has none)."""
    return settings.face if isinstance(settings, FaceSettings) else FaceConfig()
