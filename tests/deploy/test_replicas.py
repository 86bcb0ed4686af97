"""Two processes of each service on one PostgreSQL schema, one Redis and one HSM token (SoftHSM2), as
replicas run behind a Kubernetes Service: no shared files, each with its own data directory.

Bounded for CI (a few dozen operations, liveness and AASIST off to keep six processes within two
cores): concurrent enrolments through both face replicas while one is killed with SIGKILL, then
every acknowledged enrolment verifies through the other and both replicas' galleries answer the
same; voice enrolments and verifications across replicas, the replay cache shared; MFA logins whose
steps alternate between the replicas, one OTP submitted to both at once (spent once), wrong OTPs
sent to both (every failure counted, the subject locked on both), a session carried on after its
replica was killed; finally `biogate audit verify` on the shared trail."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor, as_completed

import grpc
import pytest
import redis
import yaml

from services.common.api.v1 import common_pb2, face_pb2, face_pb2_grpc, mfa_pb2, mfa_pb2_grpc, voice_pb2, voice_pb2_grpc
from services.common.client import connect
from services.common.config import PROJECT_ROOT
from services.common.errors import details_of
from services.common.storage import open_storage
from services.mfa import storage as mfa_storage
from tests.conftest import present
from tests.deploy.test_example_config import health
from tests.mfa.conftest import OTP_POLICY, phone_device
from tests.services.test_serve_cli import free_ports

TOKEN = "replica-tester-" + uuid.uuid4().hex
FACE_TENANT, OTP_TENANT = "bank-r", "otp-bank"
F = mfa_pb2
REDIS = "redis://127.0.0.1:6379/0"


class Cluster:
    def __init__(self, tmp_path, pg_dsn, hsm) -> None:
        # DEBUG: a replica that exits at start leaves its traceback in its log, which the failure shows
        self.tmp, self.env, self.dsn = tmp_path, dict(os.environ, **hsm.env(), BIOGATE_LOGGING__LEVEL="DEBUG"), pg_dsn
        self.prefix = f"biogate-test:{uuid.uuid4().hex[:10]}"
        (tmp_path / "policies").mkdir()
        (tmp_path / "policies" / f"{OTP_TENANT}.yaml").write_text(OTP_POLICY)
        ports = iter(free_ports(36))
        self.endpoints = {r: {s: {"host": "127.0.0.1", "port": next(ports), "metrics_port": next(ports),
                                  "health_port": next(ports)} for s in ("face", "voice", "mfa")} for r in "ab"}
        self.common = {
            "storage": {"dsn": pg_dsn, "pool_size": 4},
            "keys": hsm.keys_config(),
            "auth": {"dev_credentials": False, "principals": [{
                "name": "tester", "roles": ["enroller", "verifier", "orchestrator", "admin", "auditor", "service"],
                "token_sha256": hashlib.sha256(TOKEN.encode()).hexdigest()}]},
            "models": {"cache_dir": str(PROJECT_ROOT / "var" / "models")},
            "face": {"liveness": []},
            # text-independent verification through both replicas (the shared replay cache is what is
            # tested; the digit challenge has its own tests)
            "voice": {"antispoof": "", "replay_store": REDIS, "replay_key_prefix": self.prefix,
                      "min_net_speech_enroll_s": 1.0, "min_total_net_speech_enroll_s": 1.0,
                      "tenants": {FACE_TENANT: {"require_challenge": False}}},
            "mfa": {"policy_dir": str(tmp_path / "policies"), "policy_check_s": 0, "http": {"port": 0}},
            # both MFA replicas call the face and voice replicas that stay up
            "clients": {"face": {"target": self.address("b", "face"), "token": TOKEN},
                        "voice": {"target": self.address("b", "voice"), "token": TOKEN}},
        }
        self.procs: dict[tuple[str, str], subprocess.Popen] = {}

    def address(self, replica: str, service: str) -> str:
        return f"127.0.0.1:{self.endpoints[replica][service]['port']}"

    def config(self, replica: str):
        path = self.tmp / f"replica-{replica}.yaml"
        if not path.exists():
            path.write_text(yaml.safe_dump({**self.common, "data_dir": str(self.tmp / f"data-{replica}"),
                                            "server": self.endpoints[replica]}))
        return path

    def cli(self, replica: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "services.cli", "--config", str(self.config(replica)), *args],
                              env=self.env, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)

    def start(self, replica: str, service: str) -> None:
        log = open(self.tmp / f"{service}-{replica}.log", "a")
        self.procs[(replica, service)] = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "--config", str(self.config(replica)), "serve", service],
            env=self.env, cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL, stderr=log)
        log.close()

    def wait(self, keys, timeout: float = 420) -> None:
        deadline, waiting = time.monotonic() + timeout, set(keys)
        while waiting and time.monotonic() < deadline:
            for replica, service in list(waiting):
                proc = self.procs[(replica, service)]
                log = (self.tmp / f"{service}-{replica}.log").read_text()[-2000:]
                assert proc.poll() is None, f"{service}-{replica} exited: {log}"
                if health(f"127.0.0.1:{self.endpoints[replica][service]['health_port']}") == "SERVING":
                    waiting.discard((replica, service))
            time.sleep(0.5)
        assert not waiting, f"not SERVING within {timeout} s: {sorted(waiting)}"

    def kill(self, replica: str, service: str) -> None:
        proc = self.procs[(replica, service)]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)

    def stub(self, replica: str, service: str):
        channel = connect(self.address(replica, service), TOKEN)
        stub = {"face": face_pb2_grpc.FaceServiceStub, "voice": voice_pb2_grpc.VoiceServiceStub,
                "mfa": mfa_pb2_grpc.MfaServiceStub}[service](channel)
        return stub

    def outbox(self, replica: str, phone: str = "") -> list[str]:
        """Codes the replica's development SMS sink sent (to numbers ending like ``phone``)."""
        path = self.tmp / f"data-{replica}" / "sms-outbox.jsonl"
        entries = [json.loads(line) for line in path.read_text().splitlines() if line]
        return [e["text"].split()[0] for e in entries if e["to"].endswith(phone[-4:])]

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        client = redis.Redis.from_url(REDIS)
        keys = list(client.scan_iter(f"{self.prefix}:*"))
        if keys:
            client.delete(*keys)


def genuine_pairs(fixtures_dir, name: str, identity_column: str, count: int) -> list[tuple[str, bytes, bytes]]:
    seen: dict[str, tuple[str, bytes, bytes]] = {}
    with open(fixtures_dir / name, newline="") as fh:
        for row in csv.DictReader(fh):
            who = row[identity_column]
            if row["target"] == "1" and who not in seen and len(seen) < count:
                seen[who] = (who, (fixtures_dir / row["enroll"]).read_bytes(), (fixtures_dir / row["probe"]).read_bytes())
    return list(seen.values())


def ref(tenant: str, subject: str) -> common_pb2.SubjectRef:
    return common_pb2.SubjectRef(tenant_id=tenant, subject_id=subject)


def consent(mfa, subject_ref, purposes) -> None:
    for purpose in purposes:
        mfa.RecordConsent(common_pb2.RecordConsentRequest(consent=common_pb2.Consent(
            subject=subject_ref, purpose=purpose, modalities=[common_pb2.MODALITY_FACE, common_pb2.MODALITY_VOICE],
            granted=True, policy_version="privacy-2025-01")), timeout=30)


def answer(call):
    """The reply, or the status code when the call failed (ABORTED: the session changed concurrently)."""
    try:
        return call()
    except grpc.RpcError as err:
        return err.code()


@pytest.fixture
def cluster(tmp_path, pg_dsn, softhsm, fixtures_dir):
    redis.Redis.from_url(REDIS).ping()
    c = Cluster(tmp_path, pg_dsn, softhsm)
    migrated = c.cli("a", "migrate")
    assert migrated.returncode == 0, migrated.stderr
    try:
        for replica in "ab":
            for service in ("face", "voice"):
                c.start(replica, service)
        c.wait([(r, s) for r in "ab" for s in ("face", "voice")])
        for replica in "ab":
            c.start(replica, "mfa")
        c.wait([(r, "mfa") for r in "ab"], timeout=120)
        yield c
    finally:
        c.stop()


def test_two_replicas_of_each_service_share_one_database_one_redis_and_one_token(cluster, fixtures_dir):
    mfa = {r: cluster.stub(r, "mfa") for r in "ab"}
    face = {r: cluster.stub(r, "face") for r in "ab"}
    voice = {r: cluster.stub(r, "voice") for r in "ab"}
    both = (common_pb2.CONSENT_PURPOSE_BIOMETRIC_VERIFICATION, common_pb2.CONSENT_PURPOSE_BIOMETRIC_IDENTIFICATION)

    # -- face: concurrent enrolments through both replicas; replica a killed mid-load ----------
    people = genuine_pairs(fixtures_dir, "trials_face.csv", "enroll_identity", 8)
    for i, (who, _, _) in enumerate(people):
        consent(mfa["ab"[i % 2]], ref(FACE_TENANT, who), both)
    jobs = [(who, image, "ab"[i % 2]) for i, (who, image, _) in enumerate(people)]
    jobs += [(who, image, "a") for who, image, _ in people[:4]]  # re-enrolments (replace) keep replica a busy
    acknowledged: dict[str, int] = {}
    failed_on_a, count_a = [], [0]

    def enrol(who, image, replica):
        reply = face[replica].Enroll(face_pb2.EnrollFaceRequest(subject=ref(FACE_TENANT, who), replace=True,
                                                                images=[common_pb2.Image(data=image)]), timeout=60)
        return who, replica, reply

    with ThreadPoolExecutor(4) as pool:
        futures = {pool.submit(enrol, *job): job for job in jobs}
        killed = False
        for future in as_completed(futures):
            try:
                who, replica, reply = future.result()
            except grpc.RpcError as err:
                assert futures[future][2] == "a" and killed, err  # only the killed replica may fail
                failed_on_a.append(futures[future])
                continue
            assert reply.template.model_id
            acknowledged[who] = acknowledged.get(who, 0) + 1
            if replica == "a":
                count_a[0] += 1
                if count_a[0] == 2 and not killed:
                    cluster.kill("a", "face")
                    killed = True
    assert killed and failed_on_a, "replica a must die with enrolments still in flight or queued"
    for who, image, _ in people:  # what was never acknowledged is enrolled again through b
        if who not in acknowledged:
            enrol(who, image, "b")
    for who, _, probe in people:  # every enrolment is intact and verifies through the surviving replica
        assert len(face["b"].GetEnrollment(common_pb2.GetEnrollmentRequest(subject=ref(FACE_TENANT, who)),
                                           timeout=30).templates) == 1
        r = face["b"].Verify(face_pb2.VerifyFaceRequest(subject=ref(FACE_TENANT, who),
                                                        image=common_pb2.Image(data=probe)), timeout=60)
        assert r.match, (who, r.score, r.threshold)
    cluster.start("a", "face")  # the restarted pod
    cluster.wait([("a", "face")])
    for _, _, probe in people[:3]:  # both replicas' galleries answer the same
        answers = []
        for replica in "ab":
            reply = face[replica].Identify(face_pb2.IdentifyFaceRequest(  # wait out the reconnect backoff
                tenant_id=FACE_TENANT, image=common_pb2.Image(data=probe), top_k=3), timeout=60, wait_for_ready=True)
            answers.append([(c.subject_id, round(c.score, 4)) for c in reply.candidates])
        assert answers[0] == answers[1] and answers[0]

    # -- voice: enrolled through one replica, verified through the other; one replay cache -----
    speakers = genuine_pairs(fixtures_dir, "trials_voice.csv", "enroll_identity", 4)
    for i, (who, _, _) in enumerate(speakers):
        consent(mfa["ab"[i % 2]], ref(FACE_TENANT, who), both[:1])
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda job: voice["ab"[job[0] % 2]].Enroll(voice_pb2.EnrollVoiceRequest(
            subject=ref(FACE_TENANT, job[1][0]), utterances=[common_pb2.Audio(data=job[1][1])]), timeout=120),
            enumerate(speakers)))
    for i, (who, _, probe) in enumerate(speakers):
        first = voice["ab"[(i + 1) % 2]].Verify(voice_pb2.VerifyVoiceRequest(
            subject=ref(FACE_TENANT, who), audio=common_pb2.Audio(data=probe)), timeout=120)
        assert first.match and first.spoof_passed, (who, first)
        again = voice["ab"[i % 2]].Verify(voice_pb2.VerifyVoiceRequest(  # the same capture, the other replica
            subject=ref(FACE_TENANT, who), audio=common_pb2.Audio(data=probe)), timeout=120)
        assert not again.match and not again.spoof_passed

    # -- MFA: decisions whose steps alternate between the replicas ------------------------------
    def setup(subject, phone="+8613800135678"):
        r = ref(OTP_TENANT, subject)
        consent(mfa["a"], r, both[:1])
        mfa["b"].SetPhoneNumber(F.SetPhoneNumberRequest(subject=r, phone_e164=phone), timeout=30)
        return r

    def start(replica, r):
        return mfa[replica].StartAuthentication(F.StartAuthenticationRequest(
            subject=r, channel=F.CHANNEL_APP, action="login",
            device=phone_device(install=f"inst-{r.subject_id}")), timeout=30)  # a phone of each customer's own

    def login(i):
        phone = f"+861380013{5600 + i}"  # its own number: concurrent logins tell their codes apart
        r = setup(f"cust-{i}", phone)
        x, y = "ab"[i % 2], "ab"[(i + 1) % 2]
        s = start(x, r)
        mfa[y].SendOtp(F.SendOtpRequest(session_id=s.session_id), timeout=30)
        code = cluster.outbox(y, phone)[-1]
        assert mfa[x].SubmitFactor(F.SubmitFactorRequest(session_id=s.session_id, otp=F.OtpEvidence(code=code)),
                                   timeout=30).result.passed
        return mfa[y].Decide(F.DecideRequest(session_id=s.session_id), timeout=30).outcome

    with ThreadPoolExecutor(3) as pool:
        outcomes = list(pool.map(login, range(6)))
    assert outcomes == [F.OUTCOME_ALLOW] * 6

    # one OTP sent to both replicas at once: spent once
    r = setup("double-spend")
    s = start("a", r)
    mfa["a"].SendOtp(F.SendOtpRequest(session_id=s.session_id), timeout=30)
    code = cluster.outbox("a")[-1]
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda x: answer(lambda: mfa[x].SubmitFactor(F.SubmitFactorRequest(
            session_id=s.session_id, otp=F.OtpEvidence(code=code)), timeout=30)), "ab"))
    passed = [res for res in results if not isinstance(res, grpc.StatusCode) and res.result.passed]
    assert len(passed) == 1, (code, cluster.outbox("a")[-3:], [r if isinstance(r, grpc.StatusCode) else (
        r.result.passed, [x.code for x in r.result.reasons], r.attempts_left) for r in results])
    assert mfa["b"].Decide(F.DecideRequest(session_id=s.session_id), timeout=30).outcome == F.OUTCOME_ALLOW

    # five wrong codes sent to both replicas at once: no failure lost, the subject locked on both
    r = setup("lockout")
    s = start("b", r)
    mfa["b"].SendOtp(F.SendOtpRequest(session_id=s.session_id), timeout=30)
    wrong = f"{(int(cluster.outbox('b')[-1]) + 1) % 10 ** 6:06d}"
    with ThreadPoolExecutor(5) as pool:
        results = list(pool.map(lambda i: answer(lambda: mfa["ab"[i % 2]].SubmitFactor(F.SubmitFactorRequest(
            session_id=s.session_id, otp=F.OtpEvidence(code=wrong)), timeout=30)), range(5)))
    answered = [res for res in results if not isinstance(res, grpc.StatusCode)]
    assert all(not res.result.passed for res in answered) and len(answered) >= 4, results
    with open_storage(cluster.dsn) as storage:  # the shared counters themselves
        with storage.db.read() as q:
            attempts = q.one("SELECT attempts FROM otp_challenges WHERE session_id = ?", (s.session_id,))[0]
        failures = present(mfa_storage.attach(storage).lockouts.get(OTP_TENANT, "subject", "lockout")).failures
    assert attempts == 5, results  # every guess charged, on either replica
    assert failures == len(answered), results  # every answered failure counted once (an ABORTED one rolled back)
    if failures == 5:
        for replica in "ab":
            with pytest.raises(grpc.RpcError) as locked:
                start(replica, r)
            assert details_of(locked.value)["reason"] == "SUBJECT_LOCKED", results

    # a session carried on after its replica was killed: the OTP it sent is not lost
    r = setup("survivor")
    s = start("a", r)
    mfa["a"].SendOtp(F.SendOtpRequest(session_id=s.session_id), timeout=30)
    code = cluster.outbox("a")[-1]
    cluster.kill("a", "mfa")
    assert mfa["b"].SubmitFactor(F.SubmitFactorRequest(session_id=s.session_id, otp=F.OtpEvidence(code=code)),
                                 timeout=30).result.passed
    assert mfa["b"].Decide(F.DecideRequest(session_id=s.session_id), timeout=30).outcome == F.OUTCOME_ALLOW

    # -- the shared audit trail verifies --------------------------------------------------------
    verified = cluster.cli("b", "audit", "verify")
    assert verified.returncode == 0 and "audit trail: OK" in verified.stdout, verified.stdout + verified.stderr
