"""Typed exceptions for failed calls, carrying the server's google.rpc error details.

Every BioGate service answers a refused call with a gRPC status and an ``ErrorInfo`` reason
(``NO_CONSENT``, ``CAPTURE_NOT_BOUND``, ``THROTTLED``...), a ``BadRequest`` naming bad fields and,
when a retry may succeed, a ``RetryInfo`` delay. :func:`from_rpc_error` turns a ``grpc.RpcError``
into the subclass of :class:`BioGateError` for its status code, with those details as attributes.
"""

from __future__ import annotations

from typing import cast

import grpc

from ._api.wire import details_of  # the parser of the details the servers send (services/common/wire.py)


class BioGateError(Exception):
    """A call the service refused (or could not answer).

    ``code``: the gRPC status code; ``message``: the server's message; ``reason``: the ErrorInfo
    reason ("" without one); ``metadata``: the ErrorInfo metadata; ``fields``: field path ->
    description from BadRequest; ``retry_delay_s``: the RetryInfo hint, None without one.
    """

    def __init__(self, code: grpc.StatusCode, message: str, reason: str = "", *, metadata: dict[str, str] | None = None,
                 fields: dict[str, str] | None = None, retry_delay_s: float | None = None) -> None:
        super().__init__(f"{code.name}{' ' + reason if reason else ''}: {message}")
        self.code, self.message, self.reason = code, message, reason
        self.metadata = metadata or {}
        self.fields = fields or {}
        self.retry_delay_s = retry_delay_s


class InvalidArgument(BioGateError):
    """The request is malformed: see ``fields``."""


class Unauthenticated(BioGateError):
    """No valid credentials."""


class PermissionDenied(BioGateError):
    """The credentials' role or tenant does not allow this call."""


class NotFound(BioGateError):
    pass


class AlreadyExists(BioGateError):
    pass


class FailedPrecondition(BioGateError):
    """The request is well formed but the state does not allow it (no consent, capture not bound...)."""


class ResourceExhausted(BioGateError):
    """Throttled, locked out or shedding load: ``retry_delay_s`` says when to retry, if ever."""


class Unavailable(BioGateError):
    """The service (or one it depends on) cannot be reached; a retry may succeed."""


class DeadlineExceeded(BioGateError):
    pass


class Internal(BioGateError):
    pass


_BY_CODE: dict[grpc.StatusCode, type[BioGateError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgument,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.ABORTED: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.INTERNAL: Internal,
}


def from_rpc_error(error: grpc.RpcError) -> BioGateError:
    """The typed exception of a failed call, with its ErrorInfo, BadRequest and RetryInfo details."""
    call = cast(grpc.Call, error)  # a failed call's RpcError is also its Call
    d = details_of(error)
    cls = _BY_CODE.get(call.code(), BioGateError)
    return cls(call.code(), call.details() or "", d["reason"], metadata=d["metadata"], fields=d["fields"],
               retry_delay_s=d["retry_delay_s"])
