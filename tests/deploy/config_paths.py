"""Whether an environment variable BIOGATE_<SECTION>__<FIELD> names a field of the typed configuration."""

from __future__ import annotations

from pydantic import BaseModel

from services.settings import Settings


def field_exists(path: list[str], model: type[BaseModel] = Settings) -> bool:
    name, rest = path[0].lower(), path[1:]
    info = model.model_fields.get(name)
    if info is None:
        return False
    if not rest:
        return True
    inner = info.annotation
    return isinstance(inner, type) and issubclass(inner, BaseModel) and field_exists(rest, inner)


def names_a_setting(variable: str) -> bool:
    return variable.startswith("BIOGATE_") and field_exists(variable[len("BIOGATE_"):].split("__"))
