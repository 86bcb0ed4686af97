"""Client channels to BioGate services, with the caller's credentials and request ids attached:
the shared channel of services/common/wire.py, with the current RPC's request id (so a request can
be traced from the MFA service into the face and voice services) and, when on, a span per call."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from services.common import context, telemetry, wire

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider


def connect(
    target: str,
    token: str | None = None,
    *,
    ca_file: Path | None = None,
    cert_file: Path | None = None,
    key_file: Path | None = None,
    max_message_bytes: int = 16 * 1024 * 1024,
    tracer_provider: TracerProvider | None = None,
    own_connection: bool = False,
) -> grpc.Channel:
    """A channel to ``target`` ("host:port"); TLS when ``ca_file`` is given, mTLS with a cert too;
    a span per call with a ``tracer_provider`` (services/common/telemetry.py); ``own_connection``:
    see services/common/wire.py."""
    channel = wire.connect(target, token, ca_file=ca_file, cert_file=cert_file, key_file=key_file,
                           max_message_bytes=max_message_bytes, request_id=context.request_id.get,
                           own_connection=own_connection)
    return telemetry.traced(channel, tracer_provider)
