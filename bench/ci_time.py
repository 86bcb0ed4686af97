"""Wall and CPU time of test selections under two trees of the project, alternated (A, B, A, B...):
what a change to the suite's fixtures or tests saves in CI (`make test`).

    .venv/bin/python -m bench.ci_time --base /path/to/base-worktree --rounds 2 \
        tests/face/test_eval_parity.py tests/voice/test_eval_parity.py

Each selection runs as its own pytest process (``CI=true``, as .ci/run, so that nothing is
skipped) in each tree; the figures are the process's wall time and the CPU time of it and its
children (getrusage), with the machine's load average before each run: on a machine shared with
other work the wall time follows the load, the CPU time much less, and a change that fills an idle
core shows in wall time only where a core is free. Every run must pass.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench.harness import ROOT, machine_line


def run(tree: Path, selection: str, timeout_s: float) -> tuple[float, float, str]:
    """(wall s, CPU s of pytest and its children, load average before) of one passing run."""
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", selection],
                          cwd=tree, env={**os.environ, "CI": "true"}, capture_output=True, text=True,
                          timeout=timeout_s)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        raise SystemExit(f"{selection} failed in {tree}:\n{proc.stdout[-3000:]}{proc.stderr[-2000:]}")
    return wall, cpu, load


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("selections", nargs="+", help="pytest paths or node ids, each run on its own")
    ap.add_argument("--base", type=Path, required=True, help="the tree to compare with (a git worktree)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--timeout-s", type=float, default=1800)
    args = ap.parse_args()
    print(machine_line())
    for selection in args.selections:
        figures: dict[str, list[tuple[float, float, str]]] = {"base": [], "this": []}
        for _ in range(args.rounds):
            for name, tree in (("base", args.base), ("this", ROOT)):
                figures[name].append(run(tree, selection, args.timeout_s))
                wall, cpu, load = figures[name][-1]
                print(f"  {selection} {name}: wall {wall:.1f} s, CPU {cpu:.1f} s, load before {load}", flush=True)
        base = np.median([f[0] for f in figures["base"]])
        this = np.median([f[0] for f in figures["this"]])
        cpu_base = np.median([f[1] for f in figures["base"]])
        cpu_this = np.median([f[1] for f in figures["this"]])
        print(f"{selection}: wall median {base:.1f} -> {this:.1f} s ({this / base:.2f}x), "
              f"CPU {cpu_base:.1f} -> {cpu_this:.1f} s ({cpu_this / cpu_base:.2f}x)", flush=True)


if __name__ == "__main__":
    main()
