"""The active model files of a service's roles, checked against the manifest before serving."""

from __future__ import annotations

from pathlib import Path

from services.common.models import ModelStore


def active_model_files(store: ModelStore, roles: tuple[str, ...]) -> dict[str, Path]:
    """{model id: main file} for every active model of ``roles``; raises (FetchError, RuntimeError)
    (the service stays NOT_SERVING) when one is missing or fails its sha256."""
    ids = [spec.id for spec in store.manifest.models if spec.active and spec.role in roles]
    store.fetch(ids)  # cheap when cached; picks up operator-supplied files from the local dirs
    files = {model_id: store.path(model_id) for model_id in ids}
    problems = store.verify(ids)
    if problems:
        raise RuntimeError("; ".join(str(p) for p in problems))
    return files
