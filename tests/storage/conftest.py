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


def _python(script: str | Path, *args: str, **popen: object) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT))
    code = [str(script)] if isinstance(script, Path) else ["-c", script]
    return subprocess.Popen(  # type: ignore[call-overload]
        [sys.executable, *code, *args], cwd=PROJECT_ROOT, env=env, text=True, **popen
    )


@pytest.fixture
def python():
    """Start a child Python process (a file, or code for -c) that imports the project."""
    return _python
