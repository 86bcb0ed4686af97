"""deploy/biogate.example.yaml, started as a bank would start it: `biogate migrate`, then face, voice
and mfa as separate processes. Adapted only where the machine differs: loopback addresses and
ports, a test PostgreSQL schema, test certificates, a SoftHSM2 token in the HSM's place, the model
folders of this checkout and a local HTTP server as the SMS provider. A customer enrolled through
the face service then logs in with face and SMS OTP; the login must end ALLOW with face among the
factors, which it cannot when the MFA's calls to face are refused."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
import yaml
from grpc_health.v1 import health_pb2

from services.common.api.v1 import common_pb2, face_pb2, face_pb2_grpc, mfa_pb2, mfa_pb2_grpc
from services.common.client import connect
from services.common.config import PROJECT_ROOT
from services.settings import load_config
from services.mfa.tokens import verify_token
from tests.certs import TestCa
from tests.conftest import health_check
from tests.mfa.conftest import App
from tests.mfa.pushapp import service_account_key
from tests.services.test_serve_cli import free_ports

EXAMPLE = PROJECT_ROOT / "deploy" / "biogate.example.yaml"
SERVICES = ("face", "voice", "mfa")
ONBOARDING_TOKEN = "onboarding-" + uuid.uuid4().hex
F = mfa_pb2


class SmsProvider:
    """The bank's SMS API, on loopback: keeps what it is asked to send."""

    def __init__(self) -> None:
        self.messages: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                outer.messages.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                body = json.dumps({"id": f"msg-{len(outer.messages)}"}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1/messages"

    def close(self) -> None:
        self.server.shutdown()


def adapt(tmp_path, pg_dsn, hsm, pki, sms_url) -> tuple[dict, dict]:
    cfg = yaml.safe_load(EXAMPLE.read_text())
    tls = {"cert_file": str(pki["server"].cert), "key_file": str(pki["server"].key),
           "client_ca_file": str(pki["ca"].cert_file)}
    ports = iter(free_ports(13))
    endpoints = {}
    for name in SERVICES:
        endpoints[name] = {"host": "127.0.0.1", "port": next(ports), "metrics_port": next(ports),
                           "health_port": next(ports)}
    cfg["data_dir"] = str(tmp_path / "data")
    cfg["storage"]["dsn"] = pg_dsn
    cfg["keys"]["pkcs11"].update(hsm.keys_config()["pkcs11"])
    cfg["models"] = {"cache_dir": str(PROJECT_ROOT / "var" / "models"), "providers": cfg["models"]["providers"]}
    cfg["server"].update(endpoints, tls={**cfg["server"]["tls"], **tls})
    for p in cfg["auth"]["principals"]:
        if p.get("token_sha256"):
            p["token_sha256"] = hashlib.sha256(ONBOARDING_TOKEN.encode()).hexdigest()
    for name in ("face", "voice"):
        cfg["clients"][name].update(target=f"127.0.0.1:{endpoints[name]['port']}", ca_file=str(pki["ca"].cert_file),
                                    cert_file=str(pki["mfa"].cert), key_file=str(pki["mfa"].key))
    cfg["mfa"]["sms"]["http_url"] = sms_url
    cfg["mfa"]["http"].update(host="127.0.0.1", port=next(ports))
    cfg["mfa"]["push"]["fcm_service_account_file"] = str(service_account_key(tmp_path / "fcm-sa.json"))
    return cfg, endpoints



def health(address: str) -> str:
    with grpc.insecure_channel(address) as ch:
        try:
            reply = health_check(ch)(health_pb2.HealthCheckRequest(), timeout=2)
        except grpc.RpcError as err:
            return err.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def wait_serving(procs: dict, endpoints: dict, names, timeout: float = 420) -> None:
    deadline = time.monotonic() + timeout
    waiting = set(names)
    while waiting and time.monotonic() < deadline:
        for name in list(waiting):
            assert procs[name].poll() is None, f"{name} exited: {procs[name].log.read_text()[-3000:]}"
            if health(f"127.0.0.1:{endpoints[name]['health_port']}") == "SERVING":
                waiting.discard(name)
        time.sleep(1)
    assert not waiting, f"not SERVING within {timeout} s: {sorted(waiting)}"


def genuine_face_pair(fixtures_dir):
    with open(fixtures_dir / "trials_face.csv", newline="") as fh:
        row = next(r for r in csv.DictReader(fh) if r["target"] == "1")
    return (fixtures_dir / row["enroll"]).read_bytes(), (fixtures_dir / row["probe"]).read_bytes()


def test_the_example_configuration_starts_and_logs_a_customer_in(tmp_path, pg_dsn, softhsm, fixtures_dir):
    ca = TestCa(tmp_path / "pki")
    pki: dict[str, Any] = {"ca": ca, "server": ca.server(),
           "mfa": ca.issue("mfa", "mfa", uris=("spiffe://bank-a.internal/ns/biogate/sa/biogate-mfa",)),
           "login": ca.issue("login", "login", uris=("spiffe://bank-a.internal/ns/core-banking/sa/login",)),
           "teller": ca.issue("teller", "teller", dns=("teller-ws-17.bank-a.internal",))}  # no principal of its own
    sms = SmsProvider()
    cfg, endpoints = adapt(tmp_path, pg_dsn, softhsm, pki, sms.url)
    config = tmp_path / "biogate.yaml"
    config.write_text(yaml.safe_dump(cfg))
    load_config(config)  # the adapted file is still a valid configuration
    env = dict(os.environ, **softhsm.env())
    base = [sys.executable, "-m", "services.cli", "--config", str(config)]
    migrated = subprocess.run([*base, "migrate"], env=env, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert migrated.returncode == 0, migrated.stderr
    procs: dict[str, subprocess.Popen] = {}
    try:
        def serve(name):
            log = tmp_path / f"{name}.log"
            with open(log, "w") as fh:
                procs[name] = subprocess.Popen([*base, "serve", name], env=env, cwd=PROJECT_ROOT,
                                               stdout=subprocess.DEVNULL, stderr=fh)
            procs[name].log = log  # type: ignore[attr-defined]  # read by wait_serving when it exits

        serve("face")
        serve("voice")
        wait_serving(procs, endpoints, ("face", "voice"))
        serve("mfa")
        wait_serving(procs, endpoints, ("mfa",), timeout=120)

        def channel(name, who, token=None):
            return connect(f"127.0.0.1:{endpoints[name]['port']}", token, ca_file=ca.cert_file,
                           cert_file=pki[who].cert, key_file=pki[who].key)

        enrol_image, probe_image = genuine_face_pair(fixtures_dir)
        ref = common_pb2.SubjectRef(tenant_id="bank-a", subject_id="cust-" + uuid.uuid4().hex[:8])
        # branch onboarding: a teller workstation's certificate carries the transport, its token identifies
        with channel("mfa", "teller", ONBOARDING_TOKEN) as ch:
            onboarding = mfa_pb2_grpc.MfaServiceStub(ch)
            onboarding.RecordConsent(common_pb2.RecordConsentRequest(consent=common_pb2.Consent(
                subject=ref, purpose=common_pb2.CONSENT_PURPOSE_BIOMETRIC_VERIFICATION,
                modalities=[common_pb2.MODALITY_FACE], granted=True, policy_version="privacy-2025-01")), timeout=30)
            onboarding.SetPhoneNumber(F.SetPhoneNumberRequest(subject=ref, phone_e164="+8613800135678"), timeout=30)
        with channel("face", "teller", ONBOARDING_TOKEN) as ch:
            face_pb2_grpc.FaceServiceStub(ch).Enroll(face_pb2.EnrollFaceRequest(
                subject=ref, images=[common_pb2.Image(data=enrol_image)]), timeout=120)

        # the bank's login back end: its workload certificate, no token
        with channel("mfa", "login") as ch:
            mfa = mfa_pb2_grpc.MfaServiceStub(ch)
            app = App()  # a new phone: it signs the capture with the key it will bind
            start = F.StartAuthenticationRequest(subject=ref, channel=F.CHANNEL_APP, action="login", device=app.device)
            s = app.opened(start, mfa.StartAuthentication(start, timeout=30))
            r = mfa.SubmitFactor(F.SubmitFactorRequest(session_id=s.session_id, face=app.face(s, probe_image)),
                                 timeout=120)
            assert r.result.passed, r
            mfa.SendOtp(F.SendOtpRequest(session_id=s.session_id), timeout=30)
            code = sms.messages[-1]["text"].split()[0]
            assert mfa.SubmitFactor(F.SubmitFactorRequest(session_id=s.session_id, otp=F.OtpEvidence(code=code)),
                                    timeout=30).result.passed
            d = mfa.Decide(F.DecideRequest(session_id=s.session_id), timeout=30)
            assert d.outcome == F.OUTCOME_ALLOW and "face" in d.amr, d
            jwks = mfa.GetSigningKeys(F.GetSigningKeysRequest(), timeout=30).jwks_json
        claims = verify_token(d.token, jwks, cfg["mfa"]["issuer"], "bank-a")
        assert claims["decision"] == "allow" and claims["sid"] == s.session_id
        assert not (tmp_path / "data" / "keys").exists()  # every key is in the token
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        sms.close()
