"""gRPC clients of the face and voice services: deadlines, bounded retries of idempotent calls
and a circuit breaker, so that a slow or dead biometric service costs a bounded time and then
switches the session to the policy's degraded mode instead of piling up calls."""

from __future__ import annotations

import contextlib
import contextvars
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import grpc

from services.common import errors, telemetry
from services.common.api.v1 import face_pb2, face_pb2_grpc, voice_pb2, voice_pb2_grpc
from services.common.client import connect
from services.mfa.config import ClientTarget, MfaSettings
from services.common.errors import details_of
from services.mfa import metrics

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

log = logging.getLogger("biogate.mfa.clients")

# Seconds spent waiting on biometric services in the current RPC (for metrics and the bench).
biometric_seconds: contextvars.ContextVar[float] = contextvars.ContextVar("biometric_seconds", default=0.0)

# The caller's request was at fault: passed back to the caller, and proof the service is up.
CALLER_FAULT = frozenset({
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.NOT_FOUND, grpc.StatusCode.OUT_OF_RANGE,
})
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE})
# The service is up and shedding load (its admission control): passed back with its retry hint, and
# never counted against the breaker, which would put every new session in degraded mode for a burst.
SHEDDING = grpc.StatusCode.RESOURCE_EXHAUSTED
# The service refused the MFA's own credentials: this deployment's configuration is wrong. Never an
# outage (no breaker, no degraded mode): the call fails loudly and the operator is told what to set.
CREDENTIALS_REFUSED = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})


class ClientConfigError(Exception):
    """A biometric service refuses the MFA's credentials; the message names the settings."""


class ServiceUnavailable(Exception):
    """The biometric service could not answer (down, overloaded, circuit open, misconfigured)."""

    def __init__(self, service: str, why: str) -> None:
        super().__init__(f"{service} service unavailable: {why}")
        self.service = service
        self.why = why


class CircuitBreaker:
    """Closed -> open after ``failures`` consecutive failures; after ``reset_s`` one trial call
    is let through (half-open): its success closes the circuit, its failure opens it again. With a
    ``service`` name its state and changes are exported (services/mfa/metrics.py)."""

    def __init__(self, failures: int, reset_s: float, clock: Callable[[], float] = time.monotonic,
                 service: str | None = None) -> None:
        self.threshold, self.reset_s, self.clock = failures, reset_s, clock
        self.service = service
        self._lock = threading.Lock()
        self._failures = 0
        self._opened_at: float | None = None
        self._trial = False
        if service is not None:
            metrics.watch_breaker(service, self)

    def _entered(self, state: str) -> None:
        if self.service is not None:
            metrics.BREAKER_TRANSITIONS.labels(self.service, state).inc()

    @property
    def state(self) -> str:
        with self._lock:
            if self._opened_at is None:
                return "closed"
            return "half_open" if self.clock() - self._opened_at >= self.reset_s else "open"

    def allow(self) -> bool:
        with self._lock:
            if self._opened_at is None:
                return True
            if self.clock() - self._opened_at < self.reset_s or self._trial:
                return False
            self._trial = True
            self._entered("half_open")
            return True

    def success(self) -> None:
        with self._lock:
            if self._opened_at is not None:
                self._entered("closed")
            self._failures, self._opened_at, self._trial = 0, None, False

    def failure(self) -> None:
        with self._lock:
            self._failures += 1
            if self._trial or self._failures >= self.threshold:
                if self._opened_at is None or self._trial:
                    log.warning("circuit opened", extra={"failures": self._failures})
                    self._entered("open")
                self._opened_at, self._trial = self.clock(), False


class BiometricClient:
    def __init__(self, service: str, target: str, token: str | None, cfg: ClientTarget,
                 stub_class: Callable[[grpc.Channel], Any], max_message_bytes: int,
                 tracer_provider: TracerProvider | None = None) -> None:
        self.service, self.target, self.cfg = service, target, cfg
        self.breaker = CircuitBreaker(cfg.breaker_failures, cfg.breaker_reset_s, service=service)
        self.connections = Connections([
            connect(target, token, ca_file=cfg.ca_file, cert_file=cfg.cert_file, key_file=cfg.key_file,
                    max_message_bytes=max_message_bytes, tracer_provider=tracer_provider, own_connection=True)
            for _ in range(cfg.connection_count)], stub_class)

    @property
    def available(self) -> bool:
        """False while the circuit is open: new sessions plan for degraded mode at once."""
        return self.breaker.state != "open"

    def call(self, method: str, request: Any, idempotent: bool, budget_s: float | None = None) -> Any:
        """Call ``method``; raises ServiceUnavailable, or ServiceError for the caller's own fault."""
        deadline = time.monotonic() + (self.cfg.deadline_s if budget_s is None else min(self.cfg.deadline_s, budget_s))
        attempts = 1 + (self.cfg.retries if idempotent else 0)
        started = time.perf_counter()
        try:
            for attempt in range(attempts):
                if not self.breaker.allow():
                    raise ServiceUnavailable(self.service, "circuit open")
                left = deadline - time.monotonic()
                if left <= 0.05:
                    raise ServiceUnavailable(self.service, "no time left within the deadline")
                try:
                    with self.connections.take() as stub:
                        try:
                            reply, call = getattr(stub, method).with_call(request, timeout=left)
                        except grpc.RpcError as err:
                            self.connections.answered(stub, err)
                            raise
                        self.connections.answered(stub, call)
                except grpc.RpcError as err:
                    code = err.code()
                    self._raise_refusal(err)
                    self.breaker.failure()
                    log.warning("biometric call failed", extra={"service": self.service, "rpc": method,
                                                                "code": code.name, "attempt": attempt + 1})
                    if code in RETRYABLE and attempt + 1 < attempts:
                        time.sleep(min(0.1 * 2 ** attempt * (1 + random.random()), max(0.0, deadline - time.monotonic())))
                        continue
                    raise ServiceUnavailable(self.service, code.name) from None
                self.breaker.success()
                return reply
            raise ServiceUnavailable(self.service, "retries exhausted")
        finally:
            biometric_seconds.set(biometric_seconds.get() + time.perf_counter() - started)

    def stream(self, method: str, first: Any, rest: Iterator[Any], budget_s: float | None = None) -> Any:
        """A client-streaming ``method``: ``first``, then ``rest`` sent as it is produced, once (a
        stream is not retried). An exception from ``rest`` (the MFA's own caller's stream failed its
        limits) cancels the call and is raised as it is: the service did not fail. The stream lasts
        as long as the caller speaks: its deadline is the MFA call's own budget, not ``deadline_s``."""
        deadline = self.cfg.deadline_s if budget_s is None else budget_s
        source = _Source(first, rest)
        started = time.perf_counter()
        try:
            if not self.breaker.allow():
                raise ServiceUnavailable(self.service, "circuit open")
            if deadline <= 0.05:
                raise ServiceUnavailable(self.service, "no time left within the deadline")
            try:
                with self.connections.take() as stub:
                    call = None
                    try:
                        call = getattr(stub, method).future(iter(source), timeout=deadline)
                    finally:
                        source.started(call)
                    reply = call.result()
                    self.connections.answered(stub, call)
            except grpc.FutureCancelledError:  # only _Source cancels the call, once it kept its error
                raise source.error or ServiceUnavailable(self.service, "stream cancelled") from None
            except grpc.RpcError as err:
                if source.error is not None:
                    raise source.error from None
                self._raise_refusal(err)
                self.breaker.failure()
                log.warning("biometric call failed", extra={"service": self.service, "rpc": method,
                                                            "code": err.code().name, "attempt": 1})
                raise ServiceUnavailable(self.service, err.code().name) from None
            if source.error is not None:  # the service answered before the stream failed: still refused
                raise source.error
            self.breaker.success()
            return reply
        finally:
            biometric_seconds.set(biometric_seconds.get() + time.perf_counter() - started)

    def _raise_refusal(self, err: grpc.RpcError) -> None:
        """Raises ServiceError where the service refused the call (the caller's fault, or the
        MFA's credentials): it answered, so the circuit stays closed. Returns for a failure."""
        code = err.code()
        if code in CREDENTIALS_REFUSED:
            self.breaker.success()  # it answered: up, and not to be degraded around
            raise self._credentials_refused(code, err.details()) from None
        if code in CALLER_FAULT or code == SHEDDING:
            self.breaker.success()
            info = details_of(err)
            raise errors.ServiceError(code, f"{self.service}: {err.details()}",
                                      info["reason"] or code.name, list(info["fields"].items()),
                                      retry_delay_s=info["retry_delay_s"]) from None

    def settings_named(self) -> str:
        prefix = f"clients.{self.service}"
        if self.cfg.cert_file:
            return f"{prefix}.cert_file/{prefix}.key_file"
        return f"{prefix}.token"

    def _credentials_refused(self, code: grpc.StatusCode, details: str | None) -> errors.ServiceError:
        metrics.CONFIG_ERRORS.labels(self.service, code.name).inc()
        log.error("biometric service refused the MFA's credentials: configuration error",
                  extra={"service": self.service, "code": code.name, "setting": self.settings_named()})
        return errors.ServiceError(
            grpc.StatusCode.INTERNAL,
            f"the {self.service} service refused this MFA's credentials ({code.name}): a configuration error of "
            f"the deployment ({self.settings_named()}), not an outage",
            "BIOMETRIC_CREDENTIALS_REFUSED")

    def check_credentials(self) -> None:
        """One authorised call with an empty request: the service authenticates and authorises it,
        then refuses the request itself (INVALID_ARGUMENT), writing nothing. Raises
        ClientConfigError on UNAUTHENTICATED/PERMISSION_DENIED; an unreachable service is logged
        and left to the calls (it may start after the MFA)."""
        try:
            with self.connections.take() as stub:
                getattr(stub, _PROBE[self.service][0])(_PROBE[self.service][1](), timeout=self.cfg.deadline_s)
        except grpc.RpcError as err:
            code = err.code()
            if code in CREDENTIALS_REFUSED:
                raise ClientConfigError(
                    f"the {self.service} service at {self.target} refuses this MFA's credentials ({code.name}: "
                    f"{err.details()}); set {self.settings_named()} to credentials of a principal with the "
                    "service role for the tenants served") from None
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                log.warning("biometric service not reachable at start-up; credentials unchecked",
                            extra={"service": self.service, "code": code.name})

    def close(self) -> None:
        self.connections.close()


class Connections:
    """Channels to one target, each with a connection of its own (a multi-worker service's kernel
    spreads connections, not calls, over its workers), and their stubs. A call takes a connection
    to the least busy worker: once an answer named the worker a connection reached
    (``x-biogate-worker``), the calls in flight on all connections to that worker count; before, the
    connection's own. Among equals, the worker picked least recently (then the next connection in
    turn). Balancing connections alone left the worker that more of them landed on with a queue
    while the other had a free core; breaking ties by connection did the same whenever the load left
    ties: with 6 of 8 connections on one worker it got 70-75 % of the calls of an open loop at 60 %."""

    def __init__(self, channels: list[grpc.Channel], stub_class: Callable[[grpc.Channel], Any]) -> None:
        self.channels = channels
        self._stubs = [stub_class(c) for c in channels]
        self._index = {id(stub): i for i, stub in enumerate(self._stubs)}
        self._in_flight = [0] * len(channels)
        self._worker: list[str | None] = [None] * len(channels)
        self._turn = 0
        self._picks = 0
        self._picked: dict[object, int] = {}  # worker (or connection, before its worker is known) -> its last pick
        self._lock = threading.Lock()

    def _key(self, i: int) -> object:
        worker = self._worker[i]
        return i if worker is None else worker

    def answered(self, stub: Any, call: Any) -> None:
        """Notes the worker that answered ``call`` (a finished call or an RpcError) on ``stub``'s connection."""
        try:
            worker = dict(call.initial_metadata() or ()).get("x-biogate-worker")
        except Exception:  # a call that failed before any metadata arrived names no worker
            return
        self.landed(stub, worker)

    def landed(self, stub: Any, worker: object) -> None:
        """Notes ``worker`` (an answer's x-biogate-worker; None or absent: a single-process service)
        as the one ``stub``'s connection reached."""
        if isinstance(worker, str):
            with self._lock:
                self._worker[self._index[id(stub)]] = worker

    def worker_of(self, stub: Any) -> str | None:
        """The worker ``stub``'s connection reached, once an answer on it named it."""
        with self._lock:
            return self._worker[self._index[id(stub)]]

    def workers(self) -> set[str]:
        """The workers the answers so far named."""
        with self._lock:
            return {w for w in self._worker if w is not None}

    @contextlib.contextmanager
    def take(self) -> Iterator[Any]:
        """A stub on a connection to the least busy worker, counted busy until the block ends."""
        n = len(self._stubs)
        with self._lock:
            start, self._turn = self._turn, (self._turn + 1) % n
            busy: dict[object, int] = {}
            for j in range(n):
                busy[self._key(j)] = busy.get(self._key(j), 0) + self._in_flight[j]
            i = min(((start + k) % n for k in range(n)),
                    key=lambda j: (busy[self._key(j)], self._picked.get(self._key(j), -1)))
            self._picks += 1
            self._picked[self._key(i)] = self._picks
            self._in_flight[i] += 1
        try:
            yield self._stubs[i]
        finally:
            with self._lock:
                self._in_flight[i] -= 1

    def close(self) -> None:
        for channel in self.channels:
            channel.close()


class _Source:
    """A client stream's requests. When producing them fails (mostly the MFA's own caller: a stream
    over its limits, stalled or cancelled) the exception is kept for stream() to raise in the
    handler, where the interceptor answers a refusal and logs a real fault at ERROR, and the call is
    cancelled here. Raised into grpc's request thread instead, every refusal was logged there at
    ERROR ("Exception iterating requests!"); and the iterator may not just end, which would
    half-close the call (the voice service refuses a StreamVerify closed without its end message,
    but a cancel is what the failure is)."""

    def __init__(self, first: Any, rest: Iterator[Any]) -> None:
        self.first, self.rest = first, rest
        self.error: BaseException | None = None
        self._call: grpc.Future | None = None
        self._started = threading.Event()

    def started(self, call: grpc.Future | None) -> None:
        self._call = call
        self._started.set()

    def __iter__(self) -> Iterator[Any]:
        yield self.first
        try:
            yield from self.rest
        except Exception as exc:  # not GeneratorExit: grpc dropping a stream it no longer needs is no failure
            self.error = exc
            self._started.wait()  # grpc may read on before future() has returned the call
            if self._call is not None:
                self._call.cancel()  # before the iterator ends: grpc then sends no half-close


# The RPC each start-up check makes: one the service role is allowed, with an empty request.
_PROBE = {"face": ("Verify", face_pb2.VerifyFaceRequest), "voice": ("Verify", voice_pb2.VerifyVoiceRequest)}


def _token(settings: MfaSettings, cfg: ClientTarget) -> str | None:
    if cfg.token:
        return cfg.token
    if settings.auth.dev_credentials and not settings.auth.principals:
        from services.common.server.auth import ensure_dev_credentials

        return ensure_dev_credentials(settings)["dev-service"]
    return None


def open_clients(settings: MfaSettings) -> dict[str, BiometricClient]:
    out = {}
    tracing = telemetry.tracer_provider(settings, "mfa")
    for name, stub in (("face", face_pb2_grpc.FaceServiceStub), ("voice", voice_pb2_grpc.VoiceServiceStub)):
        cfg: ClientTarget = getattr(settings.clients, name)
        endpoint = settings.endpoint(name)  # type: ignore[arg-type]
        target = cfg.target or f"{endpoint.host}:{endpoint.port}"
        out[name] = BiometricClient(name, target, _token(settings, cfg), cfg, stub, settings.server.max_message_bytes,
                                    tracer_provider=tracing)
    return out


def check_credentials(clients: dict[str, BiometricClient]) -> None:
    """At start-up: refuse to run with credentials a biometric service refuses (ClientConfigError)."""
    for client in clients.values():
        client.check_credentials()
