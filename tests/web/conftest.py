"""The kiosk stack on loopback: an MFA (with or without a real face service) that knows the bank's
back end and one kiosk terminal as principals, the kiosk gateway calling it as that terminal, and
headless Chromium showing the kiosk page with a fake camera fed from fixture frames."""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from services.common.api.v1 import common_pb2, mfa_pb2, mfa_pb2_grpc
from services.common.client import connect
from services.common.config import PROJECT_ROOT
from services.common.server.auth import ROLES, token_sha256
from services.kiosk.server import KioskServer
from tests.conftest import SHARED, ServiceHarness, make_settings, require

TENANT = "bank-kiosk"
BANK_TOKEN, KIOSK_TOKEN, KIOSK_KEY = "tok-bank-backend", "tok-kiosk-7", "kiosk-7-browser-key"
PRINCIPALS = [
    {"name": "bank-backend", "roles": list(ROLES), "token_sha256": token_sha256(BANK_TOKEN)},
    {"name": "kiosk-7", "roles": ["orchestrator"], "token_sha256": token_sha256(KIOSK_TOKEN),
     "tenants": [TENANT], "terminal": {"channel": "kiosk"}},
]
AUTH = {"principals": PRINCIPALS, "dev_credentials": False}
DEAD = "127.0.0.1:9"


class KioskStack:
    """The MFA (``mfa``: its harness, on the data directory ``data``, which a face service shares), the
    bank's stub to it (``bank``) and the gateway (``url``)."""

    def __init__(self, data: Path, face_target: str = DEAD, mfa_token: str = KIOSK_TOKEN) -> None:
        clients = {"face": {"target": face_target, "token": BANK_TOKEN, "retries": 0},
                   "voice": {"target": DEAD, "token": BANK_TOKEN, "retries": 0}}
        self.mfa = ServiceHarness(make_settings(data, auth=AUTH, clients=clients))
        self.mfa.start("mfa")
        self.gateway: KioskServer | None = None
        try:
            self._bank_channel = connect(self.mfa.running["mfa"].address, BANK_TOKEN)
            self.bank = mfa_pb2_grpc.MfaServiceStub(self._bank_channel)
            # every test's calls come from 127.0.0.1: the rate limit (tested in test_gateway_limits) is
            # set far above what a module sends
            kiosk: dict[str, Any] = {"tenant": TENANT, "mfa_target": self.mfa.running["mfa"].address, "mfa_token": mfa_token,
                     "client_key_sha256": hashlib.sha256(KIOSK_KEY.encode()).hexdigest(),
                     "rate_limit": {"capacity": 10_000}}
            self.gateway = KioskServer(make_settings(data / "kiosk", kiosk=kiosk), kiosk["client_key_sha256"],
                                       port=0).start()
            self.url = self.gateway.url
        except BaseException:
            self.close()
            raise

    def customer(self, sid: str, phone: str) -> common_pb2.SubjectRef:
        """A customer of the bank with consent to face verification and a phone number."""
        ref = common_pb2.SubjectRef(tenant_id=TENANT, subject_id=sid)
        self.bank.RecordConsent(common_pb2.RecordConsentRequest(consent=common_pb2.Consent(
            subject=ref, purpose=common_pb2.CONSENT_PURPOSE_BIOMETRIC_VERIFICATION,
            modalities=[common_pb2.MODALITY_FACE], granted=True, policy_version="privacy-2025-01")))
        self.bank.SetPhoneNumber(mfa_pb2.SetPhoneNumberRequest(subject=ref, phone_e164=phone))
        return ref

    def sms_codes(self) -> list[str]:
        from tests.mfa.conftest import outbox_codes

        return outbox_codes(self.mfa.settings)

    def close(self) -> None:
        if self.gateway is not None:
            self.gateway.stop()
        if hasattr(self, "_bank_channel"):
            self._bank_channel.close()
        self.mfa.stop()


def write_y4m(path: Path, images: list[Path], repeat: int = 3) -> Path:
    """A YUV4MPEG2 (4:2:0) video of the images, each shown ``repeat`` frames, at the first one's size
    (even width and height), for Chromium's --use-file-for-fake-video-capture."""
    frames = [bgr for p in images if (bgr := cv2.imread(str(p))) is not None]
    assert len(frames) == len(images), images  # each one read
    h, w = (d - d % 2 for d in frames[0].shape[:2])
    with open(path, "wb") as fh:
        fh.write(f"YUV4MPEG2 W{w} H{h} F10:1 Ip A1:1 C420jpeg\n".encode())
        for bgr in frames:
            yuv = cv2.cvtColor(np.ascontiguousarray(cv2.resize(bgr, (w, h))), cv2.COLOR_BGR2YUV_I420)
            for _ in range(repeat):
                fh.write(b"FRAME\n" + yuv.tobytes())
    return path


@contextmanager
def chromium(video: Path):
    """Headless Chromium whose camera plays ``video`` (getUserMedia granted without a prompt)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
                f"--use-file-for-fake-video-capture={video}", "--window-size=900,1000"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # console errors: CSP refusals, failed loads
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        yield driver
    finally:
        driver.quit()


FIX = SHARED / "fixtures"


@pytest.fixture(scope="session")
def face_service(tmp_path_factory):
    require((FIX / "face/pad/live").is_dir(), f"the fixtures in {FIX}")
    harness = ServiceHarness(make_settings(tmp_path_factory.mktemp("kiosk-face"), auth=AUTH))
    harness.start("face", timeout=300)
    yield harness
    harness.stop()


@pytest.fixture(scope="session")
def kiosk(face_service, tmp_path_factory):
    """The kiosk stack with the real face service; the customers enrolled from one webcam frame of
    the person in the liveness fixtures (face/pad/live/apfol_real_0.png)."""
    from services.common.api.v1 import face_pb2, face_pb2_grpc

    stack = KioskStack(face_service.settings.data_dir, face_target=face_service.running["face"].address)
    with connect(face_service.running["face"].address, BANK_TOKEN) as channel:
        face = face_pb2_grpc.FaceServiceStub(channel)
        photo = (FIX / "face/pad/live/apfol_real_0.png").read_bytes()
        for sid, phone in (("cust-kiosk-genuine", "+8613800135201"), ("cust-kiosk-spoofed", "+8613800135202")):
            ref = stack.customer(sid, phone)
            face.Enroll(face_pb2.EnrollFaceRequest(subject=ref, images=[common_pb2.Image(data=photo)], replace=True),
                        timeout=120)
    yield stack
    stack.close()


@pytest.fixture(scope="module")
def browser(request, tmp_path_factory):
    """One headless Chromium per test module, its camera playing the module's ``CAMERA`` frames."""
    video = write_y4m(tmp_path_factory.mktemp("camera") / "camera.y4m", [FIX / p for p in request.module.CAMERA])
    with chromium(video) as driver:
        yield driver


def open_page(driver, stack: KioskStack, timeout: float = 60):
    """Loads the kiosk page as the launcher does (its key in the fragment); waits for the camera."""
    driver.get(f"{stack.url}/#key={KIOSK_KEY}")
    return wait_state(driver, {"ready", "error"}, timeout)


def wait_state(driver, states: set[str], timeout: float = 120) -> str:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(
        lambda d: (s := d.find_element("tag name", "body").get_attribute("data-state")) in states and s)


def console_errors(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def screenshot(driver, name: str) -> Path:
    out = PROJECT_ROOT / "var" / "screenshots"
    out.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(out / name))
    return out / name
