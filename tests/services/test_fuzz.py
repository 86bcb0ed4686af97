"""Property-based hostile input over every RPC of the three services (issue 12's fuzzing, kept).

Real face, voice and MFA services on loopback with one SQLite database; a subject consented and
enrolled in both modalities, an authentication session and open challenges, so that generated
requests that carry the real ids get past validation and into decoding, models and decisions.
Every request message is generated from its descriptor (tests/services/fuzz_messages.py). For
every example: the status is never INTERNAL or UNKNOWN (nor a hang), and no table changed unless
an audit record was appended with it. After each RPC's examples the service still answers, and
bytes that are no protobuf message are INVALID_ARGUMENT. Hypothesis runs derandomised (a fixed
seed per test) with a bounded example budget, no example database.
"""

from __future__ import annotations

import os

import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.common.api.v1 import common_pb2, face_pb2, face_pb2_grpc, mfa_pb2, mfa_pb2_grpc, voice_pb2, voice_pb2_grpc
from services.common.errors import details_of
from services.common.storage import ConsentRecord
from tests.conftest import ServiceHarness, db_snapshot, make_settings

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "face"))
from face_helpers import bomb_png, many_scan_jpeg  # noqa: E402
from fuzz_messages import message_class, requests  # noqa: E402

pytestmark = [pytest.mark.fuzz,
              # insightface's norm_crop calls a deprecated scikit-image method once per aligned face
              pytest.mark.filterwarnings("ignore:`estimate` is deprecated:FutureWarning")]

EXAMPLES = 50  # per RPC: 31 RPCs, the module in about two minutes on 2 cores
SERVICES = {
    "face": face_pb2.DESCRIPTOR.services_by_name["FaceService"],
    "voice": voice_pb2.DESCRIPTOR.services_by_name["VoiceService"],
    "mfa": mfa_pb2.DESCRIPTOR.services_by_name["MfaService"],
}
# Destructive RPCs last, so that the others meet the enrolled subject.
LAST = ("DeleteSubject", "WithdrawConsent")
RPCS = sorted(((s, m.name) for s, d in SERVICES.items() for m in d.methods), key=lambda sm: (sm[1] in LAST, sm))
# Tables a request may change without an audit record: counters of attempts (rate limits).
UNAUDITED = {"rate_limits", "audit_records", "audit_head", "audit_checkpoints"}
TENANT, SUBJECT = "bank-fz", "cust-fz-1"
FORBIDDEN = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED)
SEEN: Counter = Counter()  # (service, rpc, status) -> examples


@dataclass
class Stack:
    harness: ServiceHarness
    channels: dict[str, grpc.Channel]
    pools: dict[str, list[str]]
    payloads: list[bytes]
    blobs: dict[str, bytes]
    stubs: dict[str, object] = field(default_factory=dict)

    def snapshot(self) -> dict[str, tuple[int, str]]:
        return db_snapshot(self.harness.settings.sqlite_path)

    def call(self, service: str, method, request) -> tuple[grpc.StatusCode, str]:
        path = f"/{SERVICES[service].full_name}/{method.name}"
        out = message_class(method.output_type)
        channel = self.channels[service]
        try:
            if method.client_streaming:
                channel.stream_unary(path, request_serializer=lambda m: m.SerializeToString(),
                                     response_deserializer=out.FromString)(iter(request), timeout=60)
            else:
                channel.unary_unary(path, request_serializer=lambda m: m.SerializeToString(),
                                    response_deserializer=out.FromString)(request, timeout=60)
        except grpc.RpcError as err:
            return err.code(), details_of(err)["reason"]
        return grpc.StatusCode.OK, ""

    def raw(self, service: str, method, data: bytes) -> tuple[grpc.StatusCode, str]:
        path = f"/{SERVICES[service].full_name}/{method.name}"
        channel = self.channels[service]
        call: Any = channel.stream_unary(path) if method.client_streaming else channel.unary_unary(path)
        try:
            call(iter([data]) if method.client_streaming else data, timeout=60)
        except grpc.RpcError as err:
            return err.code(), details_of(err)["reason"]
        return grpc.StatusCode.OK, ""


def _quiet_lazy_modules() -> None:
    """Hypothesis reads ``__file__`` of every module in sys.modules (for constants of local code);
    speechbrain's lazy modules import their target on any attribute and raise ImportError for the
    optional integrations that are not installed (k2). A ``__file__`` of their own ends that."""
    from speechbrain.utils.importutils import LazyModule

    for module in list(sys.modules.values()):
        if isinstance(module, LazyModule) and module.lazy_module is None:
            module.__dict__.setdefault("__file__", None)


@pytest.fixture(scope="module")
def stack(tmp_path_factory, fixtures_dir):
    data = tmp_path_factory.mktemp("fuzz") / "data"
    common = dict(voice={"replay_store": "memory", "min_net_speech_enroll_s": 1.0,
                         "min_total_net_speech_enroll_s": 1.0},
                  server={"stream_idle_timeout_s": 2.0, "rpc_timeout_s": 30.0})
    harness = ServiceHarness(make_settings(data, **common))
    face, voice = harness.start("face"), harness.start("voice")
    harness.settings = make_settings(data, **common, clients={"face": {"target": face.address},
                                                              "voice": {"target": voice.address}})
    harness.start("mfa")
    channels = {name: harness.channel(name) for name in SERVICES}

    rt = face.definition.service.rt
    for subject in (SUBJECT, "cust-fz-2"):
        rt.storage.subjects.record_consent(ConsentRecord(TENANT, subject, "biometric_verification", ("face", "voice"), "v1"))
        rt.storage.subjects.record_consent(ConsentRecord(TENANT, subject, "biometric_identification", ("face",), "v1"))
    photo = (fixtures_dir / "face/verification/barack_obama/face_recognition_examples_obama.jpg").read_bytes()
    clips = sorted((fixtures_dir / "voice/verification/libri_1688").glob("*.wav"), key=lambda p: -p.stat().st_size)
    wavs = [p.read_bytes() for p in clips[:3]]
    ref = common_pb2.SubjectRef(tenant_id=TENANT, subject_id=SUBJECT)
    face_pb2_grpc.FaceServiceStub(channels["face"]).Enroll(face_pb2.EnrollFaceRequest(
        subject=ref, images=[common_pb2.Image(data=photo)]))
    voice_pb2_grpc.VoiceServiceStub(channels["voice"]).Enroll(voice_pb2.EnrollVoiceRequest(
        subject=ref, utterances=[common_pb2.Audio(data=w) for w in wavs[:2]]))
    mfa = mfa_pb2_grpc.MfaServiceStub(channels["mfa"])
    mfa.SetPhoneNumber(mfa_pb2.SetPhoneNumberRequest(subject=ref, phone_e164="+8613812345678"))
    device = mfa_pb2.DeviceInfo(platform="android", install_id="inst-fz-1", model="pixel 8", os_version="14")
    session = mfa.StartAuthentication(mfa_pb2.StartAuthenticationRequest(
        subject=ref, channel=mfa_pb2.CHANNEL_APP, action="login", device=device)).session_id
    nonces = [
        face_pb2_grpc.FaceServiceStub(channels["face"]).StartLivenessChallenge(
            face_pb2.StartLivenessChallengeRequest(subject=ref)).challenge.nonce,
        voice_pb2_grpc.VoiceServiceStub(channels["voice"]).StartVoiceChallenge(
            voice_pb2.StartVoiceChallengeRequest(subject=ref)).challenge.nonce,
    ]
    pools = {
        "tenant": [TENANT], "subject": [SUBJECT, "cust-fz-2"], "session": [session], "nonce": nonces,
        "review": ["rev_" + "0" * 32], "device_id": ["dev_" + "0" * 32], "policy_version": ["privacy-v1"],
        "reason": ["gdpr-art17"], "action": ["login", "payment"], "currency": ["CNY"], "phone": ["+8613812345678"],
        "code": ["123456"], "platform": ["android", "ios"], "install_id": ["inst-fz-1"], "model": ["pixel 8"],
        "ip_address": ["203.0.113.7"], "country": ["CN"], "status": ["pending"], "idempotency_key": ["idem-fz"],
        "label": ["my phone"], "evidence_ref": ["doc-1"], "note": ["ok"], "locale": ["zh-CN"],
    }
    payloads = [photo, photo[: len(photo) // 2], bomb_png(7000, 7000), many_scan_jpeg(), wavs[2], wavs[2][:64],
                b"\xff" * 1600, b"fLaC" + bytes(60), b"RIFF\x00\x00\x00\x00WAVEfmt ", device.SerializeToString()]
    # what a well-behaved client puts in each bytes field
    frames = [common_pb2.Frame(image=common_pb2.Image(data=photo), capture_time_ms=200 * i) for i in range(6)]
    blobs = {"Image.data": photo, "Audio.data": wavs[2], "chunk": b"\xff" * 4000, "signature": bytes(64),
             "public_key": Ed25519PrivateKey.generate().public_key().public_bytes(
                 serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo),
             "Header.format": common_pb2.AudioFormat(encoding=common_pb2.AUDIO_ENCODING_MULAW, sample_rate_hz=8000),
             "SubmitLivenessChallengeRequest.frames": frames, "FaceEvidence.frames": [],
             "Consent.modalities": None}
    _quiet_lazy_modules()
    yield Stack(harness, channels, pools, payloads, blobs)
    for channel in channels.values():
        channel.close()
    harness.stop()


@pytest.mark.parametrize("service,rpc", RPCS, ids=[f"{s}.{r}" for s, r in RPCS])
def test_hostile_requests_get_a_clear_status_and_never_an_unaudited_write(stack, service, rpc):
    method = SERVICES[service].methods_by_name[rpc]
    one = requests(method.input_type, stack.pools, stack.payloads, stack.blobs)
    generated = st.lists(one, min_size=1, max_size=5) if method.client_streaming else one

    @settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(generated)
    def hostile(request):
        before = stack.snapshot()
        code, reason = stack.call(service, method, request)
        SEEN[service, rpc, code] += 1
        after = stack.snapshot()
        changed = sorted(t for t in after if t not in UNAUDITED and after[t] != before.get(t))
        if changed:
            assert after["audit_records"][0] > before["audit_records"][0], \
                f"{service}.{rpc} ({code.name}): {changed} written without an audit record"
        assert code not in FORBIDDEN, f"{service}.{rpc}: {code.name} {reason}"

    hostile()
    # still answering, and bytes that are no message of this RPC refused as such
    with grpc.insecure_channel(stack.harness.running[service].address) as channel:
        health: Any = health_pb2_grpc.HealthStub(channel)  # its stubs declare none of its methods
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == \
            health_pb2.HealthCheckResponse.SERVING
    for garbage in (b"\xff\xff\xff\xff", b"\x0a\xff\xff\xff\x0f"):
        assert stack.raw(service, method, garbage) == (grpc.StatusCode.INVALID_ARGUMENT, "MALFORMED_REQUEST")
    known = stack.call("face", SERVICES["face"].methods_by_name["GetEnrollment"],
                       common_pb2.GetEnrollmentRequest(subject=common_pb2.SubjectRef(tenant_id=TENANT, subject_id=SUBJECT)))
    assert known[0] == grpc.StatusCode.OK


def test_the_fuzz_reaches_past_validation():
    """The generated requests are not all refused at the door: carrying the real ids, many are answered."""
    rpcs = {(service, rpc) for service, rpc, _ in SEEN}
    if len(rpcs) < len(RPCS):
        # -k runs of single RPCs locally; CI runs the whole module, where a skip would hide a gap
        (pytest.fail if os.environ.get("CI") else pytest.skip)("only with the whole module")
    answered = {(service, rpc) for service, rpc, code in SEEN if code == grpc.StatusCode.OK}
    for (service, rpc, code), n in sorted(SEEN.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2].name)):
        print(f"{service}.{rpc} {code.name} {n}")
    assert len(answered) >= len(RPCS) // 2, sorted(rpcs - answered)
