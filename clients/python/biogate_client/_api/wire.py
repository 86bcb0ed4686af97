# Copied by services/common/api/generate.py from services/common/wire.py. Do not edit.
"""The client's half of the wire, shared by the services and the client SDK: a channel with the
caller's credentials and a request id attached (:func:`connect`), and the parser of the google.rpc
error details the services send with a refusal (:func:`details_of`).

This file is the one source: ``python -m services.common.api.generate`` copies it, with the stubs,
into clients/python/biogate_client/_api/wire.py, so that the SDK installs without the server
package and neither side imports the other. It therefore imports only grpc, grpcio-status and
googleapis-common-protos (the SDK's dependencies), never ``services`` or ``biogate_client``.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path
from typing import cast

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


class _Metadata(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds ``authorization`` and ``x-request-id`` (``request_id()``'s when it gives one, so a
    request can be traced from the MFA service into the face and voice services; a new one
    otherwise)."""

    def __init__(self, token: str | None, request_id: Callable[[], str | None] | None = None) -> None:
        self.token = token
        self.request_id = request_id

    def _details(self, details):
        metadata = list(details.metadata or [])
        if self.token:
            metadata.append(("authorization", f"Bearer {self.token}"))
        if not any(k == "x-request-id" for k, _ in metadata):
            current = self.request_id() if self.request_id else None
            metadata.append(("x-request-id", current or uuid.uuid4().hex))
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
    request_id: Callable[[], str | None] | None = None,
    own_connection: bool = False,
) -> grpc.Channel:
    """A channel to ``target`` ("host:port"); TLS when ``ca_file`` is given, mTLS with a cert too.
    ``request_id``: where the ``x-request-id`` of a call comes from (a new one per call without).
    ``own_connection``: a connection of this channel's own; without, grpc shares one between the
    channels of a process with equal target and options (its global subchannel pool), and a
    service running several worker processes on one port (SO_REUSEPORT) sees one connection, so
    one worker, however many channels are opened."""
    options = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]
    if own_connection:
        options.append(("grpc.use_local_subchannel_pool", 1))
    if ca_file:
        creds = grpc.ssl_channel_credentials(
            root_certificates=ca_file.read_bytes(),
            private_key=key_file.read_bytes() if key_file else None,
            certificate_chain=cert_file.read_bytes() if cert_file else None,
        )
        channel = grpc.secure_channel(target, creds, options=options)
    else:
        channel = grpc.insecure_channel(target, options=options)
    return grpc.intercept_channel(channel, _Metadata(token, request_id))


def details_of(error: grpc.RpcError) -> dict:
    """The ErrorInfo reason and metadata, the field violations and the retry hint
    (``retry_delay_s``, None without one) of a failed call."""
    status = rpc_status.from_call(cast(grpc.Call, error))  # a failed call's RpcError is also its Call
    out: dict = {"reason": "", "fields": {}, "metadata": {}, "retry_delay_s": None}
    if status is None:
        return out
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            out["reason"] = info.reason
            out["metadata"] = dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            out["fields"] = {v.field: v.description for v in bad.field_violations}
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            out["retry_delay_s"] = retry.retry_delay.ToNanoseconds() / 1e9
    return out
