"""The SMS gateway interface: the only place a phone number is used in clear."""

from __future__ import annotations

from typing import Protocol


class SmsError(Exception):
    """The message could not be handed to the gateway."""

    def __init__(self, message: str, transient: bool = True) -> None:
        super().__init__(message)
        self.transient = transient


class SmsGateway(Protocol):
    def send(self, to_e164: str, text: str, idempotency_key: str) -> str:
        """Hand one message over; returns the gateway's message id. Raises SmsError."""
