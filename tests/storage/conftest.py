"""The storage suite runs every test on SQLite and on PostgreSQL (the root conftest's
``storage_dsn``: a temporary file, or a fresh schema dropped afterwards)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.common.config import PROJECT_ROOT
from services.common.storage import SqlStorage, open_storage


@pytest.fixture
def storage(storage_dsn: str) -> Iterator[SqlStorage]:
    st = open_storage(storage_dsn)
    yield st
    st.close()


def python(script: str | Path, *args: str, **popen: object) -> subprocess.Popen:
    """A child Python process that imports the project (as the services' processes do)."""
    env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT))
    cmd = [sys.executable, str(script), *args] if isinstance(script, Path) else [sys.executable, "-c", script, *args]
    return subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=env, text=True, **popen)  # type: ignore[call-overload]
