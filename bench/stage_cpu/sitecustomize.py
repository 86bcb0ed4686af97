"""Stage CPU of a service process, for bench.face_overhead --stages: imported at start-up when this
folder is on PYTHONPATH, it wraps the functions named in BIOGATE_STAGES ("module:Class.attr,...") and
sums the calling thread's CPU time (time.thread_time) spent inside each, nested calls included, into
BIOGATE_STAGES_DIR/stages-<pid>.json every second. Thread CPU, not samples: a profiler's sampler
(py-spy --nonblocking) counts a thread blocked in C, e.g. in SQLite's fsync, as working."""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import os
import sys
import threading
import time

_SPEC = os.environ.get("BIOGATE_STAGES", "")
_totals: dict[str, list[float]] = {}
_lock = threading.Lock()
_writer_pid = 0


def _write_forever(path: str) -> None:
    while True:
        time.sleep(1.0)
        with _lock:
            snapshot = {k: list(v) for k, v in _totals.items()}
        tmp = f"{path}.tmp"
        with open(tmp, "w") as fh:
            json.dump(snapshot, fh)
        os.replace(tmp, path)


def _ensure_writer() -> None:
    global _writer_pid
    if _writer_pid != os.getpid():  # the first call in this process (a forked worker too)
        _writer_pid = os.getpid()
        path = os.path.join(os.environ["BIOGATE_STAGES_DIR"], f"stages-{_writer_pid}.json")
        threading.Thread(target=_write_forever, args=(path,), daemon=True, name="stage-cpu").start()


def _wrap(name: str, fn):
    slot = _totals.setdefault(name, [0.0, 0])

    @functools.wraps(fn)
    def timed(*args, **kwargs):
        _ensure_writer()
        t = time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            d = time.thread_time() - t
            with _lock:
                slot[0] += d
                slot[1] += 1

    return timed


if _SPEC:  # the service runs from its tree (its working directory), not the venv's editable install
    sys.path.insert(0, os.getcwd())
for _target in filter(None, _SPEC.split(",")):
    _module, _path = _target.split(":")
    _owner = importlib.import_module(_module)
    *_parents, _attr = _path.split(".")
    for _p in _parents:
        _owner = getattr(_owner, _p)
    _fn = inspect.getattr_static(_owner, _attr)
    if isinstance(_fn, staticmethod):
        setattr(_owner, _attr, staticmethod(_wrap(_target, _fn.__func__)))
    else:
        setattr(_owner, _attr, _wrap(_target, _fn))
