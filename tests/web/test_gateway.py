"""The kiosk gateway's REST API against a real MFA (its face service unreachable: no models): the
kiosk's key, the generated OpenAPI document, input checks, and the MFA's rules passing through."""

from __future__ import annotations

import base64
import http.client
import json
import socket
import urllib.error
import urllib.parse
import urllib.request

import pytest

from tests.web.conftest import BANK_TOKEN, KIOSK_KEY, KioskStack

PNG = (base64.b64decode(  # a 1x1 image: any bytes will do where the face service is unreachable
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="))


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = KioskStack(tmp_path_factory.mktemp("kiosk-api"))
    yield s
    s.close()


def call(url: str, body: dict | None = None, key: str | None = KIOSK_KEY, method: str = "POST"):
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    data = json.dumps(body or {}).encode() if method == "POST" else None
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data, headers, method=method), timeout=30) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null"), dict(err.headers)


def test_every_api_call_needs_the_kiosks_key(stack):
    for key in (None, "another-key", KIOSK_KEY[:-1]):
        status, body, headers = call(stack.url + "/v1/sessions", {"customer": "cust-1"}, key=key)
        assert status == 401 and body["reason"] == "KIOSK_KEY_REQUIRED" and headers["www-authenticate"] == "Bearer"
        assert headers["x-content-type-options"] == "nosniff"
    # the page itself is public (it holds no secret) and loads nothing from elsewhere
    with urllib.request.urlopen(stack.url + "/", timeout=10) as r:
        assert "default-src 'self'" in r.headers["Content-Security-Policy"] and b"kiosk.js" in r.read()
        assert r.headers["X-Content-Type-Options"] == "nosniff"


def test_the_openapi_document_describes_the_flow_and_its_authentication(stack):
    status, doc, _ = call(stack.url + "/openapi.json", method="GET", key=None)
    assert status == 200 and doc["openapi"].startswith("3.")
    assert set(doc["paths"]) == {"/v1/sessions", "/v1/sessions/{session_id}/face", "/v1/sessions/{session_id}/otp/send",
                                 "/v1/sessions/{session_id}/otp", "/v1/sessions/{session_id}/decision"}
    assert doc["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert all(op["security"] == [{"HTTPBearer": []}] for path in doc["paths"].values() for op in path.values())
    decision = doc["components"]["schemas"]["DecisionOut"]["properties"]
    assert set(decision["outcome"]["enum"]) >= {"ALLOW", "DENY", "STEP_UP", "REVIEW"}


def test_bad_input_is_refused_with_the_field_named_before_the_mfa_is_asked(stack):
    status, body, _ = call(stack.url + "/v1/sessions", {"customer": "+8613800138000"})  # a phone number
    assert status == 400 and body["reason"] == "INVALID_ARGUMENT" and "customer" in body["fields"]
    status, body, _ = call(stack.url + "/v1/sessions", {"customer": "cust-1", "tenant": "other-bank"})
    assert status == 400 and "tenant" in body["fields"]  # the kiosk's bank is the gateway's, not the page's
    status, body, _ = call(stack.url + "/v1/sessions/ses_x/face", {"image_b64": "not base64!"})
    assert status == 400 and body["reason"] == "MALFORMED_IMAGE"
    status, body, _ = call(stack.url + "/v1/sessions/ses_nope/decision")  # the MFA's own checks, as JSON
    assert status == 400 and body["fields"] == {"session_id": "malformed"} and "not a session id" in body["message"]
    status, body, _ = call(stack.url + f"/v1/sessions/ses_{'0' * 32}/decision")
    assert (status, body["reason"]) == (404, "SESSION_NOT_FOUND")


def test_the_gateway_submits_as_the_kiosk_terminal_and_the_mfas_rules_stand(stack, tmp_path):
    stack.customer("cust-api-1", "+8613800135101")
    status, s, _ = call(stack.url + "/v1/sessions", {"customer": "cust-api-1"})
    assert status == 200 and s["acceptable"] == [["face", "sms_otp"]]  # the default policy's kiosk login
    status, face, _ = call(stack.url + f"/v1/sessions/{s['session_id']}/face",
                           {"image_b64": base64.b64encode(PNG).decode()})
    assert status == 200 and not face["passed"]
    assert [r["code"] for r in face["reasons"]] == ["FACE_SERVICE_UNAVAILABLE"]
    status, d, _ = call(stack.url + f"/v1/sessions/{s['session_id']}/decision")
    assert status == 200 and d["outcome"] != "ALLOW" and d["token"] == ""
    # a gateway holding credentials that are no kiosk terminal's gets nothing past the MFA
    other = KioskStack(tmp_path, mfa_token=BANK_TOKEN)
    try:
        other.customer("cust-api-2", "+8613800135102")
        status, s, _ = call(other.url + "/v1/sessions", {"customer": "cust-api-2"})
        status, body, _ = call(other.url + f"/v1/sessions/{s['session_id']}/face",
                               {"image_b64": base64.b64encode(PNG).decode()})
        assert status == 403 and body["reason"] == "TERMINAL_NOT_REGISTERED"
    finally:
        other.close()


def raw_post(url: str, path: str, head: dict[str, str], chunks=()) -> tuple[int, dict, dict]:
    """POST the headers ``head`` and then ``chunks`` (chunked encoding), never the end of the body,
    and read the answer to the connection's close: a gateway that waits for the whole body before
    it answers never answers (the read times out)."""
    where = urllib.parse.urlsplit(url)
    with socket.create_connection((where.hostname, where.port), timeout=30) as sock:
        lines = [f"POST {path} HTTP/1.1", f"Host: {where.netloc}", f"Authorization: Bearer {KIOSK_KEY}",
                 "Content-Type: application/json", *(f"{k}: {v}" for k, v in head.items())]
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        for chunk in chunks:
            sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        answer = b"".join(iter(lambda: sock.recv(65536), b""))
    head_text, _, body = answer.partition(b"\r\n\r\n")
    status_line, *header_lines = head_text.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    return int(status_line.split()[1]), json.loads(body), headers


def test_an_oversized_body_is_refused_before_it_is_read(stack):
    """The frame's size was checked after the whole body had been read into memory: a 100 MB
    Content-Length is refused from its headers, a chunked body once it passes the limit."""
    from services.kiosk.gateway import SMALL_BODY, body_limit

    face = f"/v1/sessions/ses_{'0' * 32}/face"
    limit = body_limit(face, 4 * 1024 * 1024)  # kiosk.max_image_bytes as configured: the default
    status, body, headers = raw_post(stack.url, face, {"Content-Length": str(100 * 1024 * 1024)})
    assert (status, body["reason"], headers["connection"]) == (413, "IMAGE_TOO_LARGE", "close")
    assert f"over {4 * 1024 * 1024} bytes" in body["message"]
    # Exactly one byte over the limit: the gateway then reads all that was sent before it answers
    # and closes; bytes left unread in its socket would make the close a reset that can destroy
    # the answer before the client reads it.
    prefix, piece = b'{"image_b64": "', b"A" * 65536
    pieces, rest = divmod(limit + 1 - len(prefix), len(piece))
    status, body, _ = raw_post(stack.url, face, {"Transfer-Encoding": "chunked"},
                               [prefix] + [piece] * pieces + [piece[:rest]] * bool(rest))
    assert (status, body["reason"]) == (413, "IMAGE_TOO_LARGE")
    status, body, _ = raw_post(stack.url, "/v1/sessions", {"Content-Length": str(SMALL_BODY + 1)})
    assert (status, body["reason"]) == (413, "REQUEST_TOO_LARGE")
    # a frame within the limit is still read whole and passed on (here: to an unknown session)
    status, body, _ = call(stack.url + face, {"image_b64": base64.b64encode(b"x" * (3 * 1024 * 1024)).decode()})
    assert (status, body["reason"]) == (404, "SESSION_NOT_FOUND")


def test_a_gateway_without_its_bank_or_its_terminal_credentials_does_not_start(tmp_path):
    from services.kiosk.server import KioskServer, client_key_digest
    from tests.conftest import make_settings

    digest = "0" * 64
    with pytest.raises(ValueError, match="kiosk.mfa_token"):
        KioskServer(make_settings(tmp_path, kiosk={"tenant": "bank-a"}), digest)
    with pytest.raises(ValueError, match="kiosk.tenant"):
        KioskServer(make_settings(tmp_path, kiosk={"mfa_token": "t"}), digest)
    # development: a key generated once into the data directory, readable by its owner only
    settings = make_settings(tmp_path / "data")
    first, key = client_key_digest(settings)
    assert (settings.data_dir / "kiosk-key").stat().st_mode & 0o777 == 0o600
    assert client_key_digest(settings) == (first, key) and key and len(first) == 64
    assert client_key_digest(make_settings(tmp_path / "data", kiosk={"client_key_sha256": "AB" * 32})) == ("ab" * 32, None)


def test_biogate_kiosk_serves_the_page_and_the_api_until_sigterm(tmp_path):
    import os
    import re
    import signal
    import subprocess
    import sys

    from services.common.config import PROJECT_ROOT

    env = dict(os.environ, BIOGATE_DATA_DIR=str(tmp_path / "data"), BIOGATE_KIOSK__TENANT="bank-a",
               BIOGATE_KIOSK__MFA_TOKEN="tok-kiosk", BIOGATE_KIOSK__MFA_TARGET="127.0.0.1:9", BIOGATE_KIOSK__PORT="0")
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "kiosk"], env=env, cwd=PROJECT_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        found = re.match(r"biogate: kiosk gateway on (http://127\.0\.0\.1:\d+) \(open \1/#key=(\S+)\)", line)
        assert found, line
        url, key = found.groups()
        assert (tmp_path / "data" / "kiosk-key").read_text() == key
        with urllib.request.urlopen(url + "/", timeout=10) as r:
            assert r.status == 200
        status, body, headers = call(url + "/v1/sessions", {"customer": "cust-1"}, key=key)
        assert status == 503 and body == {"reason": "UNAVAILABLE", "fields": {},  # the MFA (a dead address) is down
                                          "message": "the MFA service cannot be reached; try again shortly"}
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


def plain(url: str, method: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes, dict[str, str]]:
    where = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(where.hostname or "", where.port, timeout=30)
    try:
        conn.request(method, path, headers=headers or {})
        r = conn.getresponse()
        return r.status, r.read(), {k.lower(): v for k, v in r.getheaders()}
    finally:
        conn.close()


def test_unknown_paths_and_methods_answer_the_gateways_json_error(stack):
    """FastAPI's own 404 and 405 were {"detail": ...}, not the gateway's {reason, message, fields};
    every answer named the server (uvicorn), and HEAD on the page was 405."""
    for method, path, status, reason, allow in (
            ("GET", "/nope", 404, "NOT_FOUND", None), ("POST", "/v1/sessions/ses_x/nope", 404, "NOT_FOUND", None),
            ("GET", "/v1/sessions", 405, "METHOD_NOT_ALLOWED", "POST"), ("DELETE", "/", 405, "METHOD_NOT_ALLOWED", "GET, HEAD"),
            ("OPTIONS", "/v1/sessions", 405, "METHOD_NOT_ALLOWED", "POST")):  # no CORS: a preflight fails
        got, data, headers = plain(stack.url, method, path)
        body = json.loads(data)
        assert (got, body["reason"], set(body)) == (status, reason, {"reason", "message", "fields"}), (method, path)
        assert headers["content-type"] == "application/json" and headers["x-content-type-options"] == "nosniff"
        assert "server" not in headers and "access-control-allow-origin" not in headers
        if allow:
            assert set(headers["allow"].split(", ")) == set(allow.split(", "))  # in a set's order
            assert f"use {headers['allow']}" in body["message"]
        else:
            assert "/openapi.json" in body["message"]
    for path, media in (("/", "text/html"), ("/kiosk.js", "text/javascript"), ("/healthz", "application/json")):
        got, data, headers = plain(stack.url, "HEAD", path)
        assert (got, data) == (200, b"") and headers["content-type"].startswith(media), path
    # what h11 cannot parse: uvicorn's plain text 400 before, the same JSON shape now
    where = urllib.parse.urlsplit(stack.url)
    with socket.create_connection((where.hostname, where.port), timeout=30) as sock:
        sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        answer = b"".join(iter(lambda: sock.recv(65536), b""))
    head, _, data = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ") and b"x-content-type-options: nosniff" in head.lower()
    assert json.loads(data)["reason"] == "MALFORMED_REQUEST" and b"server:" not in head.lower()
