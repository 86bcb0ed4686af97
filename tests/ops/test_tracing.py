"""OpenTelemetry traces across the services: real face, voice and MFA servers on loopback (the
RPCs used need no models, so none are loaded), an MFA call that reaches face and voice, and the
spans of all three in one trace; exported over OTLP/HTTP to a collector on loopback as configured."""

from __future__ import annotations

import gzip
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from services.common import telemetry
from services.common.api.v1 import common_pb2, face_pb2, face_pb2_grpc, mfa_pb2_grpc
from services.common.client import connect
from services.common.server.bootstrap import RunningServer
from services.serve import definition, prepare
from tests.conftest import make_settings


class Collector(BaseHTTPRequestHandler):
    """An OTLP/HTTP trace collector: keeps each export request's resource spans."""

    received: list[ExportTraceServiceRequest] = []

    def do_POST(self):  # noqa: N802 - the http.server's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        Collector.received.append(request)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, format, *args):  # noqa: A002
        pass


@pytest.fixture(scope="module")
def collector():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/v1/traces"
    server.shutdown()


def started(settings, name: str) -> RunningServer:
    """The service's real server, without the warm-up that would load its models."""
    running = RunningServer(settings, definition(settings, name), port=0)
    running.server.start()
    return running


@pytest.fixture(scope="module")
def traced(tmp_path_factory, collector):
    exporter = InMemorySpanExporter()
    telemetry.export_to(exporter)
    data = tmp_path_factory.mktemp("tracing")
    otlp = {"telemetry": {"otlp_endpoint": collector}}
    base = make_settings(data, **otlp)
    prepare(base)
    running = {name: started(base, name) for name in ("face", "voice")}
    mfa_settings = make_settings(data, clients={n: {"target": running[n].address} for n in ("face", "voice")}, **otlp)
    running["mfa"] = started(mfa_settings, "mfa")
    token = json.loads(base.dev_credentials_file.read_text())["dev-all"]
    try:
        yield exporter, running, token, mfa_settings
    finally:
        for server in running.values():
            server.stop(grace=0)
        telemetry.export_to(None)


def test_an_mfa_call_and_the_face_and_voice_calls_it_makes_share_one_trace(traced):
    exporter, running, token, _ = traced
    exporter.clear()
    ref = common_pb2.SubjectRef(tenant_id="ops-bank", subject_id="cust-trace-1")
    with connect(running["mfa"].address, token) as channel:
        mfa_pb2_grpc.MfaServiceStub(channel).DeleteSubject(common_pb2.DeleteSubjectRequest(subject=ref, reason="gdpr"))
    spans = exporter.get_finished_spans()
    by = {(s.resource.attributes["service.name"], s.name, s.kind): s for s in spans}
    root = by[("biogate-mfa", "/biogate.v1.MfaService/DeleteSubject", SpanKind.SERVER)]
    face = by[("biogate-face", "/biogate.v1.FaceService/DeleteSubject", SpanKind.SERVER)]
    voice = by[("biogate-voice", "/biogate.v1.VoiceService/DeleteSubject", SpanKind.SERVER)]
    call = by[("biogate-mfa", "/biogate.v1.FaceService/DeleteSubject", SpanKind.CLIENT)]
    assert root.parent is None  # the caller sent no trace context: the MFA starts the trace
    assert {face.context.trace_id, voice.context.trace_id, call.context.trace_id} == {root.context.trace_id}
    assert call.parent.span_id == root.context.span_id and face.parent.span_id == call.context.span_id
    assert face.attributes["rpc.grpc.status_code"] == grpc.StatusCode.OK.value[0]
    # what a span holds: the RPC and its status, never the request (ids, personal data)
    assert all("cust-trace-1" not in str(dict(s.attributes)) for s in spans)


def test_a_refused_call_carries_its_status_on_the_server_span(traced):
    exporter, running, token, _ = traced
    exporter.clear()
    with connect(running["face"].address, token) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            face_pb2_grpc.FaceServiceStub(channel).Verify(face_pb2.VerifyFaceRequest())
    server = [s for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER]
    assert [s.attributes["rpc.grpc.status_code"] for s in server] == [refused.value.code().value[0]]


def test_spans_are_exported_over_otlp_http_to_the_configured_collector(traced):
    _, running, token, mfa_settings = traced
    ref = common_pb2.SubjectRef(tenant_id="ops-bank", subject_id="cust-trace-2")
    with connect(running["mfa"].address, token) as channel:
        mfa_pb2_grpc.MfaServiceStub(channel).DeleteSubject(common_pb2.DeleteSubjectRequest(subject=ref, reason="gdpr"))
    for name in ("mfa", "face"):
        provider = telemetry.tracer_provider(mfa_settings, name)
        assert provider is not None and provider.force_flush(10_000)
    exported: dict[str, set[bytes]] = {}
    for request in Collector.received:
        for rs in request.resource_spans:
            service = next(a.value.string_value for a in rs.resource.attributes if a.key == "service.name")
            for scope in rs.scope_spans:
                exported.setdefault(service, set()).update(
                    s.trace_id for s in scope.spans if s.name.endswith("/DeleteSubject"))
    assert exported["biogate-mfa"] & exported["biogate-face"], "one trace reaches the collector from both services"
