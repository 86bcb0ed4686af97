"""MFA orchestrator benchmark: decisions per second and latency of the orchestrator's own work.

A flow is one authentication session on a bound device: StartAuthentication, a device-key proof
(a signature over the session's transaction context), SendOtp (development sink), the OTP, Decide
(a signed EdDSA token) — every storage write, audit record, risk rule and signature included. Time
spent waiting on the face/voice services is measured apart (``services.mfa.clients.biometric_seconds``)
and subtracted. With ``--with-face`` a real face service is started on loopback on the same
storage, a fixture face is enrolled for each subject, and each flow is one face verification
(passive liveness) whose capture the device key signs (proving the device too) instead of the
proof and the OTP: the face calls' latency is reported on its own line.

    .venv/bin/python -m bench.mfa_bench --flows 200 [--grpc] [--with-face] [--dsn postgresql://...]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bench.harness import pct
from services.common.api.v1 import common_pb2, mfa_pb2
from services.settings import load_config
from services.mfa.binding import payload_digest, transaction_context
from services.mfa.storage import DeviceRecord
from services.common.context import SYSTEM

F = mfa_pb2
POLICY = """\
version: bench-1
factors:
  sms_otp: {resend_cooldown_s: 0, per_phone: {limit: 1000000, window_s: 3600}, per_subject: {limit: 1000000, window_s: 3600}}
actions:
  login: {required: 6.0, acceptable: [[device, sms_otp], [face, device]]}
risk:
  rules:
    velocity: {max_sessions: 1000000}
    fraud_phrases: {phrases: {zh: [代操作, 安全账户], en: [safe account, AnyDesk]}}
"""


def signed(key, tenant: str, s, payloads=()) -> tuple[bytes, bytes]:
    """(transaction context of a login session, the device key's signature over it)."""
    context = transaction_context(session_id=s.session_id, nonce=s.nonce, tenant=tenant, action="login",
                                  evidence=[payload_digest(p) for p in payloads])
    return context, key.sign(context)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--flows", type=int, default=200)
    ap.add_argument("--dsn", default="", help="PostgreSQL DSN (default: SQLite in a temp dir)")
    ap.add_argument("--grpc", action="store_true", help="also run the flows through a loopback gRPC server")
    ap.add_argument("--with-face", action="store_true", help="start a face service and add a face factor")
    args = ap.parse_args()

    from services.common.runtime import Runtime
    from services.mfa import clients as clients_mod
    from services.mfa.service import Orchestrator

    tmp = Path(tempfile.mkdtemp(prefix="mfa-bench-"))
    (tmp / "policies").mkdir()
    (tmp / "policies" / "bench.yaml").write_text(POLICY)
    import logging
    logging.disable(logging.INFO)
    data = {"data_dir": str(tmp / "data"), "storage": {"dsn": args.dsn}, "logging": {"level": "WARNING"},
            "models": {"cache_dir": str(Path(__file__).resolve().parents[1] / "var" / "models")}}
    face_server, face_images = None, (b"", b"")
    if args.with_face:
        face_server, face_images = start_face(load_config(None, **data))
    face = {"target": face_server.address if face_server else "127.0.0.1:9"}
    settings = load_config(None, **data, mfa={"policy_dir": str(tmp / "policies")}, clients={"face": face})
    rt = Runtime.open(settings)
    orch = Orchestrator(rt)
    key = Ed25519PrivateKey.generate()
    pub = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    device = F.DeviceInfo(platform="android", os_version="14.2", model="Pixel 8", app_version="5.1.0",
                          locale="zh-CN", timezone="Asia/Shanghai", screen_width=1080, screen_height=2400,
                          install_id="bench-install")
    from services.mfa import devices, subjects

    tenant = "bench"
    subject_ids = [f"cust-{i:04d}" for i in range(10 if args.with_face else 50)]
    dev_ids = {}
    for sid in subject_ids:
        ref = common_pb2.SubjectRef(tenant_id=tenant, subject_id=sid)
        subjects.set_phone_number(rt, F.SetPhoneNumberRequest(subject=ref, phone_e164="+8613800135678"), caller=SYSTEM)
        if face_server:
            enrol_face(settings, face_server.address, ref, face_images[0])
        canon = devices.canonical(device, orch._device_key, tenant)
        dev_ids[sid] = orch.store.devices.add(DeviceRecord(tenant, sid, canon.fingerprint, pub, canon.soft,
                                                          "bench", "android")).id
    outbox = settings.data_dir / "sms-outbox.jsonl"
    image = face_images[1]

    def flow(i: int) -> tuple[float, float, int]:
        sid = subject_ids[i % len(subject_ids)]
        token = clients_mod.biometric_seconds.set(0.0)
        t0 = time.perf_counter()
        s = orch.start(F.StartAuthenticationRequest(
            subject=common_pb2.SubjectRef(tenant_id=tenant, subject_id=sid), channel=F.CHANNEL_APP,
            action="login", device=device,
            context=F.ContextSignals(country="CN", conversation_text="我想查询余额" if i % 2 else "")), caller=SYSTEM)
        if image:
            context, signature = signed(key, tenant, s, [image])
            orch.submit(F.SubmitFactorRequest(session_id=s.session_id, face=F.FaceEvidence(
                image=common_pb2.Image(data=image), binding=F.CaptureBinding(
                    device_id=dev_ids[sid], signature=signature, context=context))), caller=SYSTEM)
        else:
            context, signature = signed(key, tenant, s)
            orch.submit(F.SubmitFactorRequest(session_id=s.session_id, device=F.DeviceProof(
                device_id=dev_ids[sid], signature=signature, context=context)), caller=SYSTEM)
            orch.send_otp(F.SendOtpRequest(session_id=s.session_id), caller=SYSTEM)
            with open(outbox, "rb") as fh:
                fh.seek(max(0, outbox.stat().st_size - 400))
                code = fh.read().decode(errors="ignore").strip().splitlines()[-1].split('"text": "')[1][:6]
            orch.submit(F.SubmitFactorRequest(session_id=s.session_id, otp=F.OtpEvidence(code=code)), caller=SYSTEM)
        d = orch.decide(F.DecideRequest(session_id=s.session_id), caller=SYSTEM)
        total = time.perf_counter() - t0
        bio = clients_mod.biometric_seconds.get()
        clients_mod.biometric_seconds.reset(token)
        return total, bio, d.outcome

    for i in range(10):  # warm-up
        flow(i)
    own, bio, outcomes = [], [], []
    t_start = time.perf_counter()
    for i in range(args.flows):
        total, b, outcome = flow(i)
        own.append(total - b)
        bio.append(b)
        outcomes.append(outcome)
    wall = time.perf_counter() - t_start
    allowed = sum(o == F.OUTCOME_ALLOW for o in outcomes)
    backend = "PostgreSQL" if args.dsn else "SQLite (WAL, synchronous=FULL)"
    print(f"storage: {backend}; flows: {args.flows}; allowed: {allowed}")
    print(f"orchestrator own work per decision: p50 {pct(own, 50):.1f} ms, p99 {pct(own, 99):.1f} ms, "
          f"mean {statistics.mean(own) * 1000:.1f} ms")
    print(f"decisions per second (one thread, own work): {len(own) / sum(own):.1f}; wall incl. biometrics: "
          f"{args.flows / wall:.1f}/s")
    if image:
        print(f"face service calls (Verify with passive liveness, loopback): p50 {pct(bio, 50):.1f} ms, "
              f"p99 {pct(bio, 99):.1f} ms")
    else:
        print("biometric calls: none in this flow (device key + SMS OTP); measure them with --with-face")

    # the same decision alone, and a signature alone, to show where the time goes
    tokens = [orch.tokens.issue({"aud": "b", "sub": "s", "sid": "x", "decision": "allow"})[0] for _ in range(200)]
    t0 = time.perf_counter()
    for _ in range(200):
        orch.tokens.issue({"aud": "b", "sub": "s", "sid": "x", "decision": "allow"})
    print(f"EdDSA token signing alone: {(time.perf_counter() - t0) / 200 * 1e6:.0f} us; {len(tokens)} tokens")

    if args.grpc and not image:
        grpc_bench(settings, tenant, subject_ids, dev_ids, device, key, args.flows)
    orch.close()
    rt.close()
    if face_server:
        face_server.stop(0)
    return 0


def start_face(settings):
    """A real face service on loopback, and a genuine (enrol, probe) pair from the fixtures."""
    import csv

    from services.common.server.bootstrap import RunningServer
    from services.serve import definition, prepare

    fixtures = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
    with open(fixtures / "trials_face.csv", newline="") as fh:
        row = next(r for r in csv.DictReader(fh) if r["target"] == "1")
    prepare(settings)
    server = RunningServer(settings, definition(settings, "face"), port=0).start()
    if not server.ready.wait(600):
        raise SystemExit("the face service did not become SERVING")
    return server, ((fixtures / row["enroll"]).read_bytes(), (fixtures / row["probe"]).read_bytes())


def enrol_face(settings, address, ref, image: bytes) -> None:
    import json

    from services.common.api.v1 import face_pb2, face_pb2_grpc
    from services.common.client import connect
    from services.common.runtime import Runtime
    from services.mfa import subjects

    rt = Runtime.open(settings)
    subjects.record_consent(rt, common_pb2.RecordConsentRequest(consent=common_pb2.Consent(
        subject=ref, purpose=common_pb2.CONSENT_PURPOSE_BIOMETRIC_VERIFICATION,
        modalities=[common_pb2.MODALITY_FACE], granted=True, policy_version="bench")), caller=SYSTEM)
    rt.close()
    token = json.loads(settings.dev_credentials_file.read_text())["dev-enroller"]
    with connect(address, token) as ch:
        face_pb2_grpc.FaceServiceStub(ch).Enroll(face_pb2.EnrollFaceRequest(
            subject=ref, images=[common_pb2.Image(data=image)], replace=True), timeout=120)


def grpc_bench(settings, tenant, subject_ids, dev_ids, device, key, flows: int) -> None:
    import json

    from services.common.api.v1 import mfa_pb2_grpc
    from services.common.client import connect
    from services.common.server.bootstrap import RunningServer
    from services.serve import definition

    server = RunningServer(settings, definition(settings, "mfa"), port=0).start()
    server.ready.wait(60)
    token = json.loads(settings.dev_credentials_file.read_text())["dev-all"]
    outbox = settings.data_dir / "sms-outbox.jsonl"
    lat = []
    with connect(server.address, token) as ch:
        stub = mfa_pb2_grpc.MfaServiceStub(ch)
        for i in range(flows + 10):
            sid = subject_ids[i % len(subject_ids)]
            t0 = time.perf_counter()
            s = stub.StartAuthentication(F.StartAuthenticationRequest(
                subject=common_pb2.SubjectRef(tenant_id=tenant, subject_id=sid), channel=F.CHANNEL_APP,
                action="login", device=device))
            context, signature = signed(key, tenant, s)
            stub.SubmitFactor(F.SubmitFactorRequest(session_id=s.session_id, device=F.DeviceProof(
                device_id=dev_ids[sid], signature=signature, context=context)))
            stub.SendOtp(F.SendOtpRequest(session_id=s.session_id))
            code = json.loads(outbox.read_text().splitlines()[-1])["text"][:6]
            stub.SubmitFactor(F.SubmitFactorRequest(session_id=s.session_id, otp=F.OtpEvidence(code=code)))
            stub.Decide(F.DecideRequest(session_id=s.session_id))
            if i >= 10:
                lat.append(time.perf_counter() - t0)
    server.stop(0)
    print(f"over gRPC loopback (5 RPCs per decision): p50 {pct(lat, 50):.1f} ms, "
          f"p99 {pct(lat, 99):.1f} ms, {len(lat) / sum(lat):.1f} decisions/s")


if __name__ == "__main__":
    raise SystemExit(main())
