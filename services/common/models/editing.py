"""Rewriting one model's calibration in manifest.yaml, keeping comments, order and anchors
(ruamel.yaml round trip). The result is validated before it replaces the file."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, cast

import yaml
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq

from .errors import UnknownModelError
from .files import write_text_atomic
from .manifest import Manifest, parse_manifest


def _round_trip_yaml() -> YAML:
    rt = YAML(typ="rt")
    rt.preserve_quotes = True
    rt.width = 4096  # never re-wrap long scalars
    rt.indent(mapping=2, sequence=4, offset=2)
    return rt


def _deepest_last(node: CommentedMap) -> tuple[CommentedMap, Any]:
    key = list(node)[-1]
    child = node[key]
    if isinstance(child, CommentedMap) and child:
        return _deepest_last(child)
    return node, key


def _take_trailing(node: CommentedMap) -> Any:
    parent, key = _deepest_last(node)
    entry = parent.ca.items.get(key)
    if entry and len(entry) > 2 and entry[2] is not None:
        token, entry[2] = entry[2], None
        return token
    return None


def _put_trailing(node: CommentedMap, token: Any) -> None:
    if token is not None:
        parent, key = _deepest_last(node)
        entry = parent.ca.items.setdefault(key, [None, None, None, None])
        entry[2] = token


def _commented(value: Any) -> Any:
    """Plain dicts and lists as ruamel's commented types, which can carry a trailing comment."""
    if isinstance(value, dict):
        return CommentedMap((k, _commented(v)) for k, v in value.items())
    if isinstance(value, list):
        return CommentedSeq(_commented(v) for v in value)
    return value


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
        if channel in calibration:
            # The blank line that ends a model is stored on the deepest last key of its YAML;
            # removing that key must not take the line with it.
            trailing = _take_trailing(calibration)
            del calibration[channel]
            # round-trip loading gives a CommentedMap for every mapping
            _put_trailing(calibration if calibration else cast(CommentedMap, model), trailing)
    else:
        # Likewise a comment or blank line after the replaced record (or, for a new record that
        # goes last, after the record it follows) moves onto the new record.
        old = calibration.get(channel)
        if isinstance(old, CommentedMap) and old:
            trailing = _take_trailing(old)
        elif channel not in calibration and calibration:
            trailing = _take_trailing(calibration)
        else:
            trailing = None
        new = _commented(record)
        calibration[channel] = new
        _put_trailing(new if isinstance(new, CommentedMap) and new else calibration, trailing)
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
