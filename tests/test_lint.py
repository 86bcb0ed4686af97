"""The linter and the type checker run with the suite (`make test`), configured in pyproject.toml:
ruff over every Python file of the repository, mypy over services/, tests/ and bench/. Each test
also checks that its tool looked at the code it is meant to, so a configuration that excludes too
much cannot pass by checking nothing."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GENERATED = re.compile(r"_pb2(_grpc)?\.pyi?$")  # protoc's output (make stubs)


def _run(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _own_modules(*dirs: str) -> set[Path]:
    return {p for d in dirs for p in (ROOT / d).rglob("*.py") if not GENERATED.search(p.name)}


def test_ruff_finds_nothing() -> None:
    run = _run("ruff", "check", "--output-format", "concise", "--no-cache", ".", timeout=300)
    assert run.returncode == 0, f"ruff check found problems:\n{run.stdout}{run.stderr}"
    shown = _run("ruff", "check", "--show-files", ".", timeout=300)
    assert shown.returncode == 0, shown.stderr
    checked = {Path(line.strip()) for line in shown.stdout.splitlines() if line.strip()}
    missed = sorted(str(p.relative_to(ROOT)) for p in _own_modules("services", "tests", "bench") - checked)
    assert not missed, f"ruff does not check: {missed[:20]}"


def test_mypy_finds_nothing() -> None:
    run = _run("mypy", timeout=900)  # [tool.mypy] names the code; .mypy_cache makes reruns fast
    out = run.stdout + run.stderr
    assert run.returncode == 0, f"mypy found problems:\n{out}"
    m = re.search(r"no issues found in (\d+) source files", out)
    assert m, out
    # what [tool.mypy] excludes is generated code, or test helpers checked as the bare-named modules
    # the tests import (not counted among the sources)
    excluded = re.compile("|".join(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]["exclude"]))
    own = len({p for p in _own_modules("services", "tests", "bench")
               if not excluded.search(p.relative_to(ROOT).as_posix())})
    assert int(m.group(1)) >= own, \
        f"mypy checked {m.group(1)} files; services/, tests/ and bench/ have {own} modules of their own"


def test_no_test_imports_a_module_whose_bare_name_several_test_directories_hold() -> None:
    """tests/face, tests/voice and tests/evaluation each put their directory on sys.path, so a bare
    ``import conftest`` or ``from test_service import ...`` reaches whichever of their files of that
    name was imported first in the run: one order passes, the whole suite's order fails
    (ImportError, or another directory's helper). Such a module is imported by its package path."""
    dirs = [ROOT / "tests" / d for d in ("face", "voice", "evaluation", "services")]
    names: dict[str, int] = {}
    for d in dirs:
        for p in d.glob("*.py"):
            names[p.stem] = names.get(p.stem, 0) + 1
    shared = {n for n, count in names.items() if count > 1}
    assert "conftest" in shared and "test_service" in shared, sorted(shared)
    bare = re.compile(rf"^\s*(?:from\s+({'|'.join(sorted(shared))})\s+import|import\s+({'|'.join(sorted(shared))})\b)", re.M)
    found = [f"{p.relative_to(ROOT)}: {m.group(0).strip()}" for p in (ROOT / "tests").rglob("*.py")
             for m in bare.finditer(p.read_text())]
    assert not found, "import these by their package path (tests.voice.conftest, ...):\n" + "\n".join(found)
