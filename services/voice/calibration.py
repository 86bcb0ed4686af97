"""The voice decisions' thresholds and LLR maps, per model and channel, from the model manifest.

Re-read when the manifest file changes (checked at most every ``check_s``): `biogate calibrate`
moves a running service's decisions without a restart. A record must be for the score the
service computes (``CalibrationRecord.score``, e.g. s-norm against one cohort): a threshold fitted
on raw cosines, or with another cohort, is refused rather than applied to other numbers.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from services.common.models.calibration import CalibrationRecord, OperatingPointError
from services.common.models.manifest import load_manifest


log = logging.getLogger("biogate.voice")


class NotCalibrated(LookupError):
    def __init__(self, message: str, reason: str = "MODEL_NOT_CALIBRATED") -> None:
        super().__init__(message)
        self.reason = reason  # OPERATING_POINT_MISSING / _UNSUPPORTED for a point the record cannot back


class ManifestCalibrations:
    def __init__(self, manifest_path: str | Path, check_s: float = 1.0) -> None:
        self.path, self.check_s = Path(manifest_path), check_s
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._checked = -float("inf")
        self._records: dict[tuple[str, str], CalibrationRecord] = {}

    def _records_now(self) -> dict[tuple[str, str], CalibrationRecord]:
        if self._stamp is not None and time.monotonic() - self._checked < self.check_s:
            return self._records
        with self._lock:  # one reader at a time; the others wait rather than see a half-loaded state
            if self._stamp is not None and time.monotonic() - self._checked < self.check_s:
                return self._records
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
            if stamp != self._stamp:
                try:
                    manifest = load_manifest(self.path)
                except Exception:  # caught mid-rewrite by another process: keep the last good one
                    if self._stamp is None:
                        raise
                    log.warning("manifest unreadable; keeping the previous calibrations", exc_info=True)
                    return self._records
                self._records = {(m.id, ch): rec for m in manifest.models for ch, rec in m.calibration.items()}
                self._stamp = stamp
            self._checked = time.monotonic()
        return self._records

    def record(self, model_id: str, channel: str, score: str | None = None) -> CalibrationRecord:
        rec = self._records_now().get((model_id, channel))
        if rec is None:
            raise NotCalibrated(f"model {model_id} has no calibration for channel {channel!r} in {self.path.name}; "
                                f"run `biogate eval` and `biogate calibrate --model {model_id} --channel {channel}`")
        if score is not None and rec.score != score:
            raise NotCalibrated(f"the {model_id} [{channel}] calibration is for score {rec.score!r}, "
                                f"the service computes {score!r}: re-run the evaluation and calibration")
        return rec

    def threshold(self, model_id: str, channel: str, target: float, score: str | None = None) -> float:
        try:
            return float(self.record(model_id, channel, score).threshold(target, model=model_id, channel=channel))
        except OperatingPointError as err:
            raise NotCalibrated(str(err), err.reason) from None

    def llr(self, model_id: str, channel: str, value: float, score: str | None = None) -> float:
        """Natural-log LLR of ``value``; 0.0 (no evidence) when the record has no LLR map."""
        rec = self.record(model_id, channel, score)
        return 0.0 if rec.llr is None else float(rec.llr.llr(value))
