"""The gRPC server every BioGate service runs on.

Health (grpc.health.v1) reports NOT_SERVING until the service's warm-up (model loading and a first
inference) has succeeded, then SERVING; on SIGTERM it turns NOT_SERVING again and the server drains
in-flight RPCs for ``server.drain_seconds`` before it stops. After the warm-up, the health of the
service's own names (readiness) is NOT_SERVING while one of its :class:`ReadinessCheck` finds a
problem: with the keys in a PKCS#11 token, while the token cannot be reconnected; and once the audit
key this process signs with was destroyed (``biogate audit destroy-key``), until it is restarted.
The overall health (liveness) stays SERVING: a restart would not bring the HSM back, and a
replica to restart is the operator's call (the alert says which). Server reflection, message-size limits,
a bound on concurrent RPCs, TLS/mTLS and the interceptor (authentication, authorisation, metrics,
logs) come from the one configuration.
"""

from __future__ import annotations

import gc
import logging
import signal
import threading
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any, Callable

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common import telemetry
from services.common.config import CommonSettings
from services.common.server.auth import Authenticator, refuse_dev_credentials_off_loopback
from services.common.server.memory import IdleTrimmer
from services.common.server.admission import AdmissionQueue
from services.common.server.interceptor import (ServerInterceptor, TenantLookup, model_work_methods, roles_by_method,
                                                tenants_by_method, terminal_methods)
from services.common.server.streams import StreamLimits
from services.common.server.workers import Worker

log = logging.getLogger("biogate.server")

WARM_UP_RETRY_S = 30.0


@dataclass(frozen=True)
class ReadinessCheck:
    """A condition of the readiness, checked every ``every_s`` once the service serves, also when
    no calls come in: ``check()`` -> why the service cannot serve now, or None."""

    what: str  # names the condition in the logs
    every_s: float
    check: Callable[[], str | None]


@dataclass
class ServiceDefinition:
    """What a service hands to the bootstrap."""

    name: str  # "face", "voice" or "mfa": selects the endpoint in the configuration
    descriptors: list[ServiceDescriptor]
    register: Callable[[grpc.Server], None]  # adds the servicers to the server
    warm_up: Callable[[], None] = lambda: None  # raises while the service cannot serve yet
    start: Callable[[], None] = lambda: None  # the service's own listeners besides gRPC (raises: no start)
    close: Callable[[], None] = lambda: None
    # the objects the RPCs' `tenant` options name by id ("session", "review") -> their tenant
    tenant_lookups: dict[str, TenantLookup] = field(default_factory=dict)
    details: dict[str, str] = field(default_factory=dict)  # filled by warm_up: models, providers
    readiness: list[ReadinessCheck] = field(default_factory=list)  # besides the PKCS#11 token's
    service: Any = None  # the modality service or the MFA orchestrator: tests and benchmarks reach it here


class RunningServer:
    def __init__(self, settings: CommonSettings, definition: ServiceDefinition, port: int | None = None,
                 worker: Worker | None = None) -> None:
        self.settings = settings
        self.definition = definition
        self.worker = worker  # one of several processes on the port (`biogate serve`), or None: alone
        refuse_dev_credentials_off_loopback(settings, settings.endpoint(definition.name).host,  # type: ignore[arg-type]
                                            f"the {definition.name} service")
        cfg = settings.server
        self.interceptor = ServerInterceptor(
            definition.name,
            Authenticator.from_settings(settings),
            roles_by_method(definition.descriptors),
            cfg.rpc_timeout_s,
            tenants_by_method(definition.descriptors),
            definition.tenant_lookups,
            StreamLimits(cfg.stream_idle_timeout_s, cfg.stream_max_bytes),
            cfg.max_concurrent_rpcs,
            model_work_methods(definition.descriptors),
            AdmissionQueue(definition.name, cfg.admission.slots_per_process(worker.count if worker else 1),
                           cfg.admission.max_queue,
                           alpha=cfg.admission.ewma_alpha) if cfg.admission.enabled else None,
            worker=worker.label if worker is not None else None,
            terminal=terminal_methods(definition.descriptors),
        )
        queue = self.interceptor.admission
        self.trimmer = IdleTrimmer(queue, cfg.admission.trim_memory_idle_s) if queue is not None else None
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=cfg.rpc_threads, thread_name_prefix=f"{definition.name}-rpc"),
            interceptors=[*telemetry.server_interceptors(settings, definition.name), self.interceptor],
            options=[
                ("grpc.max_receive_message_length", cfg.max_message_bytes),
                ("grpc.max_send_message_length", cfg.max_message_bytes),
                # A second server on the same port must fail, not share it; a worker's siblings share it.
                ("grpc.so_reuseport", 1 if worker is not None else 0),
            ],
            maximum_concurrent_rpcs=cfg.max_concurrent_rpcs,
        )
        definition.register(self.server)
        self.health = health.HealthServicer(experimental_non_blocking=True)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = [d.full_name for d in definition.descriptors]
        reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server)
        self._set_status(health_pb2.HealthCheckResponse.NOT_SERVING)

        endpoint = settings.endpoint(definition.name)  # type: ignore[arg-type]
        address = f"{endpoint.host}:{endpoint.port if port is None else port}"
        if cfg.tls.cert_file and cfg.tls.key_file:
            client_ca = cfg.tls.client_ca_file.read_bytes() if cfg.tls.client_ca_file else None
            creds = grpc.ssl_server_credentials(
                [(cfg.tls.key_file.read_bytes(), cfg.tls.cert_file.read_bytes())],
                root_certificates=client_ca,
                require_client_auth=client_ca is not None,
            )
            self.port = self.server.add_secure_port(address, creds)
        else:
            self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"cannot listen on {address} for the {definition.name} service (port in use?)")
        self.address = f"{endpoint.host}:{self.port}"
        # The kubelet's gRPC probes speak plaintext without credentials: health alone, on a port of its own.
        self.health_server: grpc.Server | None = None
        self.health_address: str | None = None
        if endpoint.health_port is not None:
            self.health_server = grpc.server(futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="health"),
                                             options=[("grpc.so_reuseport", 1 if worker is not None else 0)])
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_server)
            bound = self.health_server.add_insecure_port(f"{endpoint.host}:{endpoint.health_port}")
            if bound == 0:
                raise OSError(f"cannot listen on {endpoint.host}:{endpoint.health_port} for {definition.name} health")
            self.health_address = f"{endpoint.host}:{bound}"
        self._stopping = threading.Event()
        self.ready = threading.Event()
        self._readiness_lock = threading.Lock()
        self._not_ready: dict[str, str] = {}  # ReadinessCheck.what -> the problem it found

    def _set_status(self, status: int, overall: bool = True) -> None:
        if overall:
            self.health.set("", status)
        for d in self.definition.descriptors:
            self.health.set(d.full_name, status)

    def start(self) -> "RunningServer":
        try:
            self.definition.start()
        except Exception:
            self.definition.close()
            raise
        self.server.start()
        if self.trimmer is not None:
            self.trimmer.start()
        if self.health_server is not None:
            self.health_server.start()
        log.info("listening", extra={"service": self.definition.name, "address": self.address})
        threading.Thread(target=self._warm_up, name=f"{self.definition.name}-warmup", daemon=True).start()
        return self

    def _warm_up(self) -> None:
        while not self._stopping.is_set():
            try:
                self.definition.warm_up()
            except Exception as exc:  # the service stays NOT_SERVING and says why
                log.error(
                    "warm-up failed; staying NOT_SERVING",
                    extra={"service": self.definition.name, "error": str(exc), "retry_s": WARM_UP_RETRY_S},
                )
                self._stopping.wait(WARM_UP_RETRY_S)
                continue
            if self.worker is not None and not self.worker.wait_for_all(self._stopping):
                return
            if self.settings.server.gc_freeze_after_warm_up:
                freeze_heap()
            if not self._stopping.is_set():
                self._set_status(health_pb2.HealthCheckResponse.SERVING)
                self.ready.set()
                log.info("serving", extra={"service": self.definition.name, **self.definition.details})
                for check in self._readiness_checks():
                    threading.Thread(target=self._watch, args=(check,), name=f"{self.definition.name}-readiness",
                                     daemon=True).start()
            return

    def _readiness_checks(self) -> list[ReadinessCheck]:
        checks = list(self.definition.readiness)
        if self.settings.keys.backend == "pkcs11":
            from services.common.crypto.hsm import open_token

            cfg = self.settings.keys.pkcs11
            # A lost session is reconnected by the check itself.
            checks.append(ReadinessCheck("the PKCS#11 token", cfg.health_check_s, open_token(cfg).check))
        return checks

    def _watch(self, check: ReadinessCheck) -> None:
        while not self._stopping.wait(check.every_s):
            try:
                problem = check.check()
            except Exception as exc:  # noqa: BLE001 - the check could not tell: the readiness stays as it was
                log.warning("readiness check failed", extra={"service": self.definition.name, "check": check.what,
                                                             "error": f"{type(exc).__name__}: {exc}"})
                continue
            if not self._stopping.is_set():
                self._set_readiness(check.what, problem)

    def _set_readiness(self, what: str, problem: str | None) -> None:
        """The readiness is SERVING while no check finds a problem."""
        with self._readiness_lock:
            if bool(problem) == (what in self._not_ready):
                return
            was_ready = not self._not_ready
            if problem:
                self._not_ready[what] = problem
            else:
                del self._not_ready[what]
            still = sorted(self._not_ready)
            if was_ready != (not still):  # a watcher is sent every status set, changed or not
                S = health_pb2.HealthCheckResponse
                self._set_status(S.NOT_SERVING if still else S.SERVING, overall=False)
        if problem:
            log.error("NOT_SERVING", extra={"service": self.definition.name, "check": what, "error": problem})
        else:
            log.warning("resolved" if still else "SERVING again",
                        extra={"service": self.definition.name, "check": what, "not_serving_for": still})

    def stop(self, grace: float | None = None) -> None:
        """Turns health NOT_SERVING, lets in-flight RPCs finish, then stops."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        self.health.enter_graceful_shutdown()
        grace = self.settings.server.drain_seconds if grace is None else grace
        log.info("draining", extra={"service": self.definition.name, "grace_s": grace})
        self.server.stop(grace).wait()
        if self.health_server is not None:
            self.health_server.stop(0).wait()
        self.interceptor.close()
        if self.settings.server.gc_freeze_after_warm_up:
            gc.unfreeze()  # the process may go on (tests, a server restarted in-process): its garbage is collectable again
        if self.trimmer is not None:
            self.trimmer.close()
        self.definition.close()
        telemetry.close(self.settings, self.definition.name)
        log.info("stopped", extra={"service": self.definition.name})

    def wait(self) -> None:
        self.server.wait_for_termination()


def freeze_heap() -> None:
    """Collects once, then moves every object alive now into the GC's permanent generation, which
    later collections skip; the garbage of requests is still collected."""
    gc.collect()
    gc.freeze()


def run_until_signal(running: RunningServer) -> None:
    """Blocks until SIGTERM or SIGINT, then drains and stops."""
    done = threading.Event()

    def on_signal(signum, _frame):
        log.info("signal received", extra={"signal": signal.Signals(signum).name})
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    running.start()
    done.wait()
    running.stop()
