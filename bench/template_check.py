"""`biogate audit templates` over a database of N templates: its wall time and peak memory.

    .venv/bin/python -m bench.template_check [--templates 20000] [--dsn sqlite] [--batch 1000]

The database is made through the real enrolment code (``Templates.enrol``: sealed envelope, template
row and its audit record in one transaction) on SQLite in a temporary directory: a third of the
subjects face, the others voice on both channels; one subject in ten re-enrolled, one in fifty
erased, and two Verify-like records per template, so the trail holds about three times as many
records as there are templates. Then, each in a process of its own (peak RSS is the process's):
``biogate audit verify`` (the chain alone) and ``biogate audit templates`` (the chain and the
templates), each run ``--rounds`` times; the minimum and the maximum wall time are printed.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from services.common.api.v1 import common_pb2
from services.common.context import SYSTEM
from services.common.modality.templates import Templates
from services.common.runtime import Runtime
from services.common.storage import ConsentRecord
from services.common.subjects import delete_modality
from services.settings import load_config

CHECK = """
import argparse, resource, sys, time
from services.commands import audit
from services.settings import load_config
settings = load_config(None, data_dir=sys.argv[1], storage={"dsn": sys.argv[2]})
parser = argparse.ArgumentParser()
audit.register(parser.add_subparsers(dest="command"))
args = parser.parse_args(["audit", *sys.argv[3:]])
t = time.perf_counter()
code = args.func(settings, args)
took = time.perf_counter() - t
print(f"BENCH exit={code} seconds={took:.2f} peak_rss_mib={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}",
      file=sys.stderr)
"""


def populate(data_dir: Path, dsn: str, n: int) -> None:
    rt = Runtime.open(load_config(None, data_dir=str(data_dir), storage={"dsn": dsn, "sqlite_synchronous": "NORMAL"}))
    face, voice = Templates(rt, "face"), Templates(rt, "voice")
    rng = np.random.default_rng(7)
    made, subject = 0, 0
    while made < n:
        sid = f"s{subject:07d}"
        rt.storage.subjects.record_consent(ConsentRecord("bank-a", sid, "biometric_verification", ("face", "voice"),
                                                         "v1"))
        kinds = [(face, "")] if subject % 3 == 0 else [(voice, "telephone"), (voice, "wideband")]
        for t, channel in kinds:
            for again in range(2 if subject % 10 == 1 else 1):
                v = rng.normal(size=512 if t is face else 192).astype(np.float32)
                t.enrol("bank-a", sid, f"{t.modality}-model", v / np.linalg.norm(v), channel=channel, samples=3,
                        quality={}, replace=bool(again), details={"samples": 3}, caller=SYSTEM)
            made += 1
            for _ in range(2):
                rt.audit.append(f"{t.modality}.verified", "service:bench", "bank-a", sid, {"decision": "accept"})
        if subject % 50 == 49:
            delete_modality(rt, common_pb2.DeleteSubjectRequest(
                subject=common_pb2.SubjectRef(tenant_id="bank-a", subject_id=sid), reason="bench"), kinds[0][0].modality,
                            caller=SYSTEM)
            made -= len(kinds)
        subject += 1
    rows = rt.storage.audited_rows()["templates"]
    last = rt.storage.audit.last()
    print(f"populated: {rows} templates, {last.seq if last else 0} audit records")
    rt.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--templates", type=int, default=20000)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=Path.cwd() / "var") as tmp:
        data, dsn = Path(tmp) / "data", f"sqlite:///{tmp}/bench.db"
        t = time.perf_counter()
        populate(data, dsn, a.templates)
        print(f"made in {time.perf_counter() - t:.0f} s")
        for what in (["verify"], ["templates", "--batch", str(a.batch)]):
            runs = []
            for _ in range(a.rounds):
                out = subprocess.run([sys.executable, "-c", CHECK, str(data), dsn, *what], capture_output=True,
                                     text=True, check=False)
                line = next(x for x in out.stderr.splitlines() if x.startswith("BENCH"))
                runs.append(dict(kv.split("=") for kv in line.split()[1:]))
                summary = [x for x in out.stdout.splitlines() if x.startswith(("audit trail", "templates"))]
            secs = sorted(float(r["seconds"]) for r in runs)
            print(f"audit {what[0]}: {secs[0]:.2f}-{secs[-1]:.2f} s over {a.rounds} runs, peak RSS "
                  f"{max(int(r['peak_rss_mib']) for r in runs)} MiB, exit {runs[-1]['exit']}; " + " | ".join(summary))
    print(f"bench process peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
