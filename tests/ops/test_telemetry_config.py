"""Tracing is off by default: no provider, no interceptor, channels left as they are; a collector
endpoint must be a URL."""

from __future__ import annotations

import subprocess
import sys

import grpc
import pytest

from services.common import telemetry
from tests.conftest import make_settings


def test_tracing_is_off_by_default(tmp_path):
    settings = make_settings(tmp_path)
    assert settings.telemetry.otlp_endpoint is None
    assert telemetry.tracer_provider(settings, "mfa") is None
    assert telemetry.server_interceptors(settings, "face") == []
    plain = grpc.insecure_channel("127.0.0.1:1")
    assert telemetry.traced(plain, None) is plain
    plain.close()


def test_a_collector_endpoint_must_be_a_url(tmp_path):
    with pytest.raises(ValueError, match="telemetry.otlp_endpoint"):
        make_settings(tmp_path, telemetry={"otlp_endpoint": "collector:4318"})


def test_without_tracing_opentelemetry_is_not_even_imported(tmp_path):
    code = ("import sys; from services.common.client import connect; from services.common import telemetry; "
            "from tests.conftest import make_settings; "
            f"s = make_settings({str(tmp_path)!r}); connect('127.0.0.1:1').close(); "
            "assert telemetry.server_interceptors(s, 'mfa') == []; telemetry.record_status(__import__('grpc').StatusCode.OK); "
            "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"
