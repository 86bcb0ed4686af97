"""Client channels to BioGate services, with the caller's credentials and request ids attached."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from services.common import context, telemetry

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider


class _Metadata(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds ``authorization`` and ``x-request-id`` (the current RPC's, so a request can be traced
    from the MFA service into the face and voice services)."""

    def __init__(self, token: str | None) -> None:
        self.token = token

    def _details(self, details):
        metadata = list(details.metadata or [])
        if self.token:
            metadata.append(("authorization", f"Bearer {self.token}"))
        if not any(k == "x-request-id" for k, _ in metadata):
            metadata.append(("x-request-id", context.request_id.get() or uuid.uuid4().hex))
        return details._replace(metadata=metadata) if hasattr(details, "_replace") else _Details(details, metadata)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


class _Details(grpc.ClientCallDetails):
    def __init__(self, base, metadata):
        self.method = base.method
        self.timeout = base.timeout
        self.metadata = metadata
        self.credentials = base.credentials
        self.wait_for_ready = getattr(base, "wait_for_ready", None)
        self.compression = getattr(base, "compression", None)


def connect(
    target: str,
    token: str | None = None,
    *,
    ca_file: Path | None = None,
    cert_file: Path | None = None,
    key_file: Path | None = None,
    max_message_bytes: int = 16 * 1024 * 1024,
    tracer_provider: TracerProvider | None = None,
) -> grpc.Channel:
    """A channel to ``target`` ("host:port"); TLS when ``ca_file`` is given, mTLS with a cert too;
    a span per call with a ``tracer_provider`` (services/common/telemetry.py)."""
    options = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]
    if ca_file:
        creds = grpc.ssl_channel_credentials(
            root_certificates=ca_file.read_bytes(),
            private_key=key_file.read_bytes() if key_file else None,
            certificate_chain=cert_file.read_bytes() if cert_file else None,
        )
        channel = grpc.secure_channel(target, creds, options=options)
    else:
        channel = grpc.insecure_channel(target, options=options)
    return telemetry.traced(grpc.intercept_channel(channel, _Metadata(token)), tracer_provider)
