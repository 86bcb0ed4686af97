"""The push fallback's IVR call-back, at the MFA level: when the app cannot be reached and the
policy falls back to the voice factor with ``ivr_callback``, the registered IVR platform calling the
customer back may submit the voice capture on the (web) session; without the fallback its word
counts on IVR sessions only. The voice service itself is not running here (its verdict is
tests/attacks' and tests/mfa/test_e2e's business): the capture reaches it as the IVR's, and an
unanswered voice factor never allows."""

from __future__ import annotations

import grpc
import pytest

from services.common.api.v1 import common_pb2, mfa_pb2_grpc
from services.common.client import connect
from services.common.errors import details_of
from services.common.server.auth import token_sha256
from tests.conftest import ServiceHarness, make_settings
from tests.mfa.conftest import DEAD, setup_subject, subject
from tests.mfa.pushapp import F, PAYEE, PushApp, bind, browser, start

POLICY = """\
version: callback-test-1
factors:
  sms_otp: {evidence: 3.0, resend_cooldown_s: 0}
  device: {evidence: 3.0, binding: {min_acr: aal1, within_s: 300}}
  voice: {require_challenge: false}
  push: {evidence: 4.0, ttl_s: 60, fallback: [[voice, sms_otp]], ivr_callback: true}
actions:
  login: {required: 3.0, acceptable: [[sms_otp], [device]]}
  payment:
    required: 3.0
    payee: required
    acceptable: [[push], [voice, sms_otp]]   # voice in the app, or by the IVR calling back
risk:
  levels: {medium: 30, high: 60, critical: 90}
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("callback")
    (root / "pol").mkdir()
    (root / "pol" / "cb-bank.yaml").write_text(POLICY)
    principals = [
        {"name": "ivr-platform", "roles": ["orchestrator"], "token_sha256": token_sha256("tok-ivr"),
         "tenants": ["cb-bank"], "terminal": {"channel": "ivr"}},
        {"name": "bank-backend", "roles": ["orchestrator", "enroller", "admin"], "token_sha256": token_sha256("tok-bank")}]
    settings = make_settings(root / "data", auth={"principals": principals, "dev_credentials": False},
                             mfa={"policy_dir": str(root / "pol"), "policy_check_s": 0},
                             clients={"face": {"target": DEAD, "retries": 0}, "voice": {"target": DEAD, "retries": 0}})
    h = ServiceHarness(settings)
    h.start("mfa")
    try:
        address = h.running["mfa"].address
        with connect(address, "tok-ivr") as ich, connect(address, "tok-bank") as bch:
            yield h, mfa_pb2_grpc.MfaServiceStub(bch), mfa_pb2_grpc.MfaServiceStub(ich)
    finally:
        h.stop()


def ivr_voice() -> F.VoiceEvidence:
    return F.VoiceEvidence(audio=common_pb2.Audio(data=b"\xff" * 16000, format=common_pb2.AudioFormat(
        encoding=common_pb2.AUDIO_ENCODING_MULAW, sample_rate_hz=8000)),
        binding=F.CaptureBinding(terminal=F.TerminalCapture()))


def test_the_ivr_calls_back_when_the_app_cannot_be_reached(env):
    h, bank, ivr = env
    app = PushApp("inst-callback")
    ref = setup_subject(bank, subject("cb-bank", "cust-callback"))
    bind(bank, h.settings, ref, app)
    web = start(bank, app, ref, action="payment", amount=9900, channel=F.CHANNEL_WEB, device=browser())

    # the push went out: the IVR's word does not count on a web session
    assert bank.SendPushConfirmation(F.SendPushConfirmationRequest(session_id=web.session_id, payee=PAYEE)).sent
    with pytest.raises(grpc.RpcError) as err:
        ivr.SubmitFactor(F.SubmitFactorRequest(session_id=web.session_id, voice=ivr_voice()))
    assert details_of(err.value)["reason"] == "TERMINAL_NOT_REGISTERED"

    # the app has no push token any more: the session falls back to the IVR call-back and the SMS code
    bank.SetPushToken(F.SetPushTokenRequest(subject=ref, device_id=app.device_id, push_token=""))
    web = start(bank, app, ref, action="payment", amount=9900, channel=F.CHANNEL_WEB, device=browser())
    sent = bank.SendPushConfirmation(F.SendPushConfirmationRequest(session_id=web.session_id, payee=PAYEE))
    assert not sent.sent and sent.reason.code == "NO_PUSH_DEVICE" and sent.ivr_callback
    assert [F.FACTOR_TYPE_VOICE, F.FACTOR_TYPE_SMS_OTP] in [list(s.factors) for s in sent.acceptable]
    r = ivr.SubmitFactor(F.SubmitFactorRequest(session_id=web.session_id, voice=ivr_voice()))
    assert r.result.binding == "terminal"  # taken as the IVR's capture, handed to the voice service
    assert [x.code for x in r.result.reasons] == ["VOICE_SERVICE_UNAVAILABLE"] and not r.result.passed
    assert bank.Decide(F.DecideRequest(session_id=web.session_id)).outcome != F.OUTCOME_ALLOW
