import shutil

from services.common.api import generate


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
