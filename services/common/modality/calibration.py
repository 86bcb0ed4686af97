"""Decision thresholds and LLR maps per model and channel, from the calibration records of the model
manifest, for every service that decides with a calibrated score.

The manifest is re-read when its file changes (checked at most every ``check_s``): `biogate
calibrate` moves a running service's decisions without a restart; a manifest caught mid-rewrite by
another process keeps the last good records. A record must be for the score the service computes
(``CalibrationRecord.score``, e.g. s-norm against one cohort): a threshold fitted on other numbers
is refused rather than applied. Without a threshold the service refuses to decide rather than
guess: :class:`NotCalibrated` is FAILED_PRECONDITION, with the record's own reason when it has one
(an operating point its trial counts do not support) and MODEL_NOT_CALIBRATED otherwise.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable

import grpc

from services.common import errors
from services.common.models.calibration import CalibrationRecord, Claim
from services.common.models.manifest import load_manifest

log = logging.getLogger("biogate.calibration")
DEFAULT_REASON = "MODEL_NOT_CALIBRATED"


class NotCalibrated(errors.ServiceError, LookupError):
    """No usable threshold: the RPC is refused with FAILED_PRECONDITION and ``reason``."""

    def __init__(self, message: str, reason: str = DEFAULT_REASON) -> None:
        super().__init__(grpc.StatusCode.FAILED_PRECONDITION, message, reason)


def not_calibrated(err: LookupError, model_id: str, channel: str) -> NotCalibrated:
    """A calibration record's refusal to give a threshold, passed on with its reason and message."""
    if hasattr(err, "reason"):
        return NotCalibrated(str(err), err.reason or DEFAULT_REASON)
    text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    return NotCalibrated(f"{model_id} [{channel}]: {text}")


class Calibrations:
    def __init__(self, manifest_path: str | Path, check_s: float = 1.0) -> None:
        self.path, self.check_s = Path(manifest_path), check_s
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._checked = -float("inf")
        # The records, and what was looked up in them (thresholds, claims: several per decision), replaced
        # together, so that an answer worked out from records being replaced never outlives them.
        self._loaded: tuple[dict[tuple[str, str], CalibrationRecord], dict[tuple, Any]] = ({}, {})

    def _now(self) -> tuple[dict[tuple[str, str], CalibrationRecord], dict[tuple, Any]]:
        if self._stamp is not None and time.monotonic() - self._checked < self.check_s:
            return self._loaded
        with self._lock:  # one reader at a time; the others wait rather than see a half-loaded state
            if self._stamp is not None and time.monotonic() - self._checked < self.check_s:
                return self._loaded
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
            if stamp != self._stamp:
                try:
                    manifest = load_manifest(self.path)
                except Exception:
                    if self._stamp is None:
                        raise
                    log.warning("manifest unreadable; keeping the previous calibrations", exc_info=True)
                    return self._loaded
                self._loaded = ({(m.id, ch): rec for m in manifest.models for ch, rec in m.calibration.items()}, {})
                self._stamp = stamp
            self._checked = time.monotonic()
        return self._loaded

    def _remembered(self, key: tuple, work_out: Callable[[dict[tuple[str, str], CalibrationRecord]], Any]) -> Any:
        """``work_out(records)``, once per loaded records (a refusal is raised again each time)."""
        records, known = self._now()
        if key not in known:
            known[key] = work_out(records)
        return known[key]

    def find(self, model_id: str, channel: str) -> CalibrationRecord | None:
        return self._now()[0].get((model_id, channel))

    def record(self, model_id: str, channel: str, score: str | None = None) -> CalibrationRecord:
        return self._remembered(("record", model_id, channel, score),
                                lambda records: self._record(records, model_id, channel, score))

    def _record(self, records: dict[tuple[str, str], CalibrationRecord], model_id: str, channel: str,
                score: str | None) -> CalibrationRecord:
        rec = records.get((model_id, channel))
        if rec is None:
            raise NotCalibrated(f"model {model_id} has no calibration for channel {channel!r} in {self.path.name}; "
                                f"run `biogate eval` and `biogate calibrate --model {model_id} --channel {channel}`")
        if score is not None and rec.score != score:
            raise NotCalibrated(f"the {model_id} [{channel}] calibration is for score {rec.score!r}, "
                                f"the service computes {score!r}: re-run the evaluation and calibration")
        return rec

    def threshold(self, model_id: str, channel: str, target: float, score: str | None = None) -> float:
        def work_out(records: dict[tuple[str, str], CalibrationRecord]) -> float:
            rec = self._record(records, model_id, channel, score)
            try:
                return float(rec.threshold(target, model=model_id, channel=channel))
            except LookupError as err:
                raise not_calibrated(err, model_id, channel) from None

        return self._remembered(("threshold", model_id, channel, target, score), work_out)

    def claim(self, model_id: str, channel: str, target: float, score: str | None = None) -> Claim:
        """What a decision at the point for ``target`` can truthfully claim (the held-out FMR or
        APCER when the point has a check): CalibrationRecord.claim, for a service's responses."""
        def work_out(records: dict[tuple[str, str], CalibrationRecord]) -> Claim:
            rec = self._record(records, model_id, channel, score)
            try:
                return rec.claim(target)
            except LookupError as err:
                raise not_calibrated(err, model_id, channel) from None

        return self._remembered(("claim", model_id, channel, target, score), work_out)

    def measured(self, model_id: str, channel: str, target: float, score: str | None = None) -> float:
        """The error rate a decision at the point for ``target`` states in responses: the held-out
        FMR (APCER for an attack detector) when the point has a check, else the calibration's own."""
        return self.claim(model_id, channel, target, score).rate

    def llr(self, model_id: str, channel: str, value: float, score: str | None = None) -> float | None:
        """Natural-log LLR of ``value``; None (no evidence claimed) when the record has no LLR map."""
        rec = self.record(model_id, channel, score)
        return None if rec.llr is None else rec.llr.one(value)
