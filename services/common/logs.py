"""Structured JSON logs with personal data masked.

Every record becomes one JSON line. The message and every string field pass through
:func:`services.common.privacy.redact`, so a phone or ID number that slips into a log call is
masked before it leaves the process. Biometric data must never be logged at all: the formatter
refuses bytes and long numeric sequences outright, replacing them with a marker.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from typing import Any

from services.common import context
from services.common.privacy import redact

_STD_ATTRS = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
_MAX_SEQ = 16


def _clean(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<{len(value)} bytes withheld>"
    if isinstance(value, (bool, int, float)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        if len(value) > _MAX_SEQ:
            return f"<sequence of {len(value)} withheld>"
        return [_clean(v) for v in value]
    if hasattr(value, "shape") and hasattr(value, "dtype"):  # numpy arrays: embeddings, audio
        return f"<array {getattr(value, 'shape', '?')} withheld>"
    return redact(str(value))


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str = "") -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        if self.service:
            out["service"] = self.service
        rid = context.request_id.get()
        if rid:
            out["request_id"] = redact(rid)
        for key, value in record.__dict__.items():
            if key not in _STD_ATTRS and not key.startswith("_"):
                out[key] = _clean(value)
        if record.exc_info:
            out["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(out, ensure_ascii=False, default=str)


class PlainFormatter(JsonFormatter):
    """Human-readable lines for a terminal; same masking."""

    def format(self, record: logging.LogRecord) -> str:
        data = json.loads(super().format(record))
        head = f"{data.pop('ts')} {data.pop('level'):7} {data.pop('logger')}: {data.pop('msg')}"
        return head + ("  " + json.dumps(data, ensure_ascii=False) if data else "")


class _CurrentStderr(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is when a record is emitted, not as it was at set-up: a test
    runner swaps and closes it, and a late background thread must not write to a closed file."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def setup_logging(level: str = "INFO", json_format: bool = True, service: str = "", stream=None) -> None:
    handler = logging.StreamHandler(stream) if stream is not None else _CurrentStderr()
    handler.setFormatter(JsonFormatter(service) if json_format else PlainFormatter(service))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
