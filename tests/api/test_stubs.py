import shutil
import uuid

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool

from services.common.api import generate
from services.common.api.v1 import common_pb2
from services.common.server.auth import Authenticator
from services.common.server.interceptor import ServerInterceptor, roles_by_method, tenants_by_method
from tests.conftest import make_settings


def test_committed_stubs_match_the_protos():
    assert generate.stale_files() == [], "run: python -m services.common.api.generate"


def test_a_changed_proto_makes_the_stubs_stale(tmp_path):
    proto_dir = tmp_path / "proto"
    shutil.copytree(generate.PROTO_DIR, proto_dir)
    face = proto_dir / "biogate" / "v1" / "face.proto"
    face.write_text(face.read_text().replace("bool replace = 3;", "bool replace = 3;\n  string note = 99;"))
    assert {"face_pb2.py", "face_pb2.pyi"} <= set(generate.stale_files(proto_dir))


def test_a_hand_edited_stub_is_stale(tmp_path):
    out = tmp_path / "v1"
    shutil.copytree(generate.OUT_DIR, out)
    (out / "mfa_pb2.py").write_text((out / "mfa_pb2.py").read_text() + "\n# edited\n")
    assert generate.stale_files(out_dir=out) == ["mfa_pb2.py"]


def test_every_rpc_declares_roles():
    from services.common.api.v1 import face_pb2, mfa_pb2, voice_pb2
    from services.common.server.interceptor import roles_by_method

    descriptors = [m.DESCRIPTOR.services_by_name[n] for m, n in
                   ((face_pb2, "FaceService"), (voice_pb2, "VoiceService"), (mfa_pb2, "MfaService"))]
    table = roles_by_method(descriptors)
    assert len(table) == sum(len(d.methods) for d in descriptors)
    assert all(table.values()), [m for m, r in table.items() if not r]


def _descriptors():
    from services.common.api.v1 import face_pb2, mfa_pb2, voice_pb2

    return [m.DESCRIPTOR.services_by_name[n] for m, n in
            ((face_pb2, "FaceService"), (voice_pb2, "VoiceService"), (mfa_pb2, "MfaService"))]


def test_every_rpc_declares_its_tenant():
    descriptors = _descriptors()
    table = tenants_by_method(descriptors)  # raises for an RPC without the option or with a wrong field
    assert len(table) == sum(len(d.methods) for d in descriptors) == 38
    assert [m for m, r in table.items() if r.none] == ["/biogate.v1.MfaService/GetSigningKeys"]
    by_lookup = {m.rsplit("/", 1)[1]: r.lookup for m, r in table.items() if r.lookup}
    assert by_lookup == {"StartBiometricChallenge": "session", "SubmitFactor": "session",
                         "StreamVoiceFactor": "session", "SendOtp": "session",
                         "Decide": "session", "RegisterDevice": "session", "StartDeviceRegistration": "session",
                         "ResolveReview": "review", "GetReview": "review",
                         "SendPushConfirmation": "session", "ConfirmTransaction": "session",
                         "GetPushConfirmation": "session"}
    assert table["/biogate.v1.VoiceService/StreamVerify"].path == ("header", "subject", "tenant_id")
    assert table["/biogate.v1.MfaService/StreamVoiceFactor"].path == ("header", "session_id")
    assert table["/biogate.v1.MfaService/RecordConsent"].path == ("consent", "subject", "tenant_id")
    assert table["/biogate.v1.FaceService/Identify"].path == ("tenant_id",)


def _service_with(option_field: str | None):
    """A service whose one RPC declares ``option_field`` as its tenant (None: no declaration)."""
    name = f"t{uuid.uuid4().hex[:8]}"
    fdp = descriptor_pb2.FileDescriptorProto(name=f"test/{name}.proto", package=f"test.{name}", syntax="proto3",
                                             dependency=["biogate/v1/common.proto"])
    fdp.message_type.add(name="Req").field.add(name="subject", number=1, type=11, label=1,
                                               type_name=".biogate.v1.SubjectRef")
    method = fdp.service.add(name="Svc").method.add(name="Do", input_type=f".test.{name}.Req",
                                                    output_type=f".test.{name}.Req")
    if option_field is not None:
        method.options.Extensions[common_pb2.tenant].field = option_field  # type: ignore[index,assignment]  # protoc types extensions as FieldDescriptor
    return descriptor_pool.Default().AddSerializedFile(fdp.SerializeToString()).services_by_name["Svc"]


def test_an_rpc_without_a_tenant_or_with_a_wrong_field_stops_the_server():
    assert tenants_by_method([_service_with("subject.tenant_id")])  # the well-formed one is accepted
    with pytest.raises(ValueError, match="declares no"):
        tenants_by_method([_service_with(None)])
    for wrong in ("tenant_id", "subject", "subject.tenant", "subject.tenant_id.x"):
        with pytest.raises(ValueError, match="not a string field path"):
            tenants_by_method([_service_with(wrong)])


def test_a_declared_lookup_the_service_does_not_provide_stops_the_server(tmp_path):
    mfa = [d for d in _descriptors() if d.name == "MfaService"]
    auth = Authenticator.from_settings(make_settings(tmp_path))
    with pytest.raises(ValueError, match="review, session"):
        ServerInterceptor("mfa", auth, roles_by_method(mfa), 30.0, tenants_by_method(mfa), {})


def test_the_sdk_s_stubs_and_shared_modules_match_the_protos_and_their_sources_in_services_common():
    assert set(generate.SHARED) == {"wire.py", "webhook_signature.py"}
    assert generate.stale_sdk_files() == [], "run: python -m services.common.api.generate"


@pytest.mark.parametrize("name", sorted(generate.SHARED))
def test_a_hand_edited_sdk_copy_of_a_shared_module_is_stale(tmp_path, name):
    sdk = tmp_path / "_api"
    shutil.copytree(generate.SDK_DIR, sdk, ignore=shutil.ignore_patterns("__pycache__"))
    (sdk / name).write_text((sdk / name).read_text() + "\n# edited in the SDK\n")
    assert generate.stale_sdk_files(sdk_dir=sdk) == [name]
    edited = tmp_path / name  # and the copy follows its source
    edited.write_text(generate.SHARED[name].read_text() + "\n# edited\n")
    assert generate.stale_sdk_files(shared={**generate.SHARED, name: edited}) == [name]


def test_the_server_s_and_the_sdk_s_stubs_in_one_process_share_descriptors_and_classes():
    """Both register biogate/v1/*.proto in the default pool; the runtime accepts the identical
    files and gives both modules the same message classes, so messages pass between them."""
    from biogate_client._api.v1 import common_pb2 as sdk_common, mfa_pb2 as sdk_mfa
    from services.common.api.v1 import mfa_pb2

    assert sdk_mfa.DESCRIPTOR is mfa_pb2.DESCRIPTOR
    assert sdk_mfa.StartAuthenticationRequest is mfa_pb2.StartAuthenticationRequest
    assert sdk_common.SubjectRef is common_pb2.SubjectRef
