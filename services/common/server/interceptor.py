"""The one server interceptor: request id, authentication, role, terminal and tenant authorisation,
admission control of model work, error mapping, metrics and the access log, in that order, for
every RPC but health checks."""

from __future__ import annotations

import logging
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Literal

import grpc
from google.protobuf.descriptor import Descriptor, ServiceDescriptor

from services.common import context, errors, metrics, telemetry
from services.common.api.v1 import common_pb2
from services.common.audit.log import AuditKeyDestroyedError
from services.common.crypto.errors import TokenKeyInvalidError, TokenUnavailableError
from services.common.privacy import is_personal_data
from services.common.server.admission import AdmissionQueue, Slot
from services.common.server.auth import Authenticator
from services.common.server.streams import BoundedStream, StreamLimits

log = logging.getLogger("biogate.rpc")

UNAUTHENTICATED_PREFIXES = ("/grpc.health.v1.Health/",)
_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")  # fullmatch: "$" would let a final newline by
# Reflection is open to any authenticated caller, whatever its roles.
ANY_ROLE_PREFIXES = ("/grpc.reflection.v1alpha.ServerReflection/", "/grpc.reflection.v1.ServerReflection/")


def roles_by_method(services: Iterable[ServiceDescriptor]) -> dict[str, frozenset[str]]:
    """Reads the `allowed_roles` option of every method: {"/pkg.Service/Method": {"verifier", ...}}."""
    table = {}
    for service in services:
        for method in service.methods:
            # protoc's .pyi types extensions as plain FieldDescriptors, which protobuf's stubs refuse as keys.
            roles: Iterable[int] = method.GetOptions().Extensions[common_pb2.allowed_roles]  # type: ignore[index]
            names = {common_pb2.Role.Name(r).removeprefix("ROLE_").lower() for r in roles}
            table[f"/{service.full_name}/{method.name}"] = frozenset(names)
    return table


def _flagged(services: Iterable[ServiceDescriptor], option: Any) -> frozenset[str]:
    return frozenset(f"/{service.full_name}/{method.name}" for service in services for method in service.methods
                     if method.GetOptions().Extensions[option])


def model_work_methods(services: Iterable[ServiceDescriptor]) -> frozenset[str]:
    """The methods whose `model_work` option is set: those admitted through the admission queue."""
    return _flagged(services, common_pb2.model_work)


def terminal_methods(services: Iterable[ServiceDescriptor]) -> frozenset[str]:
    """The methods whose `terminal` option is set: the only ones a registered terminal may call."""
    return _flagged(services, common_pb2.terminal)


TenantLookup = Callable[[str], "str | None"]  # an object's id -> its tenant; None: no such object


@dataclass(frozen=True)
class TenantRule:
    """An RPC's `tenant` option: the request field holding the tenant id, or the id of an object
    whose tenant the service looks up (``lookup``), or ``none``."""

    path: tuple[str, ...] = ()
    lookup: str = ""
    none: bool = False

    def value(self, request: Any) -> str:
        obj = request
        for name in self.path[:-1]:
            if not obj.HasField(name):
                return ""
            obj = getattr(obj, name)
        return getattr(obj, self.path[-1])


def tenants_by_method(services: Iterable[ServiceDescriptor]) -> dict[str, TenantRule]:
    """Reads the `tenant` option of every method; an RPC without one, or naming a field its request
    does not have, is a programming error that stops the server from starting."""
    table = {}
    for service in services:
        for method in service.methods:
            name = f"/{service.full_name}/{method.name}"
            options = method.GetOptions()
            if not options.HasExtension(common_pb2.tenant):  # type: ignore[arg-type]  # as in roles_by_method
                raise ValueError(f"{name} declares no (biogate.v1.tenant) option")
            src: common_pb2.TenantSource = options.Extensions[common_pb2.tenant]  # type: ignore[index]
            if src.none:
                table[name] = TenantRule(none=True)
                continue
            path = tuple(src.field.split("."))
            message: Descriptor | None = method.input_type
            for i, part in enumerate(path):
                field = message.fields_by_name.get(part) if message is not None else None
                last = i == len(path) - 1
                if field is None or last != (field.type == field.TYPE_STRING) or field.is_repeated:
                    raise ValueError(f"{name}: tenant field {src.field!r} is not a string field path of "
                                     f"{method.input_type.full_name}")
                message = field.message_type
            table[name] = TenantRule(path, src.lookup)
    return table


@dataclass(frozen=True)
class _Method:
    """What the interceptor knows of one RPC method before any call to it: worked out once."""

    name: str  # "/pkg.Service/Method"
    short: str  # "Method", the metrics' and logs' label
    queue: AdmissionQueue | None  # its admission queue, for a model-work method
    tenant: TenantRule | None
    any_role: bool  # open to any authenticated caller (reflection)
    allowed: frozenset[str] | None  # the roles it is open to; None: no role
    terminal: bool  # open to a registered terminal
    seconds: Any  # its RPC_SECONDS child


class ServerInterceptor(grpc.ServerInterceptor):
    def __init__(
        self,
        service: str,
        authenticator: Authenticator,
        roles: dict[str, frozenset[str]],
        rpc_timeout_s: float = 30.0,
        tenants: dict[str, TenantRule] | None = None,
        lookups: dict[str, TenantLookup] | None = None,
        streams: StreamLimits = StreamLimits(),
        stream_readers: int = 256,  # at most one blocked read per concurrent RPC
        model_work: frozenset[str] = frozenset(),
        admission: AdmissionQueue | None = None,
        worker: str | None = None,  # the answering process, sent as x-biogate-worker when several serve
        terminal: frozenset[str] = frozenset(),  # the methods open to a registered terminal
    ) -> None:
        self.service = service
        self.worker = worker
        self.rpc_timeout_s = rpc_timeout_s
        self.authenticator = authenticator
        self.roles = roles
        self.tenants = tenants or {}
        self.lookups = lookups or {}
        self.streams = streams
        self.model_work = model_work
        self.admission = admission
        self.terminal = terminal
        self._readers = ThreadPoolExecutor(max_workers=stream_readers, thread_name_prefix=f"{service}-stream-read")
        missing = sorted({r.lookup for r in self.tenants.values() if r.lookup} - self.lookups.keys())
        if missing:
            raise ValueError(f"the {service} service declares tenant lookups it does not provide: {', '.join(missing)}")
        # Per method: the servicer's handler and the wrapped one made of it, built on its first call.
        self._wrapped: dict[str, tuple[Any, grpc.RpcMethodHandler]] = {}
        self._in_flight = metrics.RPC_IN_FLIGHT.labels(service)
        self._totals: dict[tuple[str, grpc.StatusCode], Any] = {}  # RPC_TOTAL's children by (method, code)

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(UNAUTHENTICATED_PREFIXES):
            return handler
        known = self._wrapped.get(method)
        if known is None or known[0] is not handler:
            known = self._wrapped[method] = (handler, self._wrap(self._method(method), handler))
        return known[1]

    def _method(self, method: str) -> _Method:
        short = method.rsplit("/", 1)[-1]
        return _Method(method, short, self.admission if method in self.model_work else None,
                       self.tenants.get(method), method.startswith(ANY_ROLE_PREFIXES), self.roles.get(method),
                       method in self.terminal, metrics.RPC_SECONDS.labels(self.service, short))

    def _wrap(self, m: _Method, handler: Any) -> grpc.RpcMethodHandler:  # the servicer's: a _RpcMethodHandler tuple
        handler = handler._replace(request_deserializer=_tolerant(handler.request_deserializer))
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(m, handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                self._stream_in(m, handler.stream_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._stream_out(m, handler.unary_stream, unary_in=True),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return grpc.stream_stream_rpc_method_handler(
            self._stream_out(m, handler.stream_stream, unary_in=False),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    # --- wrappers -------------------------------------------------------------------------

    def _unary(self, m: _Method, behavior: Callable) -> Callable:
        def wrapped(request, ctx):
            with _Call(self, m, ctx) as call:
                call.authorise()
                call.check_request(request)
                call.admit()
                return behavior(request, ctx)
            return None  # reached only after an abort; never sent

        return wrapped

    def _stream_in(self, m: _Method, behavior: Callable) -> Callable:
        def wrapped(request_iterator, ctx):
            with _Call(self, m, ctx) as call:
                call.authorise()
                return behavior(call.checked_stream(request_iterator), ctx)
            return None

        return wrapped

    def _stream_out(self, m: _Method, behavior: Callable, unary_in: bool) -> Callable:
        def wrapped(request, ctx):
            with _Call(self, m, ctx) as call:
                call.authorise()
                if unary_in:
                    call.check_request(request)
                    call.admit()
                else:
                    request = call.checked_stream(request)
                yield from behavior(request, ctx)

        return wrapped

    def close(self) -> None:
        self._readers.shutdown(wait=False, cancel_futures=True)

    def total(self, short: str, code: grpc.StatusCode) -> Any:
        """RPC_TOTAL's child for the method and status code."""
        child = self._totals.get((short, code))
        if child is None:
            child = self._totals[(short, code)] = metrics.RPC_TOTAL.labels(self.service, short, code.name)
        return child

    def authorise(self, m: _Method, ctx: grpc.ServicerContext, authorization_headers: int) -> context.Principal:
        if authorization_headers > 1:
            # Which one counts would be up to whoever reads the metadata last: refuse them all.
            raise errors.unauthenticated("more than one 'authorization' header: send exactly one",
                                         reason="DUPLICATE_CREDENTIALS")
        principal = self.authenticator.authenticate(ctx)
        if principal is None:
            raise errors.unauthenticated(
                "missing or unknown credentials: send 'authorization: Bearer <token>' metadata "
                "or a client certificate the server knows"
            )
        if m.any_role:
            return principal
        if m.allowed is None:
            raise errors.permission_denied(f"{m.name} is not open to any role")
        if not principal.roles & m.allowed:
            raise errors.permission_denied(
                f"caller '{principal.name}' lacks a role for {m.name}; allowed roles: {', '.join(sorted(m.allowed))}",
                reason="ROLE_NOT_ALLOWED",
            )
        if principal.terminal_channel is not None and not m.terminal:
            raise errors.permission_denied(
                f"caller '{principal.name}' is a registered {principal.terminal_channel} terminal, which runs "
                f"its channel's sessions only; {m.name} is for the bank's own systems", reason="TERMINAL_NOT_ALLOWED")
        return principal


class _Call:
    """One RPC's bookkeeping; as a context manager it maps exceptions to statuses."""

    def __init__(self, owner: ServerInterceptor, m: _Method, ctx: grpc.ServicerContext) -> None:
        self.owner, self.m, self.ctx = owner, m, ctx
        self.method, self.short = m.name, m.short
        self.principal: context.Principal | None = None
        self.queue = m.queue
        self.slot: Slot | None = None
        self.authorization_headers = 0

    def __enter__(self) -> "_Call":
        sent: str | bytes = ""
        for key, value in self.ctx.invocation_metadata() or ():
            if key == "x-request-id":
                sent = value  # the last one, as a dict of the metadata would keep
            elif key == "authorization":
                self.authorization_headers += 1
        rid = request_id(sent if isinstance(sent, str) else "")  # bytes only for -bin keys
        self._tokens = (context.request_id.set(rid), context.principal.set(None), context.deadline.set(None),
                        context.admission.set(self.admit if self.queue is not None else None),
                        context.release.set(self.release if self.queue is not None else None))
        sent_back: tuple[tuple[str, str], ...] = (("x-request-id", rid),)
        if self.owner.worker is not None:
            sent_back += (("x-biogate-worker", self.owner.worker),)
        self.ctx.send_initial_metadata(sent_back)
        self.start = time.perf_counter()
        self.owner._in_flight.inc()
        return self

    def authorise(self) -> None:
        remaining = self.ctx.time_remaining()
        if remaining is not None and remaining <= 0:
            raise errors.ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline expired before handling")
        budget = self.owner.rpc_timeout_s if remaining is None else min(remaining, self.owner.rpc_timeout_s)
        context.deadline.set(time.monotonic() + budget)
        self.principal = self.owner.authorise(self.m, self.ctx, self.authorization_headers)
        context.principal.set(self.principal)

    def admit(self) -> None:
        """Takes a model-work slot (RPCs marked model_work), once; raises RESOURCE_EXHAUSTED when refused."""
        if self.queue is not None and self.slot is None:
            queue = self.queue
            self.ctx.add_callback(queue.wake)  # runs when the call ends, a client's cancellation included
            slot = queue.acquire(self.short, context.deadline.get(), cancelled=lambda: not self.ctx.is_active())
            if not self.ctx.is_active():  # the client gave up while the call was queued: no work for nobody
                self.queue.release(slot, observe=False)
                raise errors.ServiceError(grpc.StatusCode.CANCELLED, "the client cancelled the call while it was queued")
            self.slot = slot

    def release(self) -> None:
        """Gives the model-work slot back (the queue ignores a second release: ``_finish`` calls it again)."""
        if self.slot is not None:
            self.queue.release(self.slot)  # type: ignore[union-attr]

    def check_request(self, request: Any) -> None:
        if isinstance(request, Malformed):
            raise errors.invalid_argument(f"the request is not a valid {request.message} message: check the client's "
                                          "generated code against the server's proto", reason="MALFORMED_REQUEST")
        self.check_tenant(request)

    def check_tenant(self, request: Any) -> None:
        rule = self.m.tenant
        if rule is None or rule.none or self.principal is None or "*" in self.principal.tenants:
            return  # an RPC on no tenant's data, or a caller of every tenant: nothing to look up
        value = rule.value(request)
        if not value:
            return  # the service refuses the missing field with INVALID_ARGUMENT
        tenant = self.owner.lookups[rule.lookup](value) if rule.lookup else value
        if tenant is None:
            return  # no such object: the service answers NOT_FOUND or INVALID_ARGUMENT
        if not self.principal.may_act_for(tenant):
            what = f"this {rule.lookup}'s tenant" if rule.lookup else f"tenant '{tenant}'"
            raise errors.permission_denied(
                f"caller '{self.principal.name}' may not act for {what}", reason="TENANT_NOT_ALLOWED"
            )

    def checked_stream(self, requests: Iterator) -> Iterator:
        """The client's stream, read under the server's stream budgets, each message tenant-checked."""
        return BoundedStream(requests, self.owner.streams, context.deadline.get(), self.owner._readers,
                             self.check_request, on_end=self.admit)

    def __exit__(self, exc_type, exc, tb) -> Literal[False]:
        code = _code_of(self.ctx)
        try:
            if exc is None or isinstance(exc, GeneratorExit):
                return False
            if isinstance(exc, grpc.RpcError) and not self.ctx.is_active():
                code = grpc.StatusCode.CANCELLED  # the client went away (mid-stream): nobody to answer
                return False
            if isinstance(exc, TokenUnavailableError):  # the HSM restarting or away: worth a retry, no restart
                exc = errors.ServiceError(grpc.StatusCode.UNAVAILABLE, str(exc), "KEY_STORE_UNAVAILABLE",
                                          retry_delay_s=max(exc.retry_after_s, 1.0))
            if isinstance(exc, TokenKeyInvalidError):  # the HSM answers, its key fails: a retry never helps
                exc = errors.ServiceError(grpc.StatusCode.FAILED_PRECONDITION, str(exc), "KEY_STORE_KEY_INVALID")
            if isinstance(exc, AuditKeyDestroyedError):  # this replica alone: another one serves the call
                exc = errors.ServiceError(grpc.StatusCode.UNAVAILABLE, str(exc), "AUDIT_KEY_DESTROYED")
            if isinstance(exc, errors.ServiceError):
                code = exc.code
                self.ctx.abort_with_status(exc.to_status())
            if isinstance(exc, NotImplementedError):
                code = grpc.StatusCode.UNIMPLEMENTED
                self.ctx.abort(code, f"{self.method} is not implemented by this server version")
            if code != grpc.StatusCode.OK:  # the handler set its status and aborted itself
                return False
            code = grpc.StatusCode.INTERNAL
            log.error("unhandled error", exc_info=(exc_type, exc, tb), extra={"rpc": self.short})
            self.ctx.abort(code, f"internal error; quote request id {context.request_id.get()} to support")
        finally:
            self._finish(code)
        return False

    def _finish(self, code: grpc.StatusCode) -> None:
        if self.slot is not None:
            self.queue.release(self.slot)  # type: ignore[union-attr]
        elapsed = time.perf_counter() - self.start
        self.owner._in_flight.dec()
        self.owner.total(self.short, code).inc()
        self.m.seconds.observe(elapsed)
        telemetry.record_status(code)
        log.info(
            "rpc",
            extra={
                "rpc": self.short,
                "code": code.name,
                "ms": round(elapsed * 1000, 2),
                "principal": self.principal.name if self.principal else None,
            },
        )
        rid, principal, deadline, admission, release = self._tokens
        context.request_id.reset(rid)
        context.principal.reset(principal)
        context.deadline.reset(deadline)
        context.admission.reset(admission)
        context.release.reset(release)


@dataclass(frozen=True)
class Malformed:
    """What a request that does not parse deserialises to; refused with INVALID_ARGUMENT by the call,
    where gRPC itself would answer INTERNAL ("Exception deserializing request!")."""

    message: str
    size: int

    def ByteSize(self) -> int:  # counted against a stream's byte budget like any message
        return self.size


def _tolerant(deserialize: Callable | None) -> Callable | None:
    if deserialize is None:
        return None
    name = getattr(getattr(deserialize, "__self__", None), "__name__", "request")

    def tolerant(data: bytes):
        try:
            return deserialize(data)
        except Exception:  # noqa: BLE001 - any parse failure is the client's: refused by the call
            return Malformed(name, len(data))

    return tolerant


def request_id(sent: str) -> str:
    """The caller's x-request-id when it is a plain token (1-64 letters, digits and . _ : -) that
    holds no personal data; otherwise a generated one. A trace id is not worth failing a call
    for: the id used is returned in the response metadata, and it is what the logs carry."""
    if _REQUEST_ID.fullmatch(sent) and not is_personal_data(sent):
        return sent
    return uuid.uuid4().hex


def _code_of(ctx: grpc.ServicerContext) -> grpc.StatusCode:
    code = ctx.code()  # type: ignore[attr-defined]  # grpc's stubs lack the server context's code()
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.OK
