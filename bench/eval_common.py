"""What the evaluation benchmarks (bench/*eval*.py, bench/face_identities.py) share: running the
project's own `biogate` commands in process, and writing a results file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def run(args: list[str]) -> None:
    """`biogate ARGS` in this process; stops the benchmark when it fails."""
    from services.cli import main as biogate

    print("biogate " + " ".join(args), flush=True)
    if biogate(args) != 0:
        raise SystemExit(f"biogate {args[0]} failed")


def write_results(out: str | Path, results: dict[str, Any]) -> Path:
    path = Path(out) / "results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, default=str), encoding="utf-8")
    print(f"results: {path}")
    return path
