"""The gateway's HTTP connections (uvicorn's h11 protocol) bounded by kiosk.http:

- a request's head must arrive within ``head_timeout_s``, its body within ``body_timeout_s`` of the
  head, else 408 and the connection is closed: a client sending slowly (slowloris) or not at all
  holds a connection that long at most, not for ever;
- lingering close: when an answer closes the connection while the request's body is still coming
  (413 by its Content-Length, 429), the gateway shuts its sending side and reads and drops what
  still arrives, until the client closes or ``linger_s`` passes. Closing a socket with unread bytes
  makes the kernel reset the connection, and the client, still sending, then got the reset instead
  of the answer;
- ``max_connections`` held at once, and ``max_connections_per_ip`` held by one client address
  (ratelimit.address_key: an IPv6 client by its network): one more is answered 503
  TOO_MANY_CONNECTIONS and closed as it is accepted, before anything is read;
- the answers written here (408, 503, 400 for what h11 cannot parse) are the gateway's JSON errors.
"""

from __future__ import annotations

import asyncio
import json
from http import HTTPStatus
from typing import Any, ClassVar

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.utils import get_remote_addr

from services.kiosk.config import HttpLimitsConfig
from services.kiosk.metrics import CONNECTIONS_CLOSED, CONNECTIONS_REFUSED
from services.kiosk.ratelimit import address_key


def closing_answer(status: HTTPStatus, reason: str, message: str, retry_after_s: int | None = None) -> bytes:
    """The gateway's JSON error as the connection writes it itself, closing the connection."""
    body = json.dumps({"reason": reason, "message": message, "fields": {}}).encode()
    retry = "" if retry_after_s is None else f"retry-after: {retry_after_s}\r\n"
    return (f"HTTP/1.1 {status.value} {status.phrase}\r\ncontent-type: application/json\r\n"
            f"x-content-type-options: nosniff\r\n{retry}connection: close\r\ncontent-length: {len(body)}\r\n\r\n"
            ).encode() + body


class _LingeringTransport:
    """The connection's transport as uvicorn sees it: its close() lingers when the protocol says so."""

    def __init__(self, transport: asyncio.Transport, protocol: GuardedH11Protocol) -> None:
        self._transport, self._protocol = transport, protocol

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def close(self) -> None:
        if self._protocol.should_linger():
            self._protocol.linger()
        else:
            self._transport.close()

    def is_closing(self) -> bool:
        return self._protocol.lingering or self._transport.is_closing()


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the limits of ``limits`` (set on a subclass: protocol_class)."""

    limits: HttpLimitsConfig = HttpLimitsConfig()
    ipv6_prefix_length: int = 64
    held: ClassVar[dict[str, int]] = {}  # client address (address_key) -> its connections: one server's

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._real = transport
        self._timer: asyncio.TimerHandle | None = None
        self._phase = ""
        self.lingering = self._lost = False
        peer = get_remote_addr(transport)
        self._address = address_key(peer[0], self.ipv6_prefix_length) if peer else ""
        if self.held.get(self._address, 0) >= self.limits.max_connections_per_ip:
            self._refuse("per_address", "this address holds too many connections to the gateway already: "
                                        "close some, or reuse them")
            return
        if len(self.connections) >= self.limits.max_connections:  # uvicorn's own limit answers in plain text
            self._refuse("total", "the gateway holds as many connections as it serves: retry in a moment", retry_after_s=1)
            return
        self._refused = False
        self.held[self._address] = self.held.get(self._address, 0) + 1
        super().connection_made(_LingeringTransport(transport, self))  # type: ignore[arg-type]
        self._arm("head", self.limits.head_timeout_s)

    def _refuse(self, reason: str, message: str, retry_after_s: int | None = None) -> None:
        self._refused = True
        CONNECTIONS_REFUSED.labels(reason).inc()
        self._real.write(closing_answer(HTTPStatus.SERVICE_UNAVAILABLE, "TOO_MANY_CONNECTIONS", message, retry_after_s))
        self._real.close()  # at once: nothing of the client's is read or held

    def data_received(self, data: bytes) -> None:
        if self.lingering or self._refused:
            return  # the answer is out; what still arrives is dropped
        if self._timer is None and self.conn.their_state is h11.IDLE:
            self._arm("head", self.limits.head_timeout_s)  # the first bytes of a next request
        super().data_received(data)
        self._track()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # may start a pipelined request already received
        self._track()

    def _track(self) -> None:
        """The timer for what the client is sending now: its head (armed when it starts), its body."""
        if self.lingering or self._lost:
            return
        state = self.conn.their_state
        if state is h11.SEND_BODY:
            if self._phase != "body":
                self._arm("body", self.limits.body_timeout_s)
        elif state is not h11.IDLE and self._phase in ("head", "body"):
            self._cancel()  # the request is in: the app answers it

    def connection_lost(self, exc: Exception | None) -> None:
        if self._refused:
            return  # never counted, never handed to uvicorn
        self._lost = True
        self._cancel()
        if self.held[self._address] > 1:
            self.held[self._address] -= 1
        else:
            del self.held[self._address]
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        """What h11 cannot parse: the gateway's JSON error (uvicorn's is plain text)."""
        self._real.write(closing_answer(HTTPStatus.BAD_REQUEST, "MALFORMED_REQUEST",
                                        "the request is not HTTP/1.1 the gateway can read"))
        self.transport.close()

    # eof_received (H11Protocol's) returns None: when the client closes its side, lingering or not,
    # asyncio closes the transport.

    def shutdown(self) -> None:
        if self.lingering:
            self._real.close()
        else:
            super().shutdown()

    def _arm(self, phase: str, seconds: float) -> None:
        self._cancel()
        self._phase = phase
        self._timer = self.loop.call_later(seconds, self._expired, phase)

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._phase = None, ""

    def _expired(self, phase: str) -> None:
        self._timer, self._phase = None, ""
        if self._lost or self._real.is_closing():
            return
        if phase == "linger":
            self._real.close()
            return
        CONNECTIONS_CLOSED.labels(f"{phase}_timeout").inc()
        cycle = self.cycle if phase == "body" else None  # a head's cycle is the previous request's
        if cycle is None or not cycle.response_started:
            self._real.write(closing_answer(HTTPStatus.REQUEST_TIMEOUT, "REQUEST_TIMEOUT",
                                            f"the request's {phase} did not arrive in time"))
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True  # the app's receive() answers http.disconnect
            cycle.message_event.set()
        self._real.close()

    def should_linger(self) -> bool:
        return (not self.lingering and not self._lost and self.conn.their_state is h11.SEND_BODY
                and self._real.can_write_eof() and not self._real.is_closing())

    def linger(self) -> None:
        self.lingering = True
        CONNECTIONS_CLOSED.labels("lingering").inc()
        self._real.write_eof()  # the answer is sent, then the sending side is shut
        self._real.resume_reading()
        self._arm("linger", self.limits.linger_s)


def protocol_class(limits: HttpLimitsConfig, ipv6_prefix_length: int) -> type[GuardedH11Protocol]:
    """A server's protocol: its limits, and its own count of each address's connections."""
    return type("KioskH11Protocol", (GuardedH11Protocol,),
                {"limits": limits, "ipv6_prefix_length": ipv6_prefix_length, "held": {}})
