"""Quality gates with machine-readable reasons, measured on the detected face and its aligned crop.

Thresholds are a config dataclass. The defaults pass every image of trials_face.csv (62, tight
150x150 grayscale crops and old photos included) and of pad_face.csv (265 webcam frames) with
YuNet and with SCRFD-500M, and fail junk made from the trial images (tests/face/test_quality.py).
Measured extremes of the fixtures (YuNet / SCRFD): eye distance >= 49 px (trials), 33 px (PAD);
sharpness >= 188 (trials), 18 (PAD); |yaw| <= 51 deg (a semi-profile crop), |pitch| <= 32;
brightness 42..203; clipped <= 0.20; box outside the frame <= 0.31. Junk: Gaussian blur of
sigma 0.1 x eye distance gives sharpness <= 7 (SCRFD; YuNet mostly); x0.2 darkening brightness
<= 37; x2 + 100 brightening clips 45-94 % of the face; faces shrunk to 15 px eye distance <= 21.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum

import cv2
import numpy as np
from insightface.utils.face_align import arcface_dst

from services.face.detection import Face


class QualityIssue(str, Enum):
    FACE_TOO_SMALL = "FACE_TOO_SMALL"
    BLUR = "BLUR"
    EXTREME_POSE = "EXTREME_POSE"
    UNDER_EXPOSED = "UNDER_EXPOSED"
    OVER_EXPOSED = "OVER_EXPOSED"
    FACE_CUT_OFF = "FACE_CUT_OFF"


@dataclass(frozen=True)
class QualityThresholds:
    # Between the eye centres, in the original image, as the face would show it turned to the
    # camera (QualityReport.frontal_eye_distance_px). 24 px, from accuracy against size
    # (bench/face_gates_eval.py): probes shrunk to 24 px kept FNMR at the FMR 1e-3 threshold within
    # 0.6 points of full size on the people it was chosen on and 0.15 on the others, with no rise
    # in FMR; at 20 px the held-out people lost 1.3 points, at 12 px 8. 30 px refused 5 of 472
    # news photos (bench/RESULTS.md, "Face genuine refusals, per cause").
    min_eye_distance_px: float = 24.0
    min_sharpness: float = 15.0  # variance of the Laplacian over the aligned crop's face region
    max_abs_yaw_deg: float = 60.0
    max_abs_pitch_deg: float = 40.0
    min_brightness: float = 40.0  # mean grey level (0..255) of the aligned crop's face region
    max_brightness: float = 215.0
    max_clipped_fraction: float = 0.25  # of the face region at 250..255 (over) or 0..5 (under)
    max_outside_fraction: float = 0.4  # of the face box area that lies outside the frame
    landmark_margin_px: float = 0.0  # a landmark this far outside the frame still counts as inside


@dataclass(frozen=True)
class QualityReport:
    eye_distance_px: float  # as seen: shortened by cos(yaw) on a turned head
    frontal_eye_distance_px: float  # the face's size for the minimum (frontal_eye_distance)
    face_size_px: float
    sharpness: float
    yaw_deg: float  # > 0: the nose points to the image's right
    pitch_deg: float  # > 0: looking up
    roll_deg: float
    brightness: float
    clipped_high: float
    clipped_low: float
    outside_fraction: float
    issues: tuple[QualityIssue, ...] = field(default=())

    @property
    def accepted(self) -> bool:
        return not self.issues


# Depth of the nose tip in front of the eyes, in ArcFace template units (anthropometric: ~2.7 cm
# for a 6.3 cm eye distance, which is 35.2 units in the template).
_NOSE_DEPTH = 15.0
_TEMPLATE_EYE_HALF = float(arcface_dst[1, 0] - arcface_dst[0, 0]) / 2
_TEMPLATE_EYE_Y = float(arcface_dst[:2, 1].mean())
_TEMPLATE_MOUTH_Y = float(arcface_dst[3:, 1].mean())
_TEMPLATE_NOSE_RATIO = (float(arcface_dst[2, 1]) - _TEMPLATE_EYE_Y) / (_TEMPLATE_MOUTH_Y - _TEMPLATE_EYE_Y)


def head_pose(landmarks5: np.ndarray) -> tuple[float, float, float]:
    """(yaw, pitch, roll) in degrees from the 5 landmarks, weak-perspective geometry.

    Roll is the angle of the eye line. In the roll-corrected frame the nose tip moves sideways by
    depth*sin(yaw) against a half eye distance of half*cos(yaw), and vertically between the eye
    and mouth lines by depth*sin(pitch); both are read against the ArcFace template's frontal face.
    """
    lm = np.asarray(landmarks5, np.float64)
    eye_r, eye_l, nose, mouth_r, mouth_l = lm
    dx, dy = eye_l - eye_r
    roll = math.atan2(dy, dx)
    c, s = math.cos(-roll), math.sin(-roll)
    rot = np.array([[c, -s], [s, c]])
    p = (lm - (eye_r + eye_l) / 2) @ rot.T  # eye midpoint at the origin, eyes horizontal
    eye_half = max(abs(p[1, 0] - p[0, 0]) / 2, 1e-6)
    mouth_mid = (p[3] + p[4]) / 2
    eye_mouth = max(mouth_mid[1], 1e-6)
    # Sideways: nose against the eye/mouth midline, in half eye distances.
    midline_x = mouth_mid[0] / 2
    r = (p[2, 0] - midline_x) / eye_half
    yaw = math.degrees(math.atan(r * _TEMPLATE_EYE_HALF / _NOSE_DEPTH))
    ratio = p[2, 1] / eye_mouth
    pitch = math.degrees(math.atan((_TEMPLATE_NOSE_RATIO - ratio) * (_TEMPLATE_MOUTH_Y - _TEMPLATE_EYE_Y) / _NOSE_DEPTH))
    return yaw, pitch, math.degrees(roll)


def frontal_eye_distance(eye_distance: float, yaw_deg: float, max_abs_yaw_deg: float) -> float:
    """The eye distance of the face turned to the camera: in head_pose's weak-perspective model a
    head turned by yaw shows its eye distance shortened by cos(yaw), while its resolution (the
    pixels across its height) is that of the frontal face. Measuring size on the shortened distance
    refused turned faces twice, once for their pose and once as small (a head turned by 58 degrees,
    its box 85 x 114 px, showed 22 px between the eyes). Yaw is taken at most at the pose gate's limit, beyond
    which the face is refused for its pose anyway, so the correction is at most 1 / cos(limit)."""
    yaw = min(abs(yaw_deg), max_abs_yaw_deg, 75.0)  # a limit set at 90 must not divide by zero
    return eye_distance / math.cos(math.radians(yaw))


def _face_region(a: np.ndarray) -> np.ndarray:
    """The central face region (eyes to mouth) of an aligned crop. Only this region: for a tight
    crop the rest of the aligned crop is the black border outside the image, whose edge would
    count as sharp detail."""
    h, w = a.shape[:2]
    return a[int(0.35 * h) : int(0.9 * h), int(0.25 * w) : int(0.75 * w)]


def sharpness(aligned_bgr: np.ndarray) -> float:
    """Variance of the Laplacian over the face region of the aligned crop."""
    grey = cv2.cvtColor(aligned_bgr, cv2.COLOR_BGR2GRAY)
    return float(_face_region(cv2.Laplacian(grey, cv2.CV_64F)).var())


def exposure(aligned_bgr: np.ndarray) -> tuple[float, float, float]:
    """(mean grey level 0..255, fraction >= 250, fraction <= 5) over the aligned crop's face region."""
    region = _face_region(cv2.cvtColor(aligned_bgr, cv2.COLOR_BGR2GRAY))
    return float(region.mean()), float((region >= 250).mean()), float((region <= 5).mean())


def outside_fraction(box: np.ndarray, image_shape: tuple[int, ...]) -> float:
    h, w = image_shape[:2]
    x1, y1, x2, y2 = (float(v) for v in box)
    area = max(x2 - x1, 0.0) * max(y2 - y1, 0.0)
    if area <= 0:
        return 1.0
    inside = max(min(x2, w) - max(x1, 0.0), 0.0) * max(min(y2, h) - max(y1, 0.0), 0.0)
    return 1.0 - inside / area


def assess(
    image_shape: tuple[int, ...], face: Face, aligned_bgr: np.ndarray, t: QualityThresholds = QualityThresholds()
) -> QualityReport:
    """Measure ``face`` and list the gates it fails."""
    lm = face.landmarks5
    eye_distance = float(np.linalg.norm(lm[1] - lm[0]))
    yaw, pitch, roll = head_pose(lm)
    sharp = sharpness(aligned_bgr)
    bright, clipped_high, clipped_low = exposure(aligned_bgr)
    outside = outside_fraction(face.box, image_shape)
    h, w = image_shape[:2]
    m = t.landmark_margin_px
    landmarks_out = bool(((lm[:, 0] < -m) | (lm[:, 0] > w - 1 + m) | (lm[:, 1] < -m) | (lm[:, 1] > h - 1 + m)).any())
    issues = []
    frontal_eyes = frontal_eye_distance(eye_distance, yaw, t.max_abs_yaw_deg)
    if frontal_eyes < t.min_eye_distance_px:
        issues.append(QualityIssue.FACE_TOO_SMALL)
    if landmarks_out or outside > t.max_outside_fraction:
        issues.append(QualityIssue.FACE_CUT_OFF)
    if abs(yaw) > t.max_abs_yaw_deg or abs(pitch) > t.max_abs_pitch_deg:
        issues.append(QualityIssue.EXTREME_POSE)
    if sharp < t.min_sharpness:
        issues.append(QualityIssue.BLUR)
    if bright < t.min_brightness or clipped_low > t.max_clipped_fraction:
        issues.append(QualityIssue.UNDER_EXPOSED)
    elif bright > t.max_brightness or clipped_high > t.max_clipped_fraction:
        issues.append(QualityIssue.OVER_EXPOSED)
    return QualityReport(
        eye_distance_px=eye_distance,
        frontal_eye_distance_px=frontal_eyes,
        face_size_px=face.size,
        sharpness=sharp,
        yaw_deg=yaw,
        pitch_deg=pitch,
        roll_deg=roll,
        brightness=bright,
        clipped_high=clipped_high,
        clipped_low=clipped_low,
        outside_fraction=outside,
        issues=tuple(issues),
    )
