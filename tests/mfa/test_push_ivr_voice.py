"""The push fallback's IVR call-back with a real voice: a browser payment whose customer's app
cannot be reached falls back (default policy) to the voice factor over an IVR call-back plus the
SMS code; the IVR platform asks the session's digit challenge, the customer's spoken digits
(tests/mfa/spoken_digits.py, over G.711) are verified by the voice service as telephone speech,
and the payment is allowed. Before the fallback the IVR's capture does not count on the web session."""

from __future__ import annotations

import random

import grpc
import pytest

from services.common.api.v1 import mfa_pb2
from services.common.errors import details_of
from services.common.server.auth import ROLES, token_sha256
from tests.conftest import require
from tests.mfa import spoken_digits
from tests.mfa.pushapp import PAYEE, browser
from tests.mfa.world import World, running_services

F = mfa_pb2
BANK_TOKEN, IVR_TOKEN = "tok-bank-cb", "tok-ivr-cb"
SPEAKER = "george"


@pytest.fixture(scope="module")
def services(tmp_path_factory):  # (named so that tests/conftest.py marks the module as loading models)
    principals: list[dict] = [
        {"name": "bank-backend", "roles": list(ROLES), "token_sha256": token_sha256(BANK_TOKEN)},
        {"name": "ivr-platform", "roles": ["orchestrator"], "token_sha256": token_sha256(IVR_TOKEN),
         "tenants": ["bank-callback"], "terminal": {"channel": "ivr"}}]
    with running_services(tmp_path_factory.mktemp("ivr-callback"), principals, BANK_TOKEN) as (bio, mfa):
        w = World(bio, mfa, "bank-callback", ivr_token=IVR_TOKEN)
        yield w
        w.close()


def test_a_browser_payment_is_confirmed_by_an_ivr_call_back_when_the_app_cannot_be_reached(services):
    world = services
    require(world.bio.voice_ok, "the voice service (SERVING, with its Verify RPC)")
    # a telephone (8 kHz) template: what the IVR's call is verified against
    ref = world.enrol("cust-callback", utterances=spoken_digits.enrolment(SPEAKER), phone="+8613900000301")
    req = F.StartAuthenticationRequest(subject=ref, channel=F.CHANNEL_WEB, action="payment", device=browser(),
                                       amount=F.Money(currency="CNY", amount_minor=100000), payee=PAYEE)
    s = world.mfa_stub.StartAuthentication(req)

    for attempt in (lambda: world.voice_challenge(s, world.ivr),  # no call-back yet: a web session is not the IVR's
                    lambda: world.submit(s, world.ivr, voice=world.ivr_voice(s, b"\0" * 16000, "any-nonce"))):
        with pytest.raises(grpc.RpcError) as err:
            attempt()
        assert details_of(err.value)["reason"] == "TERMINAL_NOT_REGISTERED"

    sent = world.mfa_stub.SendPushConfirmation(F.SendPushConfirmationRequest(session_id=s.session_id, payee=PAYEE))
    assert not sent.sent and sent.reason.code == "NO_PUSH_DEVICE" and sent.ivr_callback
    challenge = world.voice_challenge(s, world.ivr)
    audio = spoken_digits.heard_answer(world.voice_engine, challenge.digits, SPEAKER, random.Random(7),
                                       subject=(ref.tenant_id, ref.subject_id), telephone=True)
    assert audio is not None
    r = world.submit(s, world.ivr, voice=world.ivr_voice(s, audio, challenge.challenge.nonce)).result
    assert r.passed and r.binding == "terminal", r
    assert world.decide(s).outcome == F.OUTCOME_STEP_UP  # the SMS code too
    assert world.otp(s, payee=PAYEE).result.passed
    d = world.decide(s)
    assert d.outcome == F.OUTCOME_ALLOW and set(d.amr) >= {"vbm", "sms"}, d
