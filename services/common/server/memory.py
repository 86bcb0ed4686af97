"""Returns the heap a burst of model work freed to the operating system once the service is idle.

glibc keeps what its per-thread arenas freed for reuse: after a burst on many threads (decoded
images, audio, model activations) a service kept most of its peak resident set for good (issue 12:
face 332 MB -> ~2.4 GB over a test run). ``malloc_trim(0)`` hands the free pages back; it takes the
arenas' locks, so it runs only after ``idle_s`` without any model work, once per burst.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading
import time
from typing import Callable

log = logging.getLogger("biogate.server")


def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    trim = getattr(libc, "malloc_trim", None)  # glibc only (not musl, not macOS)
    if trim is not None:
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


class IdleTrimmer:
    """Calls malloc_trim once the queue has been idle for ``idle_s`` after some work (a daemon thread)."""

    def __init__(self, queue, idle_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.queue, self.idle_s, self.clock = queue, idle_s, clock
        self.trim = _malloc_trim()
        self.trims = 0
        self._seen = queue.completed
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-trim", daemon=True)

    def start(self) -> "IdleTrimmer":
        if self.trim is not None and self.idle_s > 0:
            self._thread.start()
        return self

    def check(self) -> bool:
        """Trims when there was work since the last trim and none for ``idle_s``; -> whether it did."""
        q = self.queue
        if q.completed == self._seen or q.running or q.queued or self.clock() - q.last_activity < self.idle_s:
            return False
        self._seen = q.completed
        if self.trim is not None:
            self.trim(0)
        self.trims += 1
        return True

    def _run(self) -> None:
        while not self._stop.wait(self.idle_s / 2):
            try:
                self.check()
            except Exception:  # noqa: BLE001 - never worth the service: log and go on
                log.exception("memory trim failed")

    def close(self) -> None:
        self._stop.set()
