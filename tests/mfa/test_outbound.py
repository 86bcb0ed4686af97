"""Outbound POSTs (services/common/outbound.py: SMS gateway, FCM, the bank's webhooks) against hostile
receivers on loopback: raw sockets answering what a broken or malicious endpoint would, a slow one,
a redirecting one, and TLS with a certificate nobody vouches for."""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from services.common import outbound
from services.common.outbound import MAX_REPLY, PostFailed, post_once
from services.mfa.sms import HttpSmsGateway, SmsError
from tests.mfa.hostile import RawServer, finishes, trickle


@pytest.fixture
def serve() -> Iterator[Callable[[Callable[[socket.socket], None]], RawServer]]:
    servers: list[RawServer] = []

    def start(answer: Callable[[socket.socket], None]) -> RawServer:
        servers.append(RawServer(answer))
        return servers[-1]
    yield start
    for s in servers:
        s.close()


# --- a receiver trickling its answer must not hold the caller's thread for ever -------------------

@pytest.mark.parametrize("where", ["head", "body"])
def test_a_receiver_trickling_its_answer_is_cut_off_by_the_timeout(serve, where):
    stop = threading.Event()
    start = b"HTTP/1.1 200 OK\r\nX-Slow: " if where == "head" else \
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 60000\r\n\r\n"
    srv = serve(trickle(stop, start))
    try:
        exc = finishes(lambda: post_once(srv.url, b"{}", {"Content-Type": "application/json"}, 0.5))
    finally:
        stop.set()
    assert isinstance(exc, PostFailed) and exc.transient and str(exc) == "TimeoutError"


def test_a_trickling_sms_gateway_ends_in_an_sms_error_not_a_held_rpc(serve):
    stop = threading.Event()
    srv = serve(trickle(stop, b"HTTP/1.1 200 OK\r\n"))
    try:
        exc = finishes(lambda: HttpSmsGateway(srv.url, "tok", timeout_s=0.3, retries=1, backoff_s=0.01)
                       .send("+15551234567", "123456", "otp-1"))
    finally:
        stop.set()
    assert isinstance(exc, SmsError) and exc.transient and "+1555" not in str(exc)


# --- a receiver answering what is not HTTP is a failed attempt, never an exception of http.client --

GARBAGE = {
    "not HTTP": b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
    "101 headers": b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(101)) + b"\r\n",
    "a header line over 64 KiB": b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n",
    "a broken chunk": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n",
}


@pytest.mark.parametrize("answer", GARBAGE.values(), ids=GARBAGE.keys())
def test_a_malformed_answer_is_a_transient_post_failure(serve, answer):
    srv = serve(lambda conn: conn.sendall(answer))
    exc = finishes(lambda: post_once(srv.url, b"{}", {}, 2.0))
    assert isinstance(exc, PostFailed) and exc.transient, repr(exc)


def test_a_malformed_sms_gateway_answer_is_an_sms_error(serve):
    srv = serve(lambda conn: conn.sendall(GARBAGE["not HTTP"]))
    exc = finishes(lambda: HttpSmsGateway(srv.url, "tok", timeout_s=1, retries=1, backoff_s=0.01)
                   .send("+15551234567", "123456", "otp-1"))
    assert isinstance(exc, SmsError) and exc.transient and srv.connections == 2, repr(exc)


def test_a_huge_answer_is_read_only_up_to_the_bound(serve):
    size = MAX_REPLY * 16
    srv = serve(lambda conn: conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + b"x" * size))
    assert len(post_once(srv.url, b"{}", {}, 2.0)) == MAX_REPLY


# --- redirects and TLS --------------------------------------------------------------------------

class Recorder:
    """A plain HTTP server recording what reaches it; its POSTs answer ``status`` with ``location``."""

    def __init__(self, status: int = 200, location: str = "") -> None:
        self.seen: list[tuple[str, str, str | None]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _any(self) -> None:
                outer.seen.append((self.command, self.path, self.headers.get("Authorization")))
                self.send_response(status)
                if location:
                    self.send_header("Location", location)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            do_GET = do_POST = _any

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_is_refused_and_the_credentials_never_reach_its_target(status):
    elsewhere = Recorder()
    bouncer = Recorder(status, elsewhere.url + "latest/meta-data/")
    try:
        with pytest.raises(SmsError) as err:
            HttpSmsGateway(bouncer.url, "sms-api-key", timeout_s=1, retries=2, backoff_s=0.01).send(
                "+15551234567", "123456", "otp-1")
        assert not err.value.transient and f"HTTP {status}" in str(err.value)
        assert len(bouncer.seen) == 1 and elsewhere.seen == []
    finally:
        elsewhere.close()
        bouncer.close()


def self_signed(tmp_path: Path, dns_name: str | None = None) -> ssl.SSLContext:
    """A server context for 127.0.0.1 (or ``dns_name``) whose certificate (tmp_path/cert.pem) no CA
    vouches for."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_name or "127.0.0.1")])
    alt = x509.DNSName(dns_name) if dns_name else x509.IPAddress(ipaddress.ip_address("127.0.0.1"))
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([alt]), critical=False)
            .sign(key, hashes.SHA256()))
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                         serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    return ctx


def test_an_endpoint_whose_certificate_nobody_vouches_for_never_sees_the_message(tmp_path):
    server = Recorder()
    server.server.socket = self_signed(tmp_path).wrap_socket(server.server.socket, server_side=True)
    url = server.url.replace("http://", "https://")
    try:
        with pytest.raises(PostFailed) as err:
            post_once(url, b'{"to": "+15551234567"}', {"Authorization": "Bearer sms-api-key"}, 2.0)
        assert err.value.transient and server.seen == []
    finally:
        server.close()


def test_a_header_value_with_a_line_break_is_refused_before_anything_is_sent(serve):
    srv = serve(lambda conn: conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"))
    with pytest.raises(PostFailed):
        post_once(srv.url, b"{}", {"Idempotency-Key": "k\r\nX-Injected: 1"}, 2.0)
    assert srv.connections == 0


def test_over_tls_a_vouched_for_endpoint_answers_and_a_trickling_one_is_cut_off(tmp_path, monkeypatch):
    """The same bound through TLS (the deadline watches a duplicate of the socket TLS wraps), with the
    test's certificate trusted as a bank's private CA would be."""
    server_ctx = self_signed(tmp_path)
    client_ctx = ssl.create_default_context(cafile=str(tmp_path / "cert.pem"))
    monkeypatch.setattr(outbound, "_TLS", client_ctx)
    stop = threading.Event()
    trickling = [False]

    def answer(conn: socket.socket) -> None:
        if trickling[0]:
            trickle(stop, b"HTTP/1.1 200 OK\r\nContent-Length: 60000\r\n\r\n")(conn)
        else:
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n{\"id\": \"m\"}")

    srv = RawServer(answer, tls=server_ctx)
    try:
        url = srv.url
        assert post_once(url, b"{}", {}, 5.0) == b'{"id": "m"}'
        trickling[0] = True
        exc = finishes(lambda: post_once(url, b"{}", {}, 0.5))
        assert isinstance(exc, PostFailed) and str(exc) == "TimeoutError"
    finally:
        stop.set()
        srv.close()


# --- name resolution is inside the attempt's deadline, and TLS still checks the host name -----------

@pytest.fixture
def resolver(monkeypatch) -> Iterator[dict[str, str | None]]:
    """socket.getaddrinfo (the boundary where Python meets the system's resolver; no slow DNS server
    can be made on loopback without changing the machine's resolv.conf) with test host names: one
    mapped to an address, or to None, a lookup that hangs until the test ends. Other names go to the
    real resolver."""
    names: dict[str, str | None] = {}
    release = threading.Event()
    real = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):
        if host not in names:
            return real(host, port, *args, **kwargs)
        address = names[host]
        if address is None:
            release.wait(60)
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return real(address, port, *args, **kwargs)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield names
    release.set()


def test_a_resolver_that_hangs_is_cut_off_by_the_attempts_timeout(serve, resolver):
    """getaddrinfo ran inside socket.create_connection, before the deadline watched anything: a hung
    resolver held the caller (an RPC's thread, the webhook worker) for as long as it hung."""
    resolver["hooks.bank-a.test"] = None
    srv = serve(lambda conn: conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"))
    url = f"http://hooks.bank-a.test:{srv.port}/hook"
    for _ in range(6):  # more than the resolver threads: the later lookups queue, and give up alike
        exc = finishes(lambda: post_once(url, b"{}", {}, 0.3), within_s=20)
        assert isinstance(exc, PostFailed) and exc.transient and str(exc) == "TimeoutError", repr(exc)
    assert srv.connections == 0


def test_a_resolved_name_is_connected_to_and_tls_checks_the_name_not_the_address(tmp_path, monkeypatch, resolver):
    """The connection goes to the address resolved, while the TLS layer still sends the host name
    and checks the certificate against it: one for another name is refused."""
    resolver["hooks.bank-a.test"] = resolver["other.bank-a.test"] = "127.0.0.1"
    server_ctx = self_signed(tmp_path, "hooks.bank-a.test")
    monkeypatch.setattr(outbound, "_TLS", ssl.create_default_context(cafile=str(tmp_path / "cert.pem")))
    names: list[str | None] = []
    server_ctx.sni_callback = lambda sock, name, ctx: names.append(name)
    srv = RawServer(lambda conn: conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"), tls=server_ctx)
    try:
        assert post_once(f"https://hooks.bank-a.test:{srv.port}/hook", b"{}", {}, 5.0) == b"{}"
        assert names == ["hooks.bank-a.test"]
        with pytest.raises(PostFailed) as err:
            post_once(f"https://other.bank-a.test:{srv.port}/hook", b"{}", {}, 5.0)
        assert err.value.transient and str(err.value) == "SSLCertVerificationError"
    finally:
        srv.close()


def test_the_openers_classes_are_made_once_not_on_every_attempt():
    """Four classes (two connections, two handlers) were defined on every attempt: a type object,
    its method cache and a urllib handler class more per POST, kept until the garbage collector's
    cycle pass (a class refers to itself through its MRO)."""
    def kinds() -> set[type]:
        with outbound._Deadline(1.0) as deadline:
            return {type(h) for h in vars(outbound._opener(deadline))["handlers"]}
    assert kinds() == kinds()
