"""Budgets every client stream is read under: an idle timeout between messages, the RPC's deadline
for the whole stream, and a total byte count.

gRPC's synchronous server hands a handler an iterator whose ``next()`` blocks until the client
sends a message, half-closes or cancels; nothing on the server side wakes it, so a client that
opens a stream and sends nothing holds one of the server's worker threads for as long as it likes
(the client's deadline, if it set one, is the only limit). :class:`BoundedStream` moves the
blocking read onto a reader thread of its own and waits for it with a timeout: when the budget
runs out the handler raises :class:`~services.common.errors.ServiceError` (DEADLINE_EXCEEDED), the
interceptor sends the status, the call ends, and the reader's ``next()`` returns. The worker
thread is free again after at most ``idle_timeout_s``, whatever the client does.

Reads are demand-driven (one outstanding read per stream), so gRPC's flow control still applies:
a client cannot push messages the handler has not asked for.
"""

from __future__ import annotations

import dataclasses
import time
from concurrent.futures import Executor, Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import grpc

from services.common import errors

_END = object()


@dataclass(frozen=True)
class StreamLimits:
    idle_timeout_s: float = 10.0  # longest wait for the client's next message
    max_bytes: int = 32 * 1024 * 1024  # serialised size of all the stream's messages together


def _next(requests: Iterator) -> Any:
    return next(requests, _END)


class BoundedStream:
    """An iterator over ``requests`` that refuses a silent, slow or oversized client.

    ``deadline`` is the monotonic time by which the whole RPC must be done (the client's deadline
    capped by ``server.rpc_timeout_s``); ``check`` runs on every message (the tenant check), ``on_end``
    when the client half-closes (admission of the model work).
    """

    def __init__(self, requests: Iterator, limits: StreamLimits, deadline: float | None, reader: Executor,
                 check: Callable[[Any], None] = lambda _: None, on_end: Callable[[], None] = lambda: None) -> None:
        self._requests = iter(requests)
        self._limits = limits
        self._deadline = deadline
        self._reader = reader
        self._check = check
        self._on_end = on_end
        self._pending: Future | None = None
        self._done = False
        self.messages = 0
        self.bytes = 0

    def tighten(self, idle_timeout_s: float) -> None:
        """A handler's own, shorter idle limit for this stream (never a longer one)."""
        self._limits = dataclasses.replace(self._limits, idle_timeout_s=min(idle_timeout_s, self._limits.idle_timeout_s))

    def __iter__(self) -> "BoundedStream":
        return self

    def __next__(self) -> Any:
        if self._done:
            raise StopIteration
        limits = self._limits
        left = None if self._deadline is None else self._deadline - time.monotonic()
        if left is not None and left <= 0:
            raise self._too_slow()
        wait = limits.idle_timeout_s if left is None else min(limits.idle_timeout_s, left)
        if self._pending is None:
            self._pending = self._reader.submit(_next, self._requests)
        try:
            item = self._pending.result(timeout=wait)
        except FutureTimeout:
            if left is not None and left <= limits.idle_timeout_s:
                raise self._too_slow() from None
            raise errors.ServiceError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"no message for {limits.idle_timeout_s:g} s after message {self.messages}: send the stream's "
                "messages without pauses (e.g. an audio chunk every 20-100 ms) and close it when done",
                "STREAM_IDLE") from None
        self._pending = None
        if item is _END:
            self._done = True
            self._on_end()  # the request is whole: the model work (admission) starts here
            raise StopIteration
        self.messages += 1
        self.bytes += item.ByteSize()
        if self.bytes > limits.max_bytes:
            raise errors.ServiceError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the stream carried more than {limits.max_bytes} bytes; send less (shorter audio)",
                "STREAM_TOO_LARGE", metadata={"max_bytes": str(limits.max_bytes)})
        self._check(item)
        return item

    def _too_slow(self) -> errors.ServiceError:
        return errors.ServiceError(
            grpc.StatusCode.DEADLINE_EXCEEDED,
            f"the stream was still open at the RPC's deadline after {self.messages} messages: send it faster, "
            "or fewer messages",
            "STREAM_DEADLINE")
