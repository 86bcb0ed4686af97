"""Service errors carried to clients as gRPC statuses with google.rpc error details.

Handlers raise :class:`ServiceError` (or a subclass); the server interceptor turns it into the
status, a machine-readable ErrorInfo reason and, for bad fields, a BadRequest with field
violations, so that client developers can act on the error without parsing messages.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from services.common.wire import details_of as details_of  # the client side, shared with the SDK

ERROR_DOMAIN = "biogate.dev"


@dataclass
class ServiceError(Exception):
    code: grpc.StatusCode
    message: str
    reason: str = ""  # UPPER_SNAKE machine-readable reason, e.g. "NO_CONSENT"
    field_violations: list[tuple[str, str]] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    retry_delay_s: float | None = None  # sent as google.rpc.RetryInfo: when a retry may succeed

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def to_status(self) -> grpc.Status:
        details = []
        if self.reason:
            info = error_details_pb2.ErrorInfo(reason=self.reason, domain=ERROR_DOMAIN, metadata=self.metadata)
            details.append(_pack(info))
        if self.field_violations:
            bad = error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=f, description=d)
                    for f, d in self.field_violations
                ]
            )
            details.append(_pack(bad))
        if self.retry_delay_s is not None:
            delay = duration_pb2.Duration()
            delay.FromNanoseconds(int(self.retry_delay_s * 1e9))
            details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
        status = status_pb2.Status(code=self.code.value[0], message=self.message, details=details)
        return rpc_status.to_status(status)


def _pack(msg) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(msg)
    return packed


def invalid_argument(message: str, reason: str = "INVALID_ARGUMENT", **fields: str) -> ServiceError:
    """A bad request; keyword arguments name the offending fields (dots as in the proto path)."""
    violations = [(name.replace("__", "."), desc) for name, desc in fields.items()]
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, message, reason, violations)


def failed_precondition(message: str, reason: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.FAILED_PRECONDITION, message, reason)


def not_found(message: str, reason: str = "NOT_FOUND") -> ServiceError:
    return ServiceError(grpc.StatusCode.NOT_FOUND, message, reason)


def already_exists(message: str, reason: str = "ALREADY_EXISTS") -> ServiceError:
    return ServiceError(grpc.StatusCode.ALREADY_EXISTS, message, reason)


def permission_denied(message: str, reason: str = "PERMISSION_DENIED") -> ServiceError:
    return ServiceError(grpc.StatusCode.PERMISSION_DENIED, message, reason)


def unauthenticated(message: str, reason: str = "UNAUTHENTICATED") -> ServiceError:
    return ServiceError(grpc.StatusCode.UNAUTHENTICATED, message, reason)


def resource_exhausted(message: str, reason: str = "RESOURCE_EXHAUSTED") -> ServiceError:
    return ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, message, reason)


def unavailable(message: str, reason: str = "UNAVAILABLE") -> ServiceError:
    return ServiceError(grpc.StatusCode.UNAVAILABLE, message, reason)


assert code_pb2.INVALID_ARGUMENT == grpc.StatusCode.INVALID_ARGUMENT.value[0]
