"""Outbound HTTP to providers and the bank (SMS gateway, FCM, review webhooks), and model
downloads: one POST (:func:`post_once`, redirects refused: urllib would replay a POST as a bodiless
GET), a JSON POST with bounded retries (:func:`post_json`): timeouts, connection errors, answers that
are not HTTP, 429 and 5xx are retried with exponential back-off; other 4xx are not (the request itself
is refused); and a GET written to a file (:func:`download`, redirects followed).

An attempt's ``timeout_s`` bounds all of it (resolving the host name, connecting, sending, the
answer's head and body), not each socket operation: a receiver trickling its answer a byte at a
time, each within the socket's timeout, would otherwise hold the caller (an RPC's thread, the
webhook worker every tenant shares, a model fetch) for as long as it likes."""

from __future__ import annotations

import concurrent.futures
import contextlib
import http.client
import json
import logging
import math
import shutil
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

MAX_REPLY = 65536
_TLS = ssl.create_default_context()  # the system's CAs, the host name checked


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class _Deadline:
    """Shuts the attempt's connection down ``seconds`` after it began: whatever the connection is
    then waiting for fails at once. It watches a duplicate of the socket (one connection, its own
    descriptor: TLS wrapping detaches the original, and the duplicate is never another socket's).

    The host name is resolved here too, within what is left of the deadline: getaddrinfo cannot be
    interrupted, so it runs on one of a few resolver threads, and a resolver that hangs holds that
    thread, never the caller. The connection is then made to the addresses found; the TLS layer
    above still sends the host name (SNI) and checks the certificate against it."""

    def __init__(self, seconds: float) -> None:
        self.expired = False
        self._ends = time.monotonic() + seconds
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> _Deadline:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()
        with self._lock:
            for sock in self._socks:
                sock.close()
            self._socks.clear()

    def left(self) -> float:
        left = self._ends - time.monotonic()
        if left <= 0 or self.expired:
            raise TimeoutError("the attempt's deadline passed")
        return left

    def create_connection(self, address: tuple[str, int], timeout: object = None,
                          source_address: tuple[str, int] | None = None) -> socket.socket:
        """socket.create_connection, its name resolution and connecting bounded by the deadline."""
        host, port = address
        per_read = timeout if isinstance(timeout, (int, float)) else None  # or socket's default sentinel
        wait = self.left()
        lookup = _RESOLVER.submit(socket.getaddrinfo, host, port, 0, socket.SOCK_STREAM)
        try:
            addresses = lookup.result(timeout=wait)
        except concurrent.futures.TimeoutError:
            lookup.cancel()  # still queued behind hung lookups: it never starts
            raise TimeoutError("name resolution outlasted the attempt's deadline") from None
        error: OSError = OSError("the host name resolved to no address")
        for family, kind, proto, _, sockaddr in addresses:  # each in turn, as socket.create_connection
            sock = socket.socket(family, kind, proto)
            try:
                sock.settimeout(min(self.left(), per_read or math.inf))
                if source_address:
                    sock.bind(source_address)
                sock.connect(sockaddr)
            except OSError as exc:
                sock.close()
                error = exc
                continue
            sock.settimeout(per_read)
            with self._lock:
                self._socks.append(sock.dup())
                if self.expired:
                    self._shut(self._socks[-1])
            return sock
        raise error

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._socks:
                self._shut(sock)

    @staticmethod
    def _shut(sock: socket.socket) -> None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


# A few lookups at a time for the whole process: a resolver that hangs ties up these threads (each
# caller still gives up at its deadline), not one more thread per attempt. The interpreter's exit
# waits for a lookup under way, which the system resolver's own timeouts end (resolv.conf).
_RESOLVER = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="outbound-resolve")


class _Http(http.client.HTTPConnection):
    def __init__(self, *args: Any, deadline: _Deadline | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if deadline is not None:
            self._create_connection = deadline.create_connection


class _Https(http.client.HTTPSConnection):
    def __init__(self, *args: Any, deadline: _Deadline | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if deadline is not None:
            self._create_connection = deadline.create_connection


class _HttpHandler(urllib.request.HTTPHandler):
    def __init__(self, deadline: _Deadline) -> None:
        super().__init__()
        self.deadline = deadline

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_Http, req, deadline=self.deadline)


class _HttpsHandler(urllib.request.HTTPSHandler):
    def __init__(self, deadline: _Deadline) -> None:
        super().__init__(context=_TLS)
        self.deadline = deadline

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_Https, req, context=_TLS, deadline=self.deadline)


def _opener(deadline: _Deadline, redirects: bool = False) -> urllib.request.OpenerDirector:
    """urllib's opener (TLS verified, proxies from the environment), without redirects unless
    ``redirects``, its connections opened through ``deadline``."""
    refused = [] if redirects else [_NoRedirects]
    return urllib.request.build_opener(*refused, _HttpHandler(deadline), _HttpsHandler(deadline))


class PostFailed(Exception):
    """A request's failure (a POST's or a download's): what went wrong (``HTTP 503``, ``TimeoutError``...), and whether a retry may succeed."""

    def __init__(self, message: str, transient: bool) -> None:
        super().__init__(message)
        self.transient = transient


def post_once(url: str, body: bytes, headers: dict[str, str], timeout_s: float) -> bytes:
    """The reply's body (at most MAX_REPLY bytes) of a 2xx answer within ``timeout_s`` in all;
    raises PostFailed otherwise."""
    return request_once(url, body, headers, timeout_s)[2]


def request_once(url: str, body: bytes | None, headers: dict[str, str], timeout_s: float, method: str = "POST",
                 error_bodies: bool = False) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body of at most MAX_REPLY bytes) of the answer within ``timeout_s`` in all.
    A status other than 2xx raises PostFailed, unless ``error_bodies`` (a client reading the
    error's body, like google-auth's token request): then it is answered too."""
    request = urllib.request.Request(url, data=body, headers=headers, method=method)
    with _Deadline(timeout_s) as deadline, _failures(deadline):
        try:
            with _opener(deadline).open(request, timeout=timeout_s) as resp:
                answer = resp.status, dict(resp.headers.items()), bytes(resp.read(MAX_REPLY))
        except urllib.error.HTTPError as exc:
            if not error_bodies:
                raise
            with exc:
                answer = exc.code, dict(exc.headers.items()), bytes(exc.read(MAX_REPLY))
    return answer


def download(url: str, out: BinaryIO, timeout_s: float) -> None:
    """GET ``url`` (redirects followed) into ``out`` within ``timeout_s`` in all; PostFailed otherwise,
    part of the body perhaps written."""
    request = urllib.request.Request(url, method="GET")
    with _Deadline(timeout_s) as deadline, _failures(deadline), \
            _opener(deadline, redirects=True).open(request, timeout=timeout_s) as resp:
        shutil.copyfileobj(resp, out, 1 << 20)


@contextlib.contextmanager
def _failures(deadline: _Deadline) -> Iterator[None]:
    """What fails in the block as PostFailed; a block the deadline cut short fails too, as what was
    read by then is not the answer."""
    try:
        yield
    except urllib.error.HTTPError as exc:
        raise PostFailed(f"HTTP {exc.code}", exc.code >= 500 or exc.code == 429) from None
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        # HTTPException: an answer that is not HTTP (a bad status line, too many or too long
        # headers, a broken chunk), worth another try like a dropped connection
        raise PostFailed("TimeoutError" if deadline.expired else type(getattr(exc, "reason", exc)).__name__,
                         True) from None
    if deadline.expired:
        raise PostFailed("TimeoutError", True)


def post_json(url: str, body: bytes, headers: dict[str, str], *, timeout_s: float, retries: int, backoff_s: float,
              what: str, error: Callable[[str, bool], Exception], log: logging.Logger) -> tuple[dict[str, Any], int]:
    """(the JSON object answered, the attempt that succeeded); raises ``error(message, transient)``."""
    last = ""
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff_s * 2 ** (attempt - 1))
        try:
            reply = json.loads(post_once(url, body, headers, timeout_s) or b"{}")
            return (reply if isinstance(reply, dict) else {}), attempt + 1
        except PostFailed as exc:
            last = str(exc)
            if not exc.transient:
                raise error(f"{what} refused the message ({last})", False) from None
        except ValueError as exc:  # a reply that is not JSON
            last = type(exc).__name__
        log.warning(f"{what} attempt failed", extra={"attempt": attempt + 1, "error": last})
    raise error(f"{what} failed {retries + 1} times (last: {last})", True)
