"""What every benchmark shares: a service in its own process, free ports, percentiles, peak RSS,
a description of the machine, and the results it writes.

    from bench.harness import ServiceProcess, pct
    with ServiceProcess("face", {"face": {"intra_op_threads": 1}}) as svc:
        stub = face_pb2_grpc.FaceServiceStub(svc.channel())
        ...
        rss = svc.peak_rss_mb()

Scripts run from the repository root as modules (``.venv/bin/python -m bench.face_bench``), so
they import ``services`` and ``bench`` like any other code. A service is started the way an
operator starts it (``biogate --config FILE serve NAME``) on free loopback ports with a temporary
data directory and the repository's model cache, and is SERVING (grpc.health.v1) before
``start`` returns: the figures never include model loading.
"""

from __future__ import annotations

import datetime as dt
import gc
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures"
RESULTS = ROOT / "bench" / "RESULTS.md"
MODEL_CACHE = ROOT / "var" / "models"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(values_s, q: float) -> float:
    """The q-th percentile of durations given in seconds, in milliseconds (nan when empty)."""
    values = np.asarray(list(values_s), dtype=np.float64)
    return float(np.percentile(values * 1000.0, q)) if values.size else float("nan")


def peak_rss_mb(pid: int) -> float:
    """Peak resident set size (VmHWM) of a live process, from /proc."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_stats(pid: int) -> dict[int, tuple[str, str, float]]:
    """Each live thread of ``pid``: tid -> (name, scheduler state, user + system CPU seconds), from
    /proc. State "R" is running or runnable (waiting for a core)."""
    out: dict[int, tuple[str, str, float]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        out[int(task.name)] = (name, fields[0], (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"))
    return out


class ThreadSampler:
    """Samples the scheduler state of every thread of some processes (a service and its workers) in
    a background thread: how many are runnable at once (more than the cores: oversubscribed), and
    which threads used the CPU, by name, between ``start`` and ``stop``."""

    def __init__(self, pids: list[int], interval_s: float = 0.05) -> None:
        import threading

        self.pids, self.interval_s = pids, interval_s
        self.runnable: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._before: dict[tuple[int, int], tuple[str, str, float]] = {}
        self.cpu_by_name: dict[str, float] = {}
        self.busy_threads = 0

    def _snapshot(self) -> dict[tuple[int, int], tuple[str, str, float]]:
        return {(pid, tid): v for pid in self.pids for tid, v in thread_stats(pid).items()}

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.runnable.append(sum(state == "R" for _, state, _ in self._snapshot().values()))

    def start(self) -> "ThreadSampler":
        self._before = self._snapshot()
        self._thread.start()
        return self

    def stop(self) -> "ThreadSampler":
        self._stop.set()
        self._thread.join()
        by_name: dict[str, float] = {}
        self.busy_threads = 0
        for key, (name, _, cpu) in self._snapshot().items():
            used = cpu - self._before.get(key, (name, "", 0.0))[2]
            # 50 ms over a level: a thread that did work, not a timer or an idle pool
            self.busy_threads += used >= 0.05
            if used > 0:
                by_name[name] = by_name.get(name, 0.0) + used
        self.cpu_by_name = dict(sorted(by_name.items(), key=lambda kv: -kv[1]))
        return self

    def summary(self, cores: int) -> dict[str, Any]:
        """``demand``: the mean of min(runnable, cores) / cores, the share of the cores the process
        would keep busy if they were its own (other jobs' load stretches its runs and its waits for
        Redis or a disk do not, so this leans optimistic on a loaded machine)."""
        r = np.asarray(self.runnable or [0])
        return {"runnable_mean": round(float(r.mean()), 2), "runnable_p95": float(np.percentile(r, 95)),
                "below_cores": round(float((r < cores).mean()), 3),
                "demand": round(float(np.minimum(r, cores).mean() / cores), 3),
                "runnable_max": int(r.max()), "samples": len(self.runnable),
                "threads_using_cpu": self.busy_threads,
                "cpu_s_by_thread": {k: round(v, 2) for k, v in self.cpu_by_name.items()}}


class GcLog:
    """Each collection of this process: (start, end, generation, collected), perf_counter seconds."""

    def __init__(self) -> None:
        self.events: list[tuple[float, float, int, int]] = []
        self._started: dict[int, float] = {}

    def __call__(self, phase: str, info: dict) -> None:
        tid = threading.get_ident()
        if phase == "start":
            self._started[tid] = time.perf_counter()
        else:
            self.events.append((self._started.pop(tid, float("nan")), time.perf_counter(), info["generation"],
                                info["collected"]))

    def install(self) -> "GcLog":
        gc.callbacks.append(self)
        return self

    def remove(self) -> None:
        gc.callbacks.remove(self)

    def summary(self, since: float = float("-inf")) -> dict[str, dict[str, float]]:
        """Per generation: collections that started after ``since``, their longest and total ms."""
        out = {}
        for g in (0, 1, 2):
            ms = [(e[1] - e[0]) * 1000 for e in self.events if e[2] == g and e[0] >= since]
            out[f"gen{g}"] = {"count": len(ms), "max_ms": round(max(ms, default=0.0), 1), "total_ms": round(sum(ms), 1)}
        return out


def parallel_rate(step, seconds: float, threads: int) -> float:
    """Calls of ``step(k)`` (k: the call's index, spread over the threads) per second, one thread each
    of ``threads`` running it back to back for ``seconds``: issue 13's raw-model ceiling."""
    import threading

    done = [0] * threads
    stop_at = time.monotonic() + seconds

    def work(w: int) -> None:
        k = w
        while time.monotonic() < stop_at:
            step(k)
            done[w] += 1
            k += threads

    t0 = time.perf_counter()
    workers = [threading.Thread(target=work, args=(w,)) for w in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    return sum(done) / (time.perf_counter() - t0)


def child_pids(pid: int) -> list[int]:
    """The live child processes of ``pid`` (a service's worker processes)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def gpu_name() -> str | None:
    """The first NVIDIA GPU's name, or None where there is none (the CPU development machines)."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out.splitlines()[0] if out else None


def machine() -> dict[str, Any]:
    """What a figure was measured on: CPU model, cores, load at the time, GPU if any."""
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"date": dt.date.today().isoformat(), "cpu": cpu, "cores": os.cpu_count(),
            "load_1min": round(os.getloadavg()[0], 2), "gpu": gpu_name(), "python": platform.python_version()}


def machine_line(m: dict[str, Any] | None = None) -> str:
    m = m or machine()
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU"
    return f"{m['date']}, {m['cores']} shared cores ({m['cpu']}){gpu}, load average {m['load_1min']:.1f}"


def command_line() -> str:
    """How the running benchmark was invoked, as someone would type it."""
    module = Path(sys.argv[0]).stem
    return f".venv/bin/python -m bench.{module} " + " ".join(sys.argv[1:])


def dev_token(settings, role: str = "dev-all") -> str:
    return str(json.loads(settings.dev_credentials_file.read_text())[role])


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


class ServiceProcess:
    """One BioGate service in its own process, on free loopback ports, until ``stop``."""

    def __init__(self, service: str, config: dict[str, Any] | None = None, *, data_dir: Path | None = None,
                 log_level: str = "WARNING", timeout_s: float = 600.0, root: Path = ROOT) -> None:
        self.service = service
        self.root = root  # the source tree it runs (another worktree: a base to compare against)
        self._tmp = None if data_dir is not None else tempfile.TemporaryDirectory(prefix=f"bench-{service}-")
        self.dir = Path(data_dir or self._tmp.name)  # type: ignore[union-attr]
        self.port = free_port()
        base = {
            "data_dir": str(self.dir / "data"),
            "server": {service: {"host": "127.0.0.1", "port": self.port, "metrics_port": None}},
            "models": {"cache_dir": str(MODEL_CACHE)},
            "logging": {"level": log_level},
        }
        if service == "mfa":  # beside a running installation, not on its JWKS port
            base["mfa"] = {"http": {"port": 0}}
        else:  # the failure bound stays on, its read on the path measured, but the benches' impostor
            # and no-match trials, hundreds on a few subjects, must not reach it (attempts.py)
            base[service] = {"verify_limit": {"failures": 1_000_000_000}}
        self.config = _merge(base, config or {})
        self.config_file = self.dir / "config.yaml"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(yaml.safe_dump(self.config))
        self.log_file = self.dir / f"{service}.log"
        self.timeout_s = timeout_s
        self.proc: subprocess.Popen | None = None
        self.start_s = float("nan")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def settings(self):
        from services.settings import load_config

        return load_config(self.config_file)

    def start(self) -> "ServiceProcess":
        from services.serve import health_status

        t0 = time.monotonic()
        self.proc = subprocess.Popen(self.command(), cwd=self.root, stdout=subprocess.DEVNULL,
                                     stderr=open(self.log_file, "w"), env=self.environment())
        while health_status(self.address) != "SERVING":
            if self.proc.poll() is not None or time.monotonic() - t0 > self.timeout_s:
                self.stop()
                raise RuntimeError(f"the {self.service} service did not become SERVING; see {self.log_file}")
            time.sleep(0.5)
        self.start_s = time.monotonic() - t0
        return self

    def command(self) -> list[str]:
        return [sys.executable, "-m", "services.cli", "--config", str(self.config_file), "serve", self.service]

    def environment(self) -> dict[str, str] | None:
        """The service's environment; None: this process's."""
        return None

    def token(self, role: str = "dev-all") -> str:
        return dev_token(self.settings, role)

    def channel(self, role: str = "dev-all"):
        """A blocking channel carrying the development token of ``role``."""
        from services.common.client import connect

        return connect(self.address, self.token(role))

    def peak_rss_mb(self) -> float:
        """The largest peak RSS of the service's processes (its workers', with server.workers > 1)."""
        assert self.proc is not None
        return max(peak_rss_mb(pid) for pid in (self.proc.pid, *child_pids(self.proc.pid)))

    def cpu_seconds(self) -> float:
        """CPU time (user + system) the service's processes have used so far: its own per
        verification does not depend on what other jobs take of the shared cores."""
        assert self.proc is not None
        return sum(cpu_seconds(pid) for pid in (self.proc.pid, *child_pids(self.proc.pid)))

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> "ServiceProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def write_json(path: str | os.PathLike[str] | None, report: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(report, indent=1, default=str))


def replace_section(heading: str, body: str, *, keep_subsections: bool = False, path: Path = RESULTS) -> None:
    """Replaces the ``## heading`` section of RESULTS.md with ``body`` (which starts with that
    heading), or appends it; with ``keep_subsections`` its ``###`` subsections stay."""
    text = path.read_text()
    marker = f"## {heading}\n"
    start = text.find(marker)
    if start == -1:
        path.write_text(text.rstrip("\n") + "\n\n" + body.rstrip("\n") + "\n")
        return
    end = text.find("\n## ", start + len(marker))
    end = len(text) if end == -1 else end + 1
    if keep_subsections:
        sub = text.find("\n### ", start, end)
        if sub != -1:
            end = sub + 1
    path.write_text(text[:start] + body.rstrip("\n") + "\n\n" + text[end:].lstrip("\n"))
