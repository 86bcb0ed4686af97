"""Decision thresholds and LLRs from the calibration records of the model manifest.

The manifest is re-read when its file changes (checked at most every ``check_s``), so a
re-calibration written by `biogate calibrate` takes effect in running services without a restart.
A model without a record for the channel, or without an operating point for the asked target,
has no threshold: the service refuses to decide rather than guess one.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from services.common.models.calibration import CalibrationRecord, OperatingPointError
from services.common.models.manifest import load_manifest


class NotCalibrated(LookupError):
    def __init__(self, message: str, reason: str = "MODEL_NOT_CALIBRATED") -> None:
        super().__init__(message)
        self.reason = reason  # OPERATING_POINT_MISSING / _UNSUPPORTED for a point the record cannot back


class Calibrations:
    def __init__(self, manifest_path: str | Path, channel: str, check_s: float = 1.0) -> None:
        self.path = Path(manifest_path)
        self.channel = channel
        self.check_s = check_s
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._checked = 0.0
        self._records: dict[str, CalibrationRecord] = {}
        self._refresh(force=True)

    def _refresh(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._checked < self.check_s:
            return
        with self._lock:
            self._checked = now
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
            if stamp == self._stamp:
                return
            manifest = load_manifest(self.path)
            self._records = {
                m.id: m.calibration[self.channel] for m in manifest.models if self.channel in m.calibration
            }
            self._stamp = stamp

    def record(self, model_id: str) -> CalibrationRecord | None:
        self._refresh()
        return self._records.get(model_id)

    def threshold(self, model_id: str, target: float) -> float:
        rec = self.record(model_id)
        if rec is None:
            raise NotCalibrated(f"model {model_id} has no calibration for channel {self.channel!r}")
        try:
            return float(rec.threshold(target, model=model_id, channel=self.channel))
        except OperatingPointError as err:
            raise NotCalibrated(str(err), err.reason) from None

    def llr(self, model_id: str, score: float) -> float:
        """The calibrated natural-log LLR of ``score``; 0.0 (no evidence) without an LLR map."""
        rec = self.record(model_id)
        if rec is None or rec.llr is None:
            return 0.0
        return float(rec.llr.llr(score))
