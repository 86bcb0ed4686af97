"""A registered terminal (a kiosk, the IVR platform: a principal with ``terminal: {channel}``) holds
the orchestrator role so that it can run its channel's sessions, and nothing more: a kiosk's
certificate lifted from a branch must not erase enrolments (face/voice DeleteSubject), search the
bank's face gallery (Identify), revoke or re-point customers' devices, read reviews, or open and
decide sessions of the app or web channels. Real services on loopback, every RPC."""

from __future__ import annotations

import json
from contextlib import contextmanager

import grpc
import pytest

from services.common.api.v1 import common_pb2, face_pb2_grpc, mfa_pb2, mfa_pb2_grpc, voice_pb2_grpc
from services.common.client import connect
from services.common.errors import details_of
from services.common.server.auth import token_sha256
from services.common.storage import open_storage
from tests.conftest import ServiceHarness, make_settings
from tests.mfa.conftest import DEAD, OTP_POLICY, phone_device, setup_subject, subject
from tests.services.test_auth_health import DESCRIPTORS, call, every_method

TENANT = "otp-bank"
# What a terminal does at its channel: open a session, take its factors, have it decided (and read
# the public keys that verify the decision).
TERMINAL_RPCS = {"StartAuthentication", "StartBiometricChallenge", "SubmitFactor", "StreamVoiceFactor", "SendOtp",
                 "Decide", "GetSigningKeys"}


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    root = tmp_path_factory.mktemp("terminals")
    (root / "pol").mkdir()
    (root / "pol" / f"{TENANT}.yaml").write_text(OTP_POLICY)
    principals = [
        {"name": "kiosk-7", "roles": ["orchestrator"], "tenants": [TENANT], "token_sha256": token_sha256("tok-kiosk"),
         "terminal": {"channel": "kiosk"}},
        {"name": "bank-backend", "roles": ["orchestrator", "verifier", "enroller", "admin", "auditor"],
         "token_sha256": token_sha256("tok-bank")}]
    settings = make_settings(root / "data", auth={"principals": principals, "dev_credentials": False},
                             mfa={"policy_dir": str(root / "pol"), "policy_check_s": 0},
                             clients={"face": {"target": DEAD, "retries": 0}, "voice": {"target": DEAD, "retries": 0}})
    h = ServiceHarness(settings)
    for name in DESCRIPTORS:
        h.start(name)
    yield h
    h.stop()


def audit_events(settings) -> list[tuple[str, dict]]:
    store = open_storage(settings.storage_dsn)
    try:
        return [(r.event_type, json.loads(r.details)) for r in store.audit.iter_records()]
    finally:
        store.close()


def refusal(err: pytest.ExceptionInfo) -> tuple[grpc.StatusCode, str]:
    return err.value.code(), details_of(err.value)["reason"]


@pytest.mark.parametrize("name,service,method",
                         [m for m in every_method() if not (m[0] == "mfa" and m[2].name in TERMINAL_RPCS)],
                         ids=lambda v: getattr(v, "name", v))
def test_a_terminal_is_refused_every_rpc_but_its_channel_sessions(harness, name, service, method):
    with connect(harness.running[name].address, "tok-kiosk") as channel:
        assert call(channel, service, method) == grpc.StatusCode.PERMISSION_DENIED
    with connect(harness.running[name].address, "tok-bank") as channel:  # what the bank's back end may do
        assert call(channel, service, method) not in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED)


@contextmanager
def kiosk_session(harness, subject_id: str):
    """The kiosk's MFA stub, a subject the bank's back end set up (consent, phone), and a kiosk session of it."""
    with connect(harness.running["mfa"].address, "tok-kiosk") as kch, \
            connect(harness.running["mfa"].address, "tok-bank") as bch:
        kiosk = mfa_pb2_grpc.MfaServiceStub(kch)
        ref = setup_subject(mfa_pb2_grpc.MfaServiceStub(bch), subject(TENANT, subject_id))
        yield kiosk, ref, kiosk.StartAuthentication(mfa_pb2.StartAuthenticationRequest(
            subject=ref, channel=mfa_pb2.CHANNEL_KIOSK, action="login"))


def test_a_terminal_opens_decides_and_takes_factors_of_sessions_of_its_own_channel(harness):
    with kiosk_session(harness, "cust-kiosk-own") as (kiosk, _, s):
        assert kiosk.SendOtp(mfa_pb2.SendOtpRequest(session_id=s.session_id)).masked_phone
        assert kiosk.Decide(mfa_pb2.DecideRequest(session_id=s.session_id)).outcome == mfa_pb2.OUTCOME_STEP_UP


def test_a_terminal_cannot_open_or_touch_sessions_of_another_channel(harness):
    settings = harness.settings
    with connect(harness.running["mfa"].address, "tok-kiosk") as kch, \
            connect(harness.running["mfa"].address, "tok-bank") as bch:
        kiosk, bank = mfa_pb2_grpc.MfaServiceStub(kch), mfa_pb2_grpc.MfaServiceStub(bch)
        ref = setup_subject(bank, subject(TENANT, "cust-kiosk-other"))
        for channel, device in ((mfa_pb2.CHANNEL_APP, phone_device()), (mfa_pb2.CHANNEL_IVR, None)):
            with pytest.raises(grpc.RpcError) as err:
                kiosk.StartAuthentication(mfa_pb2.StartAuthenticationRequest(subject=ref, channel=channel,
                                                                             action="login", device=device))
            assert refusal(err) == (grpc.StatusCode.PERMISSION_DENIED, "TERMINAL_NOT_REGISTERED")
        app = bank.StartAuthentication(mfa_pb2.StartAuthenticationRequest(
            subject=ref, channel=mfa_pb2.CHANNEL_APP, action="login", device=phone_device()))
        before = audit_events(settings)
        calls = [
            lambda: kiosk.SendOtp(mfa_pb2.SendOtpRequest(session_id=app.session_id)),
            lambda: kiosk.SubmitFactor(mfa_pb2.SubmitFactorRequest(session_id=app.session_id,
                                                                   otp=mfa_pb2.OtpEvidence(code="123456"))),
            lambda: kiosk.Decide(mfa_pb2.DecideRequest(session_id=app.session_id)),
        ]
        for attempt in calls:
            with pytest.raises(grpc.RpcError) as err:
                attempt()
            assert refusal(err) == (grpc.StatusCode.PERMISSION_DENIED, "TERMINAL_NOT_REGISTERED")
        assert audit_events(settings) == before  # no code sent, no attempt counted
        # the bank's own session goes on untouched
        assert bank.SendOtp(mfa_pb2.SendOtpRequest(session_id=app.session_id)).masked_phone


def test_audit_records_name_the_principal_the_rpc_authenticated(harness):
    """Each servicer reads the RPC's principal once and hands it to the code that writes: the MFA's,
    the face service's and the voice service's audit records name the caller that authenticated."""
    since = len(audit_events(harness.settings))
    with kiosk_session(harness, "cust-audit-actor") as (kiosk, ref, s):
        kiosk.SendOtp(mfa_pb2.SendOtpRequest(session_id=s.session_id))
    for name, stub in (("face", face_pb2_grpc.FaceServiceStub), ("voice", voice_pb2_grpc.VoiceServiceStub)):
        with connect(harness.running[name].address, "tok-bank") as channel:
            stub(channel).DeleteSubject(common_pb2.DeleteSubjectRequest(subject=ref, reason="closed"))
    store = open_storage(harness.settings.storage_dsn)
    try:
        actors = [(r.event_type, r.actor) for r in list(store.audit.iter_records())[since:]]
    finally:
        store.close()
    assert dict(actors) == {"consent.recorded": "bank-backend", "contact.phone_set": "bank-backend",
                      "mfa.session_started": "kiosk-7", "mfa.otp_sent": "kiosk-7",
                      "face.subject_deleted": "bank-backend", "voice.subject_deleted": "bank-backend"}
