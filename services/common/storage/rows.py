"""Mapping between record dataclasses and table rows: the columns are named as the fields."""

from __future__ import annotations

import dataclasses
import functools
import typing
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any, TypeVar

from .db import from_json, from_ts

R = TypeVar("R")


def _identity(v: Any) -> Any:
    return v


def _optional_bytes(v: Any) -> bytes | None:
    return None if v is None else bytes(v)


def _json_tuple(v: Any) -> tuple[Any, ...]:
    return tuple(from_json(v))


def _decoder(hint: Any) -> Callable[[Any], Any]:
    origin = typing.get_origin(hint)
    args = set(typing.get_args(hint)) or {hint}
    if datetime in args:
        return from_ts
    if bytes in args:
        return _optional_bytes
    if origin is tuple:
        return _json_tuple
    if origin is Mapping:
        return from_json
    if hint is bool or hint is int:
        return hint
    return _identity


@functools.cache
def _fields(cls: type) -> tuple[tuple[str, Callable[[Any], Any]], ...]:
    hints = typing.get_type_hints(cls)
    return tuple((f.name, _decoder(hints[f.name])) for f in dataclasses.fields(cls))


@functools.cache
def columns(cls: type) -> str:
    """The SELECT list for a record type, in field order."""
    return ", ".join(name for name, _ in _fields(cls))


@functools.cache
def insert_sql(table: str, cls: type) -> str:
    n = len(_fields(cls))
    return f"INSERT INTO {table} ({columns(cls)}) VALUES ({', '.join('?' * n)})"


def values(rec: Any) -> tuple[Any, ...]:
    """A record's field values in column order, ready for :func:`insert_sql`."""
    return tuple(
        dict(v) if isinstance(v, Mapping) else v
        for v in (getattr(rec, name) for name, _ in _fields(type(rec)))  # type: ignore[arg-type]  # mypy: a class is not Hashable
    )


@functools.cache
def _decoders(cls: type) -> tuple[Callable[[Any], Any] | None, ...]:
    return tuple(None if dec is _identity else dec for _, dec in _fields(cls))


def to_record(cls: type[R], row: Any) -> R:
    # Positional: the columns are selected in field order. Hot in 1:N gallery scans.
    decoders = _decoders(cls)  # type: ignore[arg-type]  # mypy: a class is not Hashable
    return cls(*[v if dec is None else dec(v) for dec, v in zip(decoders, row, strict=True)])
