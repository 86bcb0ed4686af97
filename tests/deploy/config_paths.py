"""Paths in the typed configuration: whether an environment variable BIOGATE_<SECTION>__<FIELD>
names a field, and every setting of the tree as a dotted path."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel

from services.settings import Settings


def section(annotation: Any) -> type[BaseModel] | None:
    """The section a field holds (a nested model, not a list or a mapping of them), else None."""
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def field_exists(path: list[str], model: type[BaseModel] = Settings) -> bool:
    name, rest = path[0].lower(), path[1:]
    info = model.model_fields.get(name)
    if info is None:
        return False
    if not rest:
        return True
    inner = section(info.annotation)
    return inner is not None and field_exists(rest, inner)


def names_a_setting(variable: str) -> bool:
    return variable.startswith("BIOGATE_") and field_exists(variable[len("BIOGATE_"):].split("__"))


def settings(model: type[BaseModel] = Settings, prefix: str = "") -> Iterator[str]:
    """Every setting of the tree, as a dotted path (server.face.port); a list or mapping of sections
    (auth.principals, voice.tenants) is one setting."""
    for name, info in model.model_fields.items():
        inner = section(info.annotation)
        if inner is None:
            yield prefix + name
        else:
            yield from settings(inner, f"{prefix}{name}.")


def given(document: dict, prefix: str = "") -> Iterator[str]:
    """The dotted paths a YAML configuration gives, down to the settings (a mapping under a setting
    that is itself a mapping, such as voice.tenants, is named by its setting's path and below)."""
    for key, value in document.items():
        yield prefix + str(key)
        if isinstance(value, dict):
            yield from given(value, f"{prefix}{key}.")
