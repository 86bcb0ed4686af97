"""The kiosk gateway: REST/JSON for the MFA's face login at a bank's kiosk (start, face capture,
SMS code, decision), with its OpenAPI document at ``/openapi.json`` and the kiosk page at ``/``.

Trust, from the MFA's side: the gateway is the kiosk terminal. It calls the MFA with the kiosk's own
credentials (a principal with ``terminal: {channel: kiosk}``), opens kiosk-channel sessions only and
submits the camera's frames as terminal captures (CaptureBinding.terminal); the MFA's rules stand
as they are (the kiosk policy, liveness, lockout, the SMS code). The gateway holds no decision of its
own and never sees the MFA's other callers' credentials.

From the browser's side: the page runs in the kiosk's locked-down browser on the same machine. It
authenticates with a per-kiosk key (``Authorization: Bearer``, compared by SHA-256 with
``kiosk.client_key_sha256``) that the kiosk launcher hands to the page in the URL fragment (never
sent over the network, removed from the address bar at once). No CORS headers are sent, so another
origin's page cannot call the API with the key; the gateway listens on loopback by default.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Awaitable, Callable, Collection, MutableMapping
from pathlib import Path
from typing import Annotated, Any, Literal

import grpc
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from pydantic import BaseModel, ConfigDict, Field

from services.common.api.v1 import common_pb2, mfa_pb2, mfa_pb2_grpc
from services.common.errors import details_of
from services.kiosk.config import KioskConfig, host_name
from services.kiosk.metrics import FRAMES_BUSY, RATE_LIMITED
from services.kiosk.ratelimit import RateLimiter, address_key, retry_after

STATIC = Path(__file__).resolve().parent / "static"
ID_PATTERN = r"^[A-Za-z0-9._:-]{1,64}$"
HEALTH = "/healthz"  # the kubelet's probes: no key, no rate limit, any Host
SMALL_BODY = 16 * 1024  # every request but a face frame: an id, a code, or nothing
JSON_SLACK = 1024  # what {"image_b64": ""} and its whitespace add to a frame's base64

# gRPC status -> HTTP status of the gateway's JSON error
HTTP_OF = {
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.OUT_OF_RANGE: 400, grpc.StatusCode.UNAUTHENTICATED: 502,
    grpc.StatusCode.PERMISSION_DENIED: 403, grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.FAILED_PRECONDITION: 409, grpc.StatusCode.ABORTED: 409, grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
OWN_MESSAGES = {
    grpc.StatusCode.UNAUTHENTICATED: "the MFA refused this kiosk's credentials (kiosk.mfa_token / certificate)",
    grpc.StatusCode.UNAVAILABLE: "the MFA service cannot be reached; try again shortly",
    grpc.StatusCode.DEADLINE_EXCEEDED: "the MFA service did not answer in time; try again",
}
FACTORS = {v: k.removeprefix("FACTOR_TYPE_").lower() for k, v in mfa_pb2.FactorType.items()}
OUTCOMES = {v: k.removeprefix("OUTCOME_") for k, v in mfa_pb2.Outcome.items()}


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StartRequest(Body):
    customer: str = Field(pattern=ID_PATTERN, description="the customer's reference at the bank (from the card "
                          "reader or typed); never a phone, ID or card number")


class FaceRequest(Body):
    image_b64: str = Field(min_length=4, description="one camera frame, JPEG or PNG, base64")


class OtpRequest(Body):
    code: str = Field(pattern=r"^[0-9]{4,10}$")


class ReasonOut(BaseModel):
    code: str
    message: str


class Session(BaseModel):
    session_id: str
    acceptable: list[list[str]] = Field(description="the factor sets that can satisfy the bank's policy")


class FactorOut(BaseModel):
    passed: bool
    veto: bool
    reasons: list[ReasonOut]
    attempts_left: int


class OtpSent(BaseModel):
    masked_phone: str


class DecisionOut(BaseModel):
    outcome: Literal["ALLOW", "DENY", "STEP_UP", "REVIEW", "UNSPECIFIED"]
    reasons: list[ReasonOut]
    still_needed: list[list[str]]
    token: str = Field(description="the signed decision (EdDSA JWT) for ALLOW only; verify with the MFA's JWKS")


class ErrorOut(BaseModel):
    reason: str
    message: str
    fields: dict[str, str] = {}


BEARER = HTTPBearer(auto_error=False, description="the kiosk's key")


def _reasons(items) -> list[ReasonOut]:
    return [ReasonOut(code=r.code, message=r.message) for r in items]


def _sets(items) -> list[list[str]]:
    return [[FACTORS[f] for f in s.factors] for s in items]


def body_limit(path: str, max_image_bytes: int) -> int:
    """The most bytes a request body to ``path`` may have: a face frame's JSON (its base64, 4/3 of
    the bytes), else a small one."""
    return max_image_bytes * 4 // 3 + 4 + JSON_SLACK if path.endswith("/face") else SMALL_BODY


Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class BodyLimit:
    """Refuses a request body over its limit (body_limit) with 413 before the app reads it: at once
    by its Content-Length, and without one (chunked) as soon as the bytes received pass it. The
    body is gathered here and handed on whole, so the app never holds more than the limit."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], max_image_bytes: int) -> None:
        self.app, self.max_image_bytes = app, max_image_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        limit = body_limit(path, self.max_image_bytes)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            return await self.refuse(path, limit, scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away: nobody to answer
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return await self.refuse(path, limit, scope, receive, send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        whole: Message | None = {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        async def replay() -> Message:
            nonlocal whole
            if whole is None:
                return await receive()
            message, whole = whole, None
            return message
        return await self.app(scope, replay, send)

    async def refuse(self, path: str, limit: int, scope: Scope, receive: Receive, send: Send) -> None:
        if path.endswith("/face"):
            body = {"reason": "IMAGE_TOO_LARGE", "message": f"the frame is over {self.max_image_bytes} bytes "
                    f"(the request over {limit}): send a smaller JPEG"}
        else:
            body = {"reason": "REQUEST_TOO_LARGE", "message": f"the request body is over {limit} bytes"}
        # the rest of the body is never read: the connection cannot carry another request
        await JSONResponse(body, status_code=413, headers={"Connection": "close"})(scope, receive, send)


class NoSniff:
    """Every answer, refusals by the other layers included, tells the browser to take its
    Content-Type as given: a JSON error echoing input is never run as a script or a page."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def marked(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"x-content-type-options", b"nosniff")]}
            await send(message)

        return await self.app(scope, receive, marked)


class AllowedHosts:
    """Refuses a request whose Host is none of ``hosts`` (kiosk.allowed_hosts, as host_name gives
    them) with 421 HOST_NOT_ALLOWED before anything else reads it: a page whose own name was
    re-pointed at the gateway's address (DNS rebinding) is the same origin as the gateway to the
    browser, and its requests still name it. Not Starlette's TrustedHostMiddleware: it answers
    plain text, not the gateway's error."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], hosts: Collection[str]) -> None:
        self.app, self.hosts = app, frozenset(hosts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] == HEALTH:  # the probes name the pod's address
            return await self.app(scope, receive, send)
        host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
        if host_name(host) in self.hosts:
            return await self.app(scope, receive, send)
        body = {"reason": "HOST_NOT_ALLOWED", "fields": {},
                "message": f"this gateway does not answer for the host {host[:100]!r}: open it by one of its "
                           "names (kiosk.allowed_hosts)"}
        await JSONResponse(body, status_code=421, headers={"Connection": "close"})(scope, receive, send)
        return None


class FrameSlots:
    """At most ``max_frames`` face frames (requests to .../face) read and handled at once: each holds
    its body, its decoded image and the MFA request, about 30 MiB at the largest (bench/RESULTS.md,
    "Kiosk gateway limits"); one more is answered 503 FRAMES_BUSY with Retry-After at once, before
    its body is read. A counter: the gateway's requests run on one event loop."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], max_frames: int) -> None:
        self.app, self.max_frames, self.held = app, max_frames, 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].endswith("/face"):
            return await self.app(scope, receive, send)
        if self.held >= self.max_frames:
            FRAMES_BUSY.inc()
            body = {"reason": "FRAMES_BUSY", "fields": {},
                    "message": f"the gateway is handling {self.max_frames} frames already: try again in 1 s"}
            await JSONResponse(body, status_code=503, headers={"Retry-After": "1", "Connection": "close"})(
                scope, receive, send)
            return None
        self.held += 1
        try:
            return await self.app(scope, receive, send)
        finally:
            self.held -= 1


class RateLimit:
    """Refuses a request whose client's token bucket is empty (ratelimit.RateLimiter) with 429 and
    Retry-After, before anything else reads it, the kiosk's key included: the buckets are the source
    address's and, with ``device_header``, the kiosk device's that header names. The refusal closes
    the connection, so an unread body is never read (the server lingers; services/kiosk/http.py)."""

    BUCKETS = ("address", "device")

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], limiter: RateLimiter) -> None:
        self.app, self.limiter = app, limiter
        self.device_header = limiter.cfg.device_header.lower().encode("latin-1")
        self.ipv6_prefix_length = limiter.cfg.ipv6_prefix_length

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] == HEALTH:  # the kubelet's probes come from the node
            return await self.app(scope, receive, send)
        client = scope.get("client")
        address = address_key(client[0], self.ipv6_prefix_length) if client else "unknown"
        keys, kinds = [f"address:{address}"], ["address"]
        device = dict(scope["headers"]).get(self.device_header, b"") if self.device_header else b""
        if device:
            keys.append("device:" + device.decode("latin-1")[:128])
            kinds.append("device")
        verdict = await run_in_threadpool(self.limiter.take, keys)  # Redis: a blocking round trip
        if verdict.allowed:
            return await self.app(scope, receive, send)
        RATE_LIMITED.labels(kinds[verdict.refused_by]).inc()
        wait = retry_after(verdict.retry_after_s)
        body = {"reason": "RATE_LIMITED", "fields": {},
                "message": f"too many requests from this {kinds[verdict.refused_by]}: try again in {wait} s"}
        await JSONResponse(body, status_code=429, headers={"Retry-After": wait, "Connection": "close"})(
            scope, receive, send)
        return None


def create_app(stub: mfa_pb2_grpc.MfaServiceStub, tenant: str, client_key_sha256: str, deadline_s: float = 60.0,
               max_image_bytes: int = 4 * 1024 * 1024, limiter: RateLimiter | None = None,
               max_frames: int | None = None,
               allowed_hosts: Collection[str] = KioskConfig().allowed_hosts) -> FastAPI:
    """The gateway's app: ``stub`` reaches the MFA with the kiosk terminal's credentials; it answers
    requests naming ``allowed_hosts`` (as kiosk.allowed_hosts holds them)."""
    if not tenant:
        raise ValueError("kiosk.tenant: the bank whose customers this kiosk serves is not set")
    if len(client_key_sha256) != 64:
        raise ValueError("kiosk.client_key_sha256: the SHA-256 (hex) of the kiosk browser's key is not set")
    app = FastAPI(title="BioGate kiosk gateway", version="1", docs_url=None, redoc_url=None,
                  description="The MFA's face login for a bank's kiosk. Every /v1 call needs the kiosk's key.",
                  responses={401: {"model": ErrorOut}, 400: {"model": ErrorOut}, 409: {"model": ErrorOut},
                             413: {"model": ErrorOut}, 429: {"model": ErrorOut}, 503: {"model": ErrorOut}})
    app.add_middleware(BodyLimit, max_image_bytes=max_image_bytes)
    if max_frames is not None:
        app.add_middleware(FrameSlots, max_frames=max_frames)
    if limiter is not None and limiter.cfg.enabled:
        app.add_middleware(RateLimit, limiter=limiter)
    app.add_middleware(AllowedHosts, hosts=allowed_hosts)  # a rebinding page's requests take no token
    app.add_middleware(NoSniff)  # outermost: its header is on every answer, the others' refusals too
    def kiosk(creds: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]) -> None:
        digest = hashlib.sha256(creds.credentials.encode()).hexdigest() if creds is not None else ""
        if not hmac.compare_digest(digest, client_key_sha256):
            raise HTTPException(401, {"reason": "KIOSK_KEY_REQUIRED",
                                      "message": "send 'Authorization: Bearer <kiosk key>' (the key this kiosk "
                                                 "was launched with)"}, headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(grpc.RpcError)
    def mfa_error(_request: Request, err: grpc.RpcError) -> JSONResponse:
        code = err.code()
        info = details_of(err)
        # the MFA's own refusals say what to do; the transport's texts are the gRPC library's, not for a kiosk
        message = OWN_MESSAGES.get(code) if code == grpc.StatusCode.UNAUTHENTICATED or not info["reason"] else None
        message = message or err.details()
        body = ErrorOut(reason=info["reason"] or code.name, message=message or code.name,
                        fields={k: str(v) for k, v in info["fields"].items()})
        headers = {"Retry-After": str(max(1, round(info["retry_delay_s"])))} if info["retry_delay_s"] else None
        return JSONResponse(body.model_dump(), status_code=HTTP_OF.get(code, 500), headers=headers)

    @app.exception_handler(StarletteHTTPException)  # the routing's 404 and 405 too, not only the gateway's own
    def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail: Any = exc.detail
        if isinstance(detail, dict):
            body = ErrorOut(**detail)
        elif exc.status_code == 404:
            body = ErrorOut(reason="NOT_FOUND", message="nothing is served at this path: the API is under /v1 "
                            "(described at /openapi.json), the kiosk page at /")
        elif exc.status_code == 405:
            allow = (exc.headers or {}).get("Allow", "")
            body = ErrorOut(reason="METHOD_NOT_ALLOWED", message=f"{request.method} is not served at this path: "
                            f"use {allow}")
        else:
            body = ErrorOut(reason="HTTP_ERROR", message=str(detail))
        return JSONResponse(body.model_dump(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        fields = {".".join(str(p) for p in e["loc"][1:]) or "body": e["msg"] for e in exc.errors()}
        body = ErrorOut(reason="INVALID_ARGUMENT", message="; ".join(f"{k}: {v}" for k, v in fields.items()),
                        fields=fields)
        return JSONResponse(body.model_dump(), status_code=400)

    auth = [Depends(kiosk)]

    @app.post("/v1/sessions", dependencies=auth, response_model=Session)
    def start(body: StartRequest) -> Session:
        r = stub.StartAuthentication(mfa_pb2.StartAuthenticationRequest(
            subject=common_pb2.SubjectRef(tenant_id=tenant, subject_id=body.customer), channel=mfa_pb2.CHANNEL_KIOSK,
            action="login"), timeout=deadline_s)
        return Session(session_id=r.session_id, acceptable=_sets(r.acceptable))

    @app.post("/v1/sessions/{session_id}/face", dependencies=auth, response_model=FactorOut)
    def face(session_id: str, body: FaceRequest) -> FactorOut:
        if len(body.image_b64) > max_image_bytes * 4 // 3 + 4:
            raise HTTPException(413, {"reason": "IMAGE_TOO_LARGE",
                                      "message": f"the frame is over {max_image_bytes} bytes: send a smaller JPEG"})
        try:
            image = base64.b64decode(body.image_b64, validate=True)
        except (binascii.Error, ValueError):
            raise HTTPException(400, {"reason": "MALFORMED_IMAGE", "message": "image_b64 is not base64",
                                      "fields": {"image_b64": "not base64"}}) from None
        evidence = mfa_pb2.FaceEvidence(image=common_pb2.Image(data=image),
                                        binding=mfa_pb2.CaptureBinding(terminal=mfa_pb2.TerminalCapture()))
        r = stub.SubmitFactor(mfa_pb2.SubmitFactorRequest(session_id=session_id, face=evidence), timeout=deadline_s)
        return FactorOut(passed=r.result.passed, veto=r.result.veto, reasons=_reasons(r.result.reasons),
                         attempts_left=r.attempts_left)

    @app.post("/v1/sessions/{session_id}/otp/send", dependencies=auth, response_model=OtpSent)
    def send_otp(session_id: str) -> OtpSent:
        # no payee: the kiosk opens logins only (start); the MFA refuses a payment's SMS without its payee
        r = stub.SendOtp(mfa_pb2.SendOtpRequest(session_id=session_id), timeout=deadline_s)
        return OtpSent(masked_phone=r.masked_phone)

    @app.post("/v1/sessions/{session_id}/otp", dependencies=auth, response_model=FactorOut)
    def otp(session_id: str, body: OtpRequest) -> FactorOut:
        r = stub.SubmitFactor(mfa_pb2.SubmitFactorRequest(session_id=session_id, otp=mfa_pb2.OtpEvidence(
            code=body.code)), timeout=deadline_s)
        return FactorOut(passed=r.result.passed, veto=r.result.veto, reasons=_reasons(r.result.reasons),
                         attempts_left=r.attempts_left)

    @app.post("/v1/sessions/{session_id}/decision", dependencies=auth, response_model=DecisionOut)
    def decision(session_id: str) -> DecisionOut:
        r = stub.Decide(mfa_pb2.DecideRequest(session_id=session_id), timeout=deadline_s)
        return DecisionOut(outcome=OUTCOMES[r.outcome], reasons=_reasons(r.reasons),
                           still_needed=_sets(r.still_needed), token=r.token)

    @app.api_route(HEALTH, methods=["GET", "HEAD"], include_in_schema=False)
    def health() -> dict[str, str]:
        """The probes' answer: the gateway serves HTTP (it says nothing of the MFA behind it)."""
        return {"status": "serving"}

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers=PAGE_HEADERS)

    @app.api_route("/kiosk.js", methods=["GET", "HEAD"], include_in_schema=False)
    def script() -> FileResponse:
        return FileResponse(STATIC / "kiosk.js", media_type="text/javascript", headers=PAGE_HEADERS)

    @app.api_route("/kiosk.css", methods=["GET", "HEAD"], include_in_schema=False)
    def style() -> FileResponse:
        return FileResponse(STATIC / "kiosk.css", media_type="text/css", headers=PAGE_HEADERS)

    return app


# The page loads nothing from elsewhere and may use the camera of this origin only.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; media-src 'self' blob:; "
                               "frame-ancestors 'none'",
    "Permissions-Policy": "camera=(self), microphone=()",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
