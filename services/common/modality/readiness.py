"""The readiness gate of a service: closed while its models load, then holding what they loaded.

Every RPC that needs the models takes them through :meth:`ReadinessGate.get`, which refuses with
UNAVAILABLE MODELS_LOADING (retryable) until the warm-up opened the gate; the gRPC health status
turns SERVING at the same moment (services/common/server/bootstrap.py).
"""

from __future__ import annotations

import threading
from typing import Generic, TypeVar

from .reasons import refusal

T = TypeVar("T")


class ReadinessGate(Generic[T]):
    def __init__(self, what: str) -> None:
        self.what = what  # e.g. "face": named in the refusal
        self._value: T | None = None
        self._opened = threading.Event()

    def open(self, value: T) -> None:
        self._value = value
        self._opened.set()

    @property
    def is_open(self) -> bool:
        return self._opened.is_set()

    @property
    def value(self) -> T | None:
        """What the warm-up loaded, or None before it finished (no refusal: for erasure and closing)."""
        return self._value if self._opened.is_set() else None

    def get(self) -> T:
        if not self._opened.is_set():
            raise refusal("MODELS_LOADING", f"the {self.what} models are still loading; retry shortly")
        return self._value  # type: ignore[return-value]
