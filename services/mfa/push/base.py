"""The push gateway interface: hands one confirmation message to the provider for one app install."""

from __future__ import annotations

from typing import Protocol


class PushError(Exception):
    """The message could not be handed over (the app is unreachable for now, or its token is stale)."""

    def __init__(self, message: str, transient: bool = True) -> None:
        super().__init__(message)
        self.transient = transient


class PushGateway(Protocol):
    def send(self, token: str, data: dict[str, str], ttl_s: int, collapse_key: str) -> str:
        """Hand one data message over; returns the provider's message id. Raises PushError."""
