"""MFA fixtures: settings with a tenant policy folder, an in-process orchestrator, and a real
MFA server on loopback; helpers that play the bank's back end and the customer's app."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest

from biogate_client.device import Device
from services.common.api.v1 import common_pb2, mfa_pb2, mfa_pb2_grpc
from services.common.config import PROJECT_ROOT
from tests.conftest import ServiceHarness, make_settings

DEAD = "127.0.0.1:9"  # discard port: nothing listens, connections are refused at once

# A tenant whose policy needs no biometrics, so that OTP, device, lockout and review flows run
# without the face and voice services.
OTP_POLICY = """\
version: otp-test-1
factors:
  sms_otp: {evidence: 3.0, resend_cooldown_s: 0, max_attempts: 5}
  device:
    evidence: 3.0
    binding: {min_acr: aal1, within_s: 300}
actions:
  login:
    required: 3.0
    acceptable: [[sms_otp], [device]]
  payment:
    required: 3.0
    payee: optional              # said outright: an action with amounts requires a payee by default
    acceptable: [[sms_otp], [device], [device, sms_otp]]
    amount_bands:
      CNY:
        - {up_to: 500000}
        - {up_to: null, min_factors: 2, extra_evidence: 3.0, risk: 15}
risk:
  rules:
    fraud_phrases:
      score: 60
      phrases:
        zh: [代操作, 紧急转账, 安全账户]
        en: [safe account, remote access, AnyDesk]
lockout: {max_failures: 5, delay_after: 3, delay_s: 0.0}
"""


# A tenant where a device can be bound after an SMS OTP login (aal1), so that bound devices, capture
# bindings and WebAuthn credentials are exercised without the face service; face still counts
# only with a possession factor, and payments name their payee.
BIND_POLICY = """\
version: bind-test-1
factors:
  sms_otp:
    {evidence: 3.0, resend_cooldown_s: 0, max_attempts: 10, per_phone: {limit: 50, window_s: 3600},
     per_subject: {limit: 50, window_s: 3600}}
  device:
    evidence: 3.0
    binding: {min_acr: aal1, within_s: 300}
actions:
  login:
    required: 3.0
    acceptable: [[face, device], [face, sms_otp], [sms_otp], [device]]
  payment:
    required: 3.0
    payee: required
    acceptable: [[face, device], [face, sms_otp], [device, sms_otp]]
    amount_bands:
      CNY:
        - {up_to: 500000}
        - {up_to: null, min_factors: 2, min_independent: 2, extra_evidence: 3.0}
lockout: {max_failures: 5, delay_after: 3, delay_s: 0.0}
"""


def settings_for(tmp_path: Path, dsn: str = "", keys: dict | None = None, **mfa):
    policy_dir = tmp_path / "policies"
    policy_dir.mkdir(exist_ok=True)
    (policy_dir / "otp-bank.yaml").write_text(OTP_POLICY)
    (policy_dir / "bind-bank.yaml").write_text(BIND_POLICY)
    return make_settings(
        tmp_path / "data",
        storage={"dsn": dsn if dsn.startswith("postgres") else ""},
        mfa={"policy_dir": str(policy_dir), "policy_check_s": 0, **mfa},
        clients={"face": {"target": DEAD, "deadline_s": 2, "retries": 0},
                 "voice": {"target": DEAD, "deadline_s": 2, "retries": 0}},
        **({"keys": keys} if keys else {}),
    )


@pytest.fixture
def mfa_settings(tmp_path, storage_dsn):
    """Every MFA flow runs on SQLite and on PostgreSQL."""
    return settings_for(tmp_path, storage_dsn)


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(timezone.utc)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)

    def room_in_window(self, window_s: int, needed_s: float) -> None:
        """Moves to the start of the next fixed window (e.g. an hour of OTP rate limits) unless
        ``needed_s`` still fit in the current one, so a test of a window's limit cannot straddle two."""
        epoch = self.now.timestamp()
        if epoch % window_s + needed_s >= window_s:
            self.advance(window_s - epoch % window_s + 1)


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def orch(mfa_settings, clock):
    from services.common.runtime import Runtime
    from services.mfa.service import Orchestrator
    from services.serve import prepare

    prepare(mfa_settings)
    rt = Runtime.open(mfa_settings)
    o = Orchestrator(rt, clock=clock)
    yield o
    o.close()
    rt.close()


@pytest.fixture
def mfa_server(mfa_settings):
    harness = ServiceHarness(mfa_settings)
    harness.start("mfa")
    yield harness
    harness.stop()


@pytest.fixture
def stub(mfa_server):
    with mfa_server.channel("mfa", "dev-all") as channel:
        yield mfa_pb2_grpc.MfaServiceStub(channel)


def subject(tenant="otp-bank", sid="cust-0001") -> common_pb2.SubjectRef:
    return common_pb2.SubjectRef(tenant_id=tenant, subject_id=sid)


def phone_device(install="inst-7f3a", os_version="14.2", model="Pixel 8") -> mfa_pb2.DeviceInfo:
    return mfa_pb2.DeviceInfo(platform="android", os_version=os_version, model=model, app_version="5.1.0",
                              locale="zh_CN", timezone="Asia/Shanghai", screen_width=1080,
                              screen_height=2400, install_id=install)


class App(Device):
    """The customer's app: the client SDK's device (its key, what each session showed the user, and
    signatures over those sessions' transaction contexts), reporting :func:`phone_device` by default."""

    if TYPE_CHECKING:
        # The SDK types its messages by its own copy of the generated stubs; at runtime they are the
        # services' very classes (one descriptor pool), and the tests hand them to the services' requests.
        device: Any

        def opened(self, request: Any, response: Any) -> Any: ...
        def proof(self, session, send_context: bool = True) -> Any: ...
        def binding(self, session, payloads: Sequence[bytes], send_context: bool = True) -> Any: ...
        def face(self, session, image: bytes, **kw) -> Any: ...
        def voice(self, session, audio: bytes, nonce: str = "") -> Any: ...

    def __init__(self, device: mfa_pb2.DeviceInfo | None = None, ec: bool = False) -> None:
        super().__init__(device or phone_device(), ec)  # type: ignore[arg-type]  # the same class, see above


def outbox_codes(settings) -> list[str]:
    path = settings.data_dir / "sms-outbox.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["text"].split()[0] for line in path.read_text().splitlines() if line]


def setup_subject(call, ref=None, phone="+8613800135678"):
    """Consent and phone number through the MFA service itself."""
    ref = ref or subject()
    call.RecordConsent(common_pb2.RecordConsentRequest(consent=common_pb2.Consent(
        subject=ref, purpose=common_pb2.CONSENT_PURPOSE_BIOMETRIC_VERIFICATION,
        modalities=[common_pb2.MODALITY_FACE, common_pb2.MODALITY_VOICE], granted=True,
        policy_version="privacy-2025-01")))
    call.SetPhoneNumber(mfa_pb2.SetPhoneNumberRequest(subject=ref, phone_e164=phone))
    return ref


def code_of(err: grpc.RpcError) -> grpc.StatusCode:
    return err.code()


SHARED = PROJECT_ROOT.parent / "shared"
