"""The explicit end of a streamed answer (the ``end`` trailer of StreamVoiceFactor and StreamVerify).

grpc's Python server can see a client's cancellation as a normal end of the request stream (a
pending read that completes empty marks the client closed before the cancel is seen), so the end
of the iterator cannot tell a finished answer from a caller who hung up. Only the trailer, sent
once the sender has sent everything and carrying the number of audio bytes sent, ends an answer
that may be decided on."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc

from services.common import errors


def hung_up(received: int) -> errors.ServiceError:
    """A stream that ended without its trailer: the sender went away mid-answer. CANCELLED, as the
    API answers every call its client gave up (ABORTED is its concurrency conflict, to retry)."""
    return errors.ServiceError(
        grpc.StatusCode.CANCELLED,
        f"the stream ended after {received} audio bytes without its end message: taken for a hang-up, nothing "
        "decided (send the end message with the audio's byte count, then close the stream)", "STREAM_NOT_ENDED")


def check_end(end: Any, received: int, rest: Iterator[Any]) -> None:
    """The trailer ``end`` of a stream that carried ``received`` audio bytes: its count must match,
    and ``rest`` (the stream after it) must end with no further message."""
    if end.audio_bytes != received:
        raise errors.invalid_argument(
            f"the end message counts {end.audio_bytes} audio bytes, {received} arrived: nothing decided",
            "END_MISMATCH", end__audio_bytes=f"{received}, the bytes of the chunks sent")
    if next(rest, None) is not None:
        raise errors.invalid_argument("a message followed the end message: the end message is the stream's last",
                                      "DATA_AFTER_END", end="last message")
