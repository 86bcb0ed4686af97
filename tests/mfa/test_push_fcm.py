"""The FCM HTTP v1 push adapter against a local server that checks FCM's documented request shape
(tests/mfa/pushapp.py, fcm_problems) and answers as FCM does."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from services.mfa.push import FcmPushGateway, PushError, open_push_gateway
from tests.conftest import make_settings
from tests.mfa.hostile import RawServer, finishes, trickle
from tests.mfa.pushapp import FcmServer, fcm_problems, service_account_key

DATA = {"type": "biogate.confirm", "cid": "pc_1", "sid": "ses_1", "request_id": "req-1"}  # ids only


@pytest.fixture(scope="module")
def fcm():
    with FcmServer("bank-app", "ya29.token") as server:
        yield server


@pytest.fixture(autouse=True)
def _fresh(fcm):
    fcm.requests.clear()
    fcm.fail_with = 0
    yield
    fcm.delay.set()


def test_a_confirmation_is_a_documented_fcm_v1_request(fcm):
    gw = FcmPushGateway("bank-app", "ya29.token", fcm.url)
    before = time.time()
    name = gw.send("fcm-token-1", DATA, 90, "pc_1")
    assert name == "projects/bank-app/messages/1"
    [req] = fcm.requests
    assert req["problems"] == [] and req["path"] == "/v1/projects/bank-app/messages:send"
    msg = req["body"]["message"]
    assert msg["token"] == "fcm-token-1" and msg["data"] == DATA
    assert msg["android"] == {"priority": "HIGH", "ttl": "90s", "collapse_key": "pc_1"}
    headers = msg["apns"]["headers"]
    assert headers["apns-priority"] == "10" and headers["apns-collapse-id"] == "pc_1"
    assert before + 89 <= int(headers["apns-expiration"]) <= time.time() + 91  # the confirmation's own lifetime
    assert msg["apns"]["payload"]["aps"]["alert"] == {"loc-key": "biogate_confirm_transaction"}


def test_the_shape_check_finds_what_fcm_would_refuse():
    bad = json.dumps({"message": {"token": "t", "data": {"n": 42}, "android": {"priority": "urgent", "ttl": 90}}})
    problems = fcm_problems("/v1/projects/other/messages:send", {"Content-Type": "application/json"},
                            bad.encode(), "bank-app", "ya29.token")
    assert len(problems) == 5, problems  # path, bearer, data value, priority, ttl


def test_an_unregistered_token_is_not_retried(fcm):
    fcm.fail_with = 404
    with pytest.raises(PushError) as err:
        FcmPushGateway("bank-app", "ya29.token", fcm.url, retries=2, backoff_s=0).send("stale", DATA, 60, "pc_2")
    assert not err.value.transient and "HTTP 404" in str(err.value) and len(fcm.requests) == 1


def test_a_5xx_or_a_timeout_is_retried_then_fails(fcm):
    fcm.fail_with = 503
    with pytest.raises(PushError) as err:
        FcmPushGateway("bank-app", "ya29.token", fcm.url, retries=2, backoff_s=0).send("t", DATA, 60, "pc_3")
    assert err.value.transient and len(fcm.requests) == 3
    fcm.requests.clear()
    fcm.fail_with = 0
    fcm.delay.clear()  # FCM does not answer
    with pytest.raises(PushError) as err:
        FcmPushGateway("bank-app", "ya29.token", fcm.url, timeout_s=0.2, retries=1, backoff_s=0).send("t", DATA, 60, "pc_4")
    assert err.value.transient and "Timeout" in str(err.value)


def test_the_configuration_selects_the_fcm_adapter(tmp_path, fcm):
    settings = make_settings(tmp_path / "data", mfa={"push": {
        "gateway": "fcm", "fcm_project": "bank-app", "fcm_base_url": fcm.url, "fcm_access_token": "ya29.token"}})
    gw = open_push_gateway(settings)
    assert isinstance(gw, FcmPushGateway)
    gw.send("fcm-token-9", DATA, 30, "pc_5")
    assert fcm.requests[-1]["problems"] == []


class TokenEndpoint:
    """A local stand-in for Google's OAuth 2.0 token endpoint: it accepts a JWT-bearer grant
    (RFC 7523) signed by the service account's key for the FCM scope, and answers an access token
    living ``expires_in`` seconds (or ``fail_with``)."""

    def __init__(self, public_key, expires_in: int = 3600) -> None:
        self.public_key, self.expires_in, self.fail_with = public_key, expires_in, 0
        self.grants: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802  (http.server's name)
                form = parse_qs(self.rfile.read(int(self.headers.get("Content-Length", 0))).decode())
                claims = jwt.decode(form["assertion"][0], outer.public_key, algorithms=["RS256"],
                                    audience="https://oauth2.googleapis.com/token")  # google-auth's fixed aud
                outer.grants.append({"grant_type": form["grant_type"][0], **claims})
                status, doc = (outer.fail_with, {"error": "invalid_grant"}) if outer.fail_with else (
                    200, {"access_token": "ya29.token", "expires_in": outer.expires_in, "token_type": "Bearer"})
                data = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def service_account(tmp_path):
    """(key file, token endpoint): a service account's JSON key naming the local token endpoint."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    endpoint = TokenEndpoint(key.public_key())
    path = service_account_key(tmp_path / "fcm-sa.json", endpoint.url + "/token", key)
    yield path, endpoint
    endpoint.server.shutdown()


def test_a_service_account_key_yields_the_bearer_and_it_is_reused_until_near_expiry(tmp_path, fcm, service_account):
    key_file, endpoint = service_account
    settings = make_settings(tmp_path / "data", mfa={"push": {
        "gateway": "fcm", "fcm_project": "bank-app", "fcm_base_url": fcm.url,
        "fcm_service_account_file": str(key_file)}})
    gw = open_push_gateway(settings)
    gw.send("fcm-token-1", DATA, 30, "pc_1")
    gw.send("fcm-token-2", DATA, 30, "pc_2")
    assert [r["problems"] for r in fcm.requests] == [[], []]  # FCM saw the issued bearer both times
    [grant] = endpoint.grants  # one token for both sends
    assert grant["grant_type"] == "urn:ietf:params:oauth:grant-type:jwt-bearer"
    assert grant["iss"] == "biogate-push@bank-app.iam.gserviceaccount.com"
    assert grant["scope"] == "https://www.googleapis.com/auth/firebase.messaging"

    endpoint.expires_in = 60  # inside google-auth's refresh margin: every send fetches a fresh one
    gw = open_push_gateway(settings)
    gw.send("fcm-token-3", DATA, 30, "pc_3")
    gw.send("fcm-token-4", DATA, 30, "pc_4")
    assert len(endpoint.grants) == 3


def test_a_refused_service_account_is_a_push_outage_and_fcm_never_sees_a_request(tmp_path, fcm, service_account):
    key_file, endpoint = service_account
    endpoint.fail_with = 400
    gw = open_push_gateway(make_settings(tmp_path / "data", mfa={"push": {
        "gateway": "fcm", "fcm_project": "bank-app", "fcm_base_url": fcm.url,
        "fcm_service_account_file": str(key_file)}}))
    with pytest.raises(PushError, match="access token"):
        gw.send("fcm-token-1", DATA, 30, "pc_1")
    assert fcm.requests == [] and len(endpoint.grants) == 1


def test_a_token_endpoint_trickling_its_answer_is_cut_off_by_the_push_timeout(tmp_path, fcm):
    """google-auth's token request went through requests, whose timeout bounds each socket
    operation: a token endpoint answering a byte at a time held the customer's RPC (and the token
    lock every other push waits on) for as long as it trickled. The push timeout bounds it all."""
    stop = threading.Event()
    endpoint = RawServer(trickle(stop, b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Slow: "))
    try:
        key_file = service_account_key(tmp_path / "fcm-sa.json", endpoint.url)
        gw = open_push_gateway(make_settings(tmp_path / "data", mfa={"push": {
            "gateway": "fcm", "fcm_project": "bank-app", "fcm_base_url": fcm.url, "timeout_s": 0.5,
            "fcm_service_account_file": str(key_file)}}))
        exc = finishes(lambda: gw.send("fcm-token-1", DATA, 30, "pc_1"), within_s=20)
    finally:
        stop.set()
        endpoint.close()
    assert isinstance(exc, PushError) and "access token" in str(exc), repr(exc)
    assert endpoint.connections == 1 and fcm.requests == []


def test_an_fcm_gateway_without_credentials_is_refused_at_load(tmp_path):
    with pytest.raises(ValueError, match="fcm_service_account_file"):
        make_settings(tmp_path / "data", mfa={"push": {"gateway": "fcm", "fcm_project": "bank-app"}})
