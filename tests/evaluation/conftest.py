from __future__ import annotations

import os
from pathlib import Path

import pytest

from services.common.config import PROJECT_ROOT

FIXTURES = PROJECT_ROOT.parent / "shared" / "fixtures"


@pytest.fixture(scope="session")
def fixtures_root() -> Path:
    if not (FIXTURES / "MANIFEST.csv").is_file():
        if os.environ.get("CI"):
            pytest.fail(f"the evaluation fixtures are missing: {FIXTURES}")
        pytest.skip(f"no fixtures at {FIXTURES}")
    return FIXTURES
