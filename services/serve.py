"""`biogate serve face|voice|mfa|all`: one service per process; `all` supervises the three."""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import subprocess
import sys
import time
from typing import Callable, cast

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.settings import Settings
from services.common.files import private_dir
from services.common.config import ServiceName
from services.common.metrics import serve_metrics
from services.common.server.auth import Authenticator
from services.common.logs import setup_logging
from services.common.server.bootstrap import RunningServer, ServiceDefinition, run_until_signal
from services.common.server.workers import Worker, run_workers

log = logging.getLogger("biogate.serve")
SERVICES: tuple[ServiceName, ...] = ("face", "voice", "mfa")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run a service (or all three) until SIGTERM")
    p.add_argument("service", choices=[*SERVICES, "all"])
    p.set_defaults(func=serve)


def definition(settings: Settings, name: str) -> ServiceDefinition:
    return importlib.import_module(f"services.{name}.server").definition(settings)


def serve(settings: Settings, args: argparse.Namespace) -> int:
    if args.service == "all":
        return supervise(settings, args.config)
    prepare(settings)
    if settings.server.processes(args.service) > 1:
        return run_workers(settings, args.service, serve_worker)
    serve_one(settings, args.service, None)
    return 0


def serve_one(settings: Settings, name: str, worker: Worker | None) -> None:
    endpoint = settings.endpoint(name)  # type: ignore[arg-type]
    # One metrics listener per port: in a group of workers the first serves the whole group's metrics.
    if endpoint.metrics_port and (worker is None or worker.index == 0):
        serve_metrics(endpoint.metrics_host, endpoint.metrics_port,
                      metrics_credentials(settings) if settings.server.metrics_auth else None,
                      multiprocess_dir=worker.metrics_dir if worker is not None else None)
    run_until_signal(RunningServer(settings, definition(settings, name), worker=worker))


def serve_worker(settings: Settings, name: str, worker: Worker) -> None:
    """A worker process's entry point (spawned: it sets up its own logging)."""
    setup_logging(settings.logging.level, settings.logging.json_format, service=name)
    serve_one(settings, name, worker)


def metrics_credentials(settings: Settings) -> Callable[[str], bool]:
    """Accepts an HTTP Authorization header carrying the bearer token of a configured principal."""
    authenticator = Authenticator.from_settings(settings)

    class Caller:  # what the authenticator reads of a gRPC call, from the HTTP request
        def __init__(self, header: str) -> None:
            self.header = header

        def invocation_metadata(self):
            return (("authorization", self.header),)

        def auth_context(self):
            return {}

    # authenticate() reads only the caller's metadata and auth context
    return lambda header: authenticator.authenticate(cast(grpc.ServicerContext, Caller(header))) is not None


def prepare(settings: Settings) -> None:
    """One-time state shared by the services (data dir, credentials, schema, keys), created
    before they start so that three processes starting together don't race for it."""
    from services.common.runtime import Runtime

    private_dir(settings.data_dir)
    Runtime.open(settings, "serve").close()


def health_status(target: str, timeout: float = 1.0) -> str:
    with grpc.insecure_channel(target) as channel:
        try:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout)  # type: ignore[attr-defined]  # stubs lack it
        except grpc.RpcError as exc:
            return exc.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def supervise(settings: Settings, config: str | None) -> int:
    prepare(settings)
    base = [sys.executable, "-m", "services.cli"] + (["--config", config] if config else [])
    children = {name: subprocess.Popen([*base, "serve", name]) for name in SERVICES}
    stopping = False

    def stop(signum, _frame):
        nonlocal stopping
        stopping = True
        for child in children.values():
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    reported: set[str] = set()
    while not stopping:
        for name, child in children.items():
            if child.poll() is not None:
                log.error("service exited; stopping the others", extra={"service": name, "rc": child.returncode})
                stop(signal.SIGTERM, None)
                break
            if name not in reported:
                endpoint = settings.endpoint(name)
                target = f"{endpoint.host}:{endpoint.port}"
                if health_status(target) == "SERVING":
                    reported.add(name)
                    print(f"biogate: {name} SERVING on {target}", flush=True)
        time.sleep(0.5)
    rc = 0
    for child in children.values():
        rc = max(rc, child.wait())
    return rc
