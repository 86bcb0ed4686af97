"""The kiosk gateway's limits over real HTTP on loopback (uvicorn, the gateway's app; the MFA is a
dead address: every limit acts before the MFA is asked): the per-client rate limit in memory and in
the local Redis (with a clock the test moves), the lingering close after a refusal while the body is
still coming, the head and body timeouts against slow clients, and the connection limit."""

from __future__ import annotations

import hashlib
import http.client
import json
import socket
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from services.kiosk.ratelimit import RateLimitStoreError
from services.kiosk.server import KioskServer
from tests.conftest import make_settings, require_redis
from tests.web.conftest import KIOSK_KEY

DIGEST = hashlib.sha256(KIOSK_KEY.encode()).hexdigest()
REDIS = "redis://127.0.0.1:6379/0"


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@contextmanager
def gateway(data: Path, clock: Clock | None = None, **kiosk) -> Iterator[KioskServer]:
    cfg = {"tenant": "bank-k", "mfa_token": "tok", "mfa_target": "127.0.0.1:9", **kiosk}
    server = KioskServer(make_settings(data, kiosk=cfg), DIGEST, port=0, clock=clock or Clock()).start()
    try:
        yield server
    finally:
        server.stop()


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def request(url: str, path: str = "/v1/sessions", source: str = "127.0.0.1",
            headers: dict[str, str] | None = None, method: str = "POST") -> tuple[int, dict, dict[str, str]]:
    """``method`` ``path`` from ``source``; a POST carries no kiosk key (401 once past the rate limit)."""
    where = urllib.parse.urlsplit(url)
    assert where.hostname, url
    conn = http.client.HTTPConnection(where.hostname, where.port, timeout=30, source_address=(source, 0))
    try:
        conn.request(method, path, body=b'{"customer": "c-1"}' if method == "POST" else None, headers={"Content-Type": "application/json",
                                                                         **(headers or {})})
        r = conn.getresponse()
        data, headers = r.read(), {k.lower(): v for k, v in r.getheaders()}
        body = json.loads(data) if headers["content-type"] == "application/json" else {"text": data.decode()}
        return r.status, body, headers
    finally:
        conn.close()


def test_a_client_over_its_bucket_gets_429_with_retry_after_until_it_refills(tmp_path):
    clock = Clock()
    before = metric("biogate_kiosk_rate_limited_total", bucket="address")
    with gateway(tmp_path, clock, rate_limit={"capacity": 3, "refill_per_s": 0.5}, metrics_port=0) as gw:
        assert [request(gw.url)[0] for _ in range(3)] == [401] * 3  # the burst, then the key is checked
        status, body, headers = request(gw.url)
        assert (status, body["reason"], headers["retry-after"]) == (429, "RATE_LIMITED", "2")  # 1 token at 0.5/s
        assert headers["x-content-type-options"] == "nosniff"  # the outermost layer marks the limiter's refusal too
        assert headers["connection"] == "close"
        assert request(gw.url, "/")[0] == 429  # the page too: every request takes a token
        clock.now += 1.5
        assert request(gw.url)[:1] == (429,) and request(gw.url)[2]["retry-after"] == "1"  # 0.75 token: 0.5 s
        # the kubelet's probes (one node address for every pod on it) take no token
        assert [request(gw.url, "/healthz", method="GET")[:2] for _ in range(5)] == [(200, {"status": "serving"})] * 5
        clock.now += 0.5
        assert request(gw.url)[0] == 401  # one token again
        assert request(gw.url)[0] == 429
        assert metric("biogate_kiosk_rate_limited_total", bucket="address") - before == 5
        assert gw.metrics is not None  # and the gateway serves the counter
        scrape = http.client.HTTPConnection("127.0.0.1", gw.metrics.server_port, timeout=10)
        scrape.request("GET", "/")
        assert 'biogate_kiosk_rate_limited_total{bucket="address"}' in scrape.getresponse().read().decode()
        scrape.close()


def test_each_source_address_and_each_named_device_has_its_own_bucket(tmp_path):
    before = metric("biogate_kiosk_rate_limited_total", bucket="device")
    limits = {"capacity": 2, "refill_per_s": 0.01, "device_header": "X-Kiosk-Device"}
    with gateway(tmp_path, rate_limit=limits) as gw:
        k1, k2 = {"X-Kiosk-Device": "kiosk-1"}, {"X-Kiosk-Device": "kiosk-2"}
        assert [request(gw.url, headers=k1)[0] for _ in range(2)] == [401, 401]
        assert request(gw.url)[0] == 429  # 127.0.0.1's bucket is empty, device or not
        status, body, _ = request(gw.url, source="127.0.0.2", headers=k1)  # another address, the same device
        assert status == 429 and "from this device" in body["message"]
        assert request(gw.url, source="127.0.0.3", headers=k2)[0] == 401
        assert request(gw.url, source="127.0.0.2")[0] == 401  # its address bucket was not charged by the refusal
    assert metric("biogate_kiosk_rate_limited_total", bucket="device") - before == 1


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    import redis

    require_redis(REDIS)
    prefix = f"biogate:test:kiosk:{uuid.uuid4().hex}"
    yield prefix
    client = redis.Redis.from_url(REDIS)
    for key in client.scan_iter(f"{prefix}:*"):
        client.delete(key)


def test_replicas_share_the_buckets_in_redis_and_each_bucket_expires(tmp_path, redis_prefix):
    import redis

    clock = Clock()
    limits = {"capacity": 2, "refill_per_s": 0.25, "store": REDIS, "key_prefix": redis_prefix}
    with gateway(tmp_path / "a", clock, rate_limit=limits) as a, gateway(tmp_path / "b", clock, rate_limit=limits) as b:
        assert (request(a.url)[0], request(b.url)[0]) == (401, 401)
        status, _, headers = request(a.url)
        assert (status, headers["retry-after"]) == (429, "4")
        assert request(b.url)[0] == 429  # the other replica sees the same empty bucket
        clock.now += 4
        assert request(b.url)[0] == 401 and request(a.url)[0] == 429
    client = redis.Redis.from_url(REDIS)
    (key,) = client.scan_iter(f"{redis_prefix}:*")
    assert key.decode() == f"{redis_prefix}:address:127.0.0.1"
    assert 0 < client.ttl(key) <= 2 / 0.25 + 1  # gone once it would be full again
    with pytest.raises(RateLimitStoreError, match="kiosk.rate_limit.store: Redis cannot be reached"):
        KioskServer(make_settings(tmp_path / "c", kiosk={"tenant": "t", "mfa_token": "t", "rate_limit": {
            "store": "redis://127.0.0.1:9/0"}}), DIGEST, port=0)


def test_a_redis_failing_after_the_start_is_counted_and_the_process_buckets_take_over(tmp_path):
    """A Redis of the test's own (redis-server on a free port), stopped after the first request."""
    import shutil
    import subprocess

    from tests.conftest import require

    require(shutil.which("redis-server") is not None, "redis-server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no"], stdout=subprocess.PIPE, text=True)
    try:
        for line in server.stdout:  # type: ignore[union-attr]
            if "Ready to accept connections" in line:
                break
        before = metric("biogate_kiosk_rate_limit_store_errors_total")
        limits = {"capacity": 2, "refill_per_s": 0.01, "store": f"redis://127.0.0.1:{port}/0"}
        with gateway(tmp_path, rate_limit=limits) as gw:
            assert request(gw.url)[0] == 401  # a token from the Redis bucket
            server.terminate()
            server.wait(30)
            assert [request(gw.url)[0] for _ in range(3)] == [401, 401, 429]  # this process's bucket: 2 tokens
        assert metric("biogate_kiosk_rate_limit_store_errors_total") - before == 3
    finally:
        if server.poll() is None:
            server.terminate()
            server.wait(30)


def raw(url: str) -> socket.socket:
    where = urllib.parse.urlsplit(url)
    return socket.create_connection((where.hostname, where.port), timeout=60)


def read_all(sock: socket.socket) -> bytes:
    """What the gateway sends until it closes (a socket timeout, 60 s: it never closed)."""
    return b"".join(iter(lambda: sock.recv(65536), b""))


def test_a_refused_upload_still_being_sent_gets_its_answer_not_a_reset(tmp_path):
    """Lingering close: a client sends a frame declared at 100 MB and keeps sending while the gateway
    answers 413 from the headers. The gateway closed at once with the sent bytes unread, the kernel
    reset the connection, and the client (here after about 3 MB of 8) got ECONNRESET instead of the 413.
    Now it shuts its sending side and drops what still arrives until the client closes."""
    before = metric("biogate_kiosk_connections_closed_total", reason="lingering")
    with gateway(tmp_path) as gw, raw(gw.url) as sock:
        sock.sendall(f"POST /v1/sessions/ses_x/face HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KIOSK_KEY}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {100 * 2**20}\r\n\r\n".encode())
        for _ in range(128):
            sock.sendall(b"A" * 65536)  # 8 MB, after the answer was sent
        sock.shutdown(socket.SHUT_WR)
        answer = read_all(sock)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 ") and json.loads(body)["reason"] == "IMAGE_TOO_LARGE"
    assert metric("biogate_kiosk_connections_closed_total", reason="lingering") - before == 1


def test_slow_and_silent_clients_are_answered_408_and_closed(tmp_path):
    """Slowloris: a head that never ends, a connection that sends nothing, a body that stops coming.
    Without the limits the gateway held each connection for ever (the read here timed out)."""
    head_before = metric("biogate_kiosk_connections_closed_total", reason="head_timeout")
    body_before = metric("biogate_kiosk_connections_closed_total", reason="body_timeout")
    limits = {"head_timeout_s": 0.5, "body_timeout_s": 0.5, "keep_alive_s": 0.5}
    with gateway(tmp_path, http=limits) as gw:
        with raw(gw.url) as sock:
            sock.sendall(b"POST /v1/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and no more
            answer = read_all(sock)
        assert answer.startswith(b"HTTP/1.1 408 ") and b'"REQUEST_TIMEOUT"' in answer
        assert b"x-content-type-options: nosniff" in answer.lower()  # written by the connection, marked too
        with raw(gw.url) as sock:  # nothing at all
            assert read_all(sock).startswith(b"HTTP/1.1 408 ")
        with raw(gw.url) as sock:
            sock.sendall(f"POST /v1/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KIOSK_KEY}\r\n"
                         "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"cus".encode())
            answer = read_all(sock)
        assert answer.startswith(b"HTTP/1.1 408 ") and b"body did not arrive" in answer
        with raw(gw.url) as sock:  # one whole request, then silence: answered, then closed after keep_alive_s
            sock.sendall(b"GET /kiosk.css HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            answer = read_all(sock)
        assert answer.startswith(b"HTTP/1.1 200 ") and answer.count(b"HTTP/1.1") == 1
        with raw(gw.url) as sock:  # a whole request and, in the same packet, a body that stops coming
            sock.sendall(b"GET /kiosk.css HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
                         b"POST /v1/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n{")
            answer = read_all(sock)
        assert answer.startswith(b"HTTP/1.1 200 ") and b"HTTP/1.1 408 " in answer
    assert metric("biogate_kiosk_connections_closed_total", reason="head_timeout") - head_before == 2
    assert metric("biogate_kiosk_connections_closed_total", reason="body_timeout") - body_before == 2


def refused_on_accept(gw) -> tuple[bytes, dict]:
    """A connection that sends nothing is answered 503 TOO_MANY_CONNECTIONS and closed: (its head in
    lower case, its JSON body)."""
    with raw(gw.url) as sock:
        head, _, data = read_all(sock).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 ") and b"connection: close" in head.lower()
    body = json.loads(data)
    assert body["reason"] == "TOO_MANY_CONNECTIONS"
    return head.lower(), body


def refusals_until_released(gw) -> int:
    """Requests until one is served once held connections were closed (the gateway sees the closes on
    its own loop): how many more were refused meanwhile."""
    for refused in range(100):
        try:
            if request(gw.url, "/kiosk.css", method="GET")[0] == 200:
                return refused
        except ConnectionError:  # refused: closed before the request was read
            pass
        time.sleep(0.1)
    raise AssertionError("the held connections were never released")


def test_connections_beyond_max_connections_are_answered_503_in_json_at_once(tmp_path):
    """uvicorn's own limit answered a plain-text 503 once the request had been read."""
    before = metric("biogate_kiosk_connections_refused_total", reason="total")
    with gateway(tmp_path, http={"max_connections": 2, "max_connections_per_ip": 8, "head_timeout_s": 600}) as gw:
        idle = [raw(gw.url), raw(gw.url)]
        try:
            head, body = refused_on_accept(gw)
            assert b"retry-after: 1" in head and b"content-type: application/json" in head
        finally:
            for sock in idle:
                sock.close()
        refused = 1 + refusals_until_released(gw)
    assert metric("biogate_kiosk_connections_refused_total", reason="total") - before == refused


def test_x_forwarded_for_names_the_client_only_from_a_configured_proxy(tmp_path):
    """uvicorn trusts X-Forwarded-For from 127.0.0.1 unless told otherwise: the kiosk's page (or any
    local caller) could then have had a fresh bucket for each address it made up."""
    limits = {"capacity": 1, "refill_per_s": 0.01}
    forged = [{"X-Forwarded-For": f"10.9.0.{i}"} for i in range(3)]
    with gateway(tmp_path / "a", rate_limit=limits) as gw:
        assert [request(gw.url, headers=h)[0] for h in forged] == [401, 429, 429]
    with gateway(tmp_path / "b", rate_limit=limits, forwarded_allow_ips=["127.0.0.1/32"]) as gw:
        assert [request(gw.url, headers=h)[0] for h in forged] == [401, 401, 401]  # the proxy's clients
        assert request(gw.url, headers=forged[0])[0] == 429
        untrusted = [request(gw.url, source="127.0.0.2", headers=h)[0] for h in forged]
        assert untrusted == [401, 429, 429]  # from elsewhere the header is ignored


@pytest.mark.parametrize("trusted", [["*"], ["0.0.0.0/0"], ["10.244.0.0/16", "::/0"], ["ingress-nginx"]])
def test_a_proxy_list_that_trusts_every_address_is_refused_at_load(tmp_path, trusted):
    """With "*" (uvicorn's "trust everything", the usual advice behind a proxy) or a /0, uvicorn takes
    the leftmost X-Forwarded-For entry, which the client writes: each request made up an address and
    had a fresh bucket (the rate limit was off). A name is not an address uvicorn can match."""
    with pytest.raises(ValueError, match="forwarded_allow_ips") as err:
        make_settings(tmp_path, kiosk={"tenant": "bank-k", "mfa_token": "tok", "forwarded_allow_ips": trusted})
    assert "address or CIDR" in str(err.value) or "every address" in str(err.value)


def test_frames_beyond_max_frames_are_answered_503_at_once_and_other_calls_go_on(tmp_path):
    """Each frame held costs up to about 30 MiB: a frame still arriving holds the only slot."""
    before = metric("biogate_kiosk_frames_busy_total")
    face, auth = f"/v1/sessions/ses_{'0' * 32}/face", {"Authorization": f"Bearer {KIOSK_KEY}"}
    frame = json.dumps({"image_b64": "iVBORw0KGgo="}).encode()

    def post_frame(url: str) -> tuple[int, dict, dict[str, str]]:
        where = urllib.parse.urlsplit(url)
        assert where.hostname, url
        conn = http.client.HTTPConnection(where.hostname, where.port, timeout=60)
        try:
            conn.request("POST", face, body=frame, headers={"Content-Type": "application/json", **auth})
            r = conn.getresponse()
            return r.status, json.loads(r.read()), {k.lower(): v for k, v in r.getheaders()}
        finally:
            conn.close()

    # A bucket these retries cannot empty: on a loaded machine the gateway took long enough to read the
    # holder's head that the default 20 calls ran out and the retries were refused 429 RATE_LIMITED.
    with gateway(tmp_path, http={"max_frames": 1}, rate_limit={"capacity": 1000}) as gw:
        with raw(gw.url) as holder:
            holder.sendall(f"POST {face} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KIOSK_KEY}\r\n"
                           "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{".encode())
            for _ in range(600):  # until the gateway has read the holder's head (seconds on a loaded machine)
                status, body, headers = post_frame(gw.url)
                if body["reason"] == "FRAMES_BUSY":
                    break
                time.sleep(0.1)
            assert (status, body["reason"], headers.get("retry-after")) == (503, "FRAMES_BUSY", "1"), body
            assert request(gw.url)[0] == 401  # calls other than a frame are not held back
        for _ in range(600):  # the holder went away: its slot is free once the gateway sees it
            status, body, _ = post_frame(gw.url)
            if body["reason"] != "FRAMES_BUSY":
                break
            time.sleep(0.1)
        assert (status, body["reason"]) == (503, "UNAVAILABLE")  # read, decoded, and sent to the (dead) MFA
    assert metric("biogate_kiosk_frames_busy_total") - before >= 1


def test_a_request_naming_another_host_is_refused_before_any_handler(tmp_path):
    """DNS rebinding: a page of evil.example, its name re-pointed at the gateway's address, calls the
    gateway from the kiosk's browser as its own origin. Its requests name evil.example in Host, and
    the gateway answered them (the page too, and the API to whoever held the key)."""
    with gateway(tmp_path / "a", rate_limit={"capacity": 1000}) as gw:
        port = urllib.parse.urlsplit(gw.url).port
        for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.nip.io", "[::2]", "kiosk@127.0.0.1", ""):
            for path, method in (("/v1/sessions", "POST"), ("/", "GET"), ("/openapi.json", "GET")):
                status, body, headers = request(gw.url, path, headers={"Host": host}, method=method)
                assert (status, body["reason"]) == (421, "HOST_NOT_ALLOWED"), (host, path)
                assert "kiosk.allowed_hosts" in body["message"] and headers["x-content-type-options"] == "nosniff"
        # the defaults: this machine's loopback names, on any port, in any case
        for host in ("127.0.0.1", f"localhost:{port}", f"[::1]:{port}", "LocalHost", "localhost."):
            assert request(gw.url, headers={"Host": host})[0] == 401, host
        # the kubelet's probes name the pod's address
        assert request(gw.url, "/healthz", headers={"Host": f"10.244.1.7:{port}"}, method="GET")[0] == 200
    with gateway(tmp_path / "b", allowed_hosts=["kiosk.bank-a.internal", "10.1.2.3"]) as gw:
        assert request(gw.url, headers={"Host": "kiosk.bank-a.internal"})[0] == 401
        assert request(gw.url, headers={"Host": "10.1.2.3:443"})[0] == 401
        assert request(gw.url, headers={"Host": "127.0.0.1"})[0] == 421  # configured names replace the defaults


@pytest.mark.parametrize("hosts,why", [
    (["*"], "answers every name"), (["kiosk.bank-a.internal", "*"], "answers every name"),
    (["https://kiosk.bank-a.internal"], "host name or address"), (["kiosk.bank-a.internal:443"], "host name or address"),
    ([], "no host name")])
def test_an_allowed_hosts_list_that_defends_nothing_or_names_no_host_is_refused_at_load(tmp_path, hosts, why):
    with pytest.raises(ValueError, match="kiosk.allowed_hosts") as err:
        make_settings(tmp_path, kiosk={"tenant": "bank-k", "mfa_token": "tok", "allowed_hosts": hosts})
    assert why in str(err.value)


def test_one_address_holds_at_most_max_connections_per_ip_and_the_excess_is_refused_at_once(tmp_path):
    """One client opened connections up to max_connections (64) and every other client got 503."""
    before = metric("biogate_kiosk_connections_refused_total", reason="per_address")
    with gateway(tmp_path, http={"max_connections_per_ip": 2, "head_timeout_s": 600}) as gw:
        held = [raw(gw.url), raw(gw.url)]
        try:
            head, body = refused_on_accept(gw)
            assert b"x-content-type-options: nosniff" in head
            assert "max_connections_per_ip" not in body["message"]  # a client's message, not the setting
            assert request(gw.url, "/kiosk.css", source="127.0.0.2", method="GET")[0] == 200  # another address
        finally:
            for sock in held:
                sock.close()
        refused = 1 + refusals_until_released(gw)
    assert metric("biogate_kiosk_connections_refused_total", reason="per_address") - before == refused


def test_an_ipv6_client_has_a_bucket_per_64_and_an_ipv4_mapped_one_its_ipv4_bucket(tmp_path):
    """A bucket per IPv6 address gave a host holding a /64 (any home line) 2^64 buckets."""
    limits = {"capacity": 1, "refill_per_s": 0.01}
    with gateway(tmp_path / "a", rate_limit=limits, forwarded_allow_ips=["127.0.0.1/32"]) as gw:
        def via(client: str) -> int:
            return request(gw.url, headers={"X-Forwarded-For": client})[0]
        assert via("2001:db8:1:2::1") == 401
        assert via("2001:db8:1:2:ffff:ffff:ffff:fffe") == 429  # the same /64
        assert via("2001:db8:1:3::1") == 401  # the next /64
        assert via("10.0.0.7") == 401
        assert via("::ffff:10.0.0.7") == 429  # an IPv4 client seen through an IPv6 socket
        assert via("10.0.0.8") == 401  # IPv4: each address its own bucket
    with gateway(tmp_path / "b", rate_limit={**limits, "ipv6_prefix_length": 48},
                 forwarded_allow_ips=["127.0.0.1/32"]) as gw:
        assert [request(gw.url, headers={"X-Forwarded-For": c})[0] for c in
                ("2001:db8:1:2::1", "2001:db8:1:3::1", "2001:db8:2::1")] == [401, 429, 401]
