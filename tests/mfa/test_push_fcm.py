"""The FCM HTTP v1 push adapter against a local server that checks FCM's documented request shape
(tests/mfa/pushapp.py, fcm_problems) and answers as FCM does."""

from __future__ import annotations

import json
import time

import pytest

from services.mfa.push import FcmPushGateway, PushError, open_push_gateway
from tests.conftest import make_settings
from tests.mfa.pushapp import FcmServer, fcm_problems

DATA = {"type": "biogate.confirm", "fields": '{"cid":"pc_1"}', "request_id": "req-1"}


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
