"""OpenTelemetry traces: a span per RPC on the server and per call the MFA makes to face and voice,
joined into one trace by the W3C ``traceparent`` metadata the client interceptor sends.

Off by default: without ``telemetry.otlp_endpoint`` (and without an exporter handed to
:func:`export_to`) :func:`tracer_provider` is None, no interceptor is installed and OpenTelemetry
is not even imported, so an RPC pays nothing. Spans carry the RPC's name, its status and the peer
address, never a request's content.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import grpc

from services.common.config import CommonSettings, TelemetryConfig

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

# The codes that are the server's fault: its span's status is ERROR (OpenTelemetry's RPC conventions).
_SERVER_FAULTS = frozenset({grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNIMPLEMENTED,
                            grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS})

_lock = threading.Lock()
_providers: dict[tuple[str, str], TracerProvider] = {}
_extra: list[SpanExporter] = []


def export_to(exporter: SpanExporter | None) -> None:
    """Also hand every span of the providers made from now on to ``exporter``, synchronously
    (an embedding process's own exporter, or a test's in-memory one); this turns tracing on without
    an OTLP endpoint. None forgets the exporters handed before."""
    with _lock:
        _providers.clear()
        if exporter is None:
            _extra.clear()
        else:
            _extra.append(exporter)


def tracer_provider(settings: CommonSettings, service: str) -> TracerProvider | None:
    """The process's tracer provider for ``service`` (one per service and configuration, so the
    MFA's server and its clients share one), or None while tracing is off."""
    cfg = settings.telemetry
    if cfg.otlp_endpoint is None and not _extra:
        return None
    with _lock:
        key = (service, cfg.model_dump_json())
        provider = _providers.get(key)
        if provider is None:
            provider = _providers[key] = _make_provider(cfg, service)
        return provider


def close(settings: CommonSettings, service: str) -> None:
    """Exports the service's pending spans and stops its provider (the service has stopped)."""
    with _lock:
        provider = _providers.pop((service, settings.telemetry.model_dump_json()), None)
    if provider is not None:
        provider.shutdown()


def _make_provider(cfg: TelemetryConfig, service: str) -> TracerProvider:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    provider = TracerProvider(resource=Resource.create({"service.name": f"biogate-{service}"}),
                              sampler=ParentBased(TraceIdRatioBased(cfg.sample_ratio)))
    if cfg.otlp_endpoint is not None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=cfg.otlp_endpoint, timeout=cfg.timeout_s,
                                    certificate_file=str(cfg.ca_file) if cfg.ca_file else None)
        provider.add_span_processor(BatchSpanProcessor(exporter))
    for extra in _extra:
        provider.add_span_processor(SimpleSpanProcessor(extra))
    return provider


def server_interceptors(settings: CommonSettings, service: str) -> list[grpc.ServerInterceptor]:
    """The tracing interceptor (health probes untraced), to run before all others; none when off."""
    provider = tracer_provider(settings, service)
    if provider is None:
        return []
    from opentelemetry.instrumentation.grpc import filters, server_interceptor

    return [server_interceptor(tracer_provider=provider, filter_=filters.negate(filters.health_check()))]


def traced(channel: grpc.Channel, provider: TracerProvider | None) -> grpc.Channel:
    """``channel`` with a client span per call, its context sent along; unchanged when off."""
    if provider is None:
        return channel
    from opentelemetry.instrumentation.grpc import client_interceptor, grpcext

    return grpcext.intercept_channel(channel, client_interceptor(tracer_provider=provider))


def record_status(code: grpc.StatusCode) -> None:
    """Puts the RPC's final status on its server span: the instrumentation sees ``abort`` and
    ``set_code`` but not ``abort_with_status``, which carries the services' refusals."""
    if not _providers:
        return
    from opentelemetry import trace

    span = trace.get_current_span()
    if not span.is_recording():
        return
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code in _SERVER_FAULTS:
        span.set_status(trace.Status(trace.StatusCode.ERROR, code.name))
