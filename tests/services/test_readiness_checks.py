"""The readiness of a bare server with two checks (the PKCS#11 token's and the audit key's are two
such): NOT_SERVING while either finds a problem, SERVING only once neither does. One check turning
fine again must not turn the readiness SERVING while the other still fails."""

from __future__ import annotations

import threading
from typing import Any

from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.api.v1 import mfa_pb2, mfa_pb2_grpc
from services.common.client import connect
from services.common.server.bootstrap import ReadinessCheck, RunningServer, ServiceDefinition
from tests.conftest import make_settings

S = health_pb2.HealthCheckResponse
NAME = mfa_pb2.DESCRIPTOR.services_by_name["MfaService"].full_name


class Condition:
    """A check's outcome, set by the test; ``ran_twice()`` waits until the check has run twice since
    the last change, so that the server has acted on the outcome of the first of those runs."""

    problem: str | None

    def __init__(self, what: str) -> None:
        self.what, self.problem, self._runs = what, None, 0
        self._cv = threading.Condition()

    def __call__(self) -> str | None:
        with self._cv:
            self._runs += 1
            self._cv.notify_all()
            return self.problem

    def set(self, problem: str | None) -> None:
        with self._cv:
            self.problem, self._runs = problem, 0

    def ran_twice(self) -> None:
        with self._cv:
            assert self._cv.wait_for(lambda: self._runs >= 2, timeout=30)

    def check(self) -> ReadinessCheck:
        return ReadinessCheck(self.what, 0.01, self)


def test_readiness_is_serving_only_while_no_check_finds_a_problem(tmp_path):
    token_check, key_check = Condition("token"), Condition("audit key")
    settings = make_settings(tmp_path)
    definition = ServiceDefinition("mfa", [mfa_pb2.DESCRIPTOR.services_by_name["MfaService"]],
                                   lambda s: mfa_pb2_grpc.add_MfaServiceServicer_to_server(
                                       mfa_pb2_grpc.MfaServiceServicer(), s),
                                   tenant_lookups={"session": lambda _: None, "review": lambda _: None},
                                   readiness=[token_check.check(), key_check.check()])
    server = RunningServer(settings, definition, port=0).start()
    try:
        assert server.ready.wait(30)
        with connect(server.address, None) as channel:
            health: Any = health_pb2_grpc.HealthStub(channel)  # its stubs declare none of its methods
            watch = health.Watch(health_pb2.HealthCheckRequest(service=NAME), timeout=60)
            assert next(watch).status == S.SERVING
            token_check.set("the token is away")
            assert next(watch).status == S.NOT_SERVING
            key_check.set("the audit key was destroyed")
            token_check.set(None)  # the token is back, the key still destroyed
            token_check.ran_twice()
            key_check.ran_twice()
            assert health.Check(health_pb2.HealthCheckRequest(service=NAME)).status == S.NOT_SERVING
            key_check.set(None)
            assert next(watch).status == S.SERVING
            assert health.Check(health_pb2.HealthCheckRequest(service="")).status == S.SERVING  # liveness throughout
            watch.cancel()
    finally:
        server.stop(0)
