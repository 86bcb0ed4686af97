"""Rewriting one model's calibration in manifest.yaml, keeping comments, order and anchors
(ruamel.yaml round trip). The result is validated before it replaces the file."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import yaml
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap

from .errors import UnknownModelError
from .files import write_text_atomic
from .manifest import Manifest, parse_manifest


def _round_trip_yaml() -> YAML:
    rt = YAML(typ="rt")
    rt.preserve_quotes = True
    rt.width = 4096  # never re-wrap long scalars
    rt.indent(mapping=2, sequence=4, offset=2)
    return rt


def with_calibration(text: str, model_id: str, channel: str, record: dict[str, Any] | None) -> str:
    """``text`` with models[id=model_id].calibration[channel] set to ``record`` (None removes it)."""
    rt = _round_trip_yaml()
    data = rt.load(text)
    models = data.get("models") or []
    model = next((m for m in models if isinstance(m, dict) and m.get("id") == model_id), None)
    if model is None:
        raise UnknownModelError(f"unknown model {model_id!r} in the manifest")
    calibration = model.get("calibration")
    if not isinstance(calibration, CommentedMap):
        calibration = CommentedMap(calibration or {})
        model["calibration"] = calibration
    calibration.fa.set_block_style()  # `calibration: {}` was written in flow style
    if record is None:
        calibration.pop(channel, None)
    else:
        calibration[channel] = record
    if not calibration:
        calibration.fa.set_flow_style()
    out = io.StringIO()
    rt.dump(data, out)
    return out.getvalue()


def write_calibration(path: Path, model_id: str, channel: str, record: dict[str, Any] | None) -> Manifest:
    """Rewrite the manifest file in place (atomically) and return the new, validated manifest."""
    new_text = with_calibration(path.read_text(encoding="utf-8"), model_id, channel, record)
    manifest = parse_manifest(yaml.safe_load(new_text), str(path))
    write_text_atomic(path, new_text, mode=path.stat().st_mode & 0o777)
    return manifest
