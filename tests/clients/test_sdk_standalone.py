"""The SDK as a bank's app team installs it: ``pip install clients/python`` into a fresh virtual
environment (no biogate server package, no torch or onnxruntime), then a login and a refusal
against a real MFA server on loopback, which this process runs (tests/clients/conftest.py)."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from services.common import webhook_signature
from tests.test_architecture import imports_of

ROOT = Path(__file__).resolve().parents[2]
SDK = ROOT / "clients" / "python"

# Run by the fresh environment's interpreter with -I (no PYTHONPATH, no user site, not the
# working directory): argv = MFA address, dev-all token, SMS outbox, a webhook signed by the
# server's code ({"secret", "header", "body", "t"}).
CHILD = r'''
import importlib.metadata
import importlib.util
import json
import sys

address, token, outbox, hook = sys.argv[1:5]
absent = [m for m in ("services", "torch", "onnxruntime", "cv2", "speechbrain") if importlib.util.find_spec(m)]
try:
    importlib.metadata.distribution("biogate")
    server_installed = True
except importlib.metadata.PackageNotFoundError:
    server_installed = False

import biogate_client
from biogate_client import BioGate, Credentials, Device, InvalidArgument, dev_otp, outcome_name, webhooks

hook = json.loads(hook)
webhooks.verify(["whsec-unknown-0123456789", hook["secret"]], hook["header"], hook["body"].encode(), hook["t"] + 5)
try:
    webhooks.verify(hook["secret"], hook["header"], hook["body"].encode() + b" ", hook["t"])
    tampered = None
except ValueError as e:
    tampered = str(e)

bg = BioGate(mfa=address, face="127.0.0.1:9", voice="127.0.0.1:9", credentials=Credentials(token=token), timeout=30)
bg.record_consent("otp-bank", "sdk-fresh-0001")
bg.set_phone("otp-bank", "sdk-fresh-0001", "+8613800199001")
s = bg.start("otp-bank", "sdk-fresh-0001", Device())
sent = s.send_otp()
passed = s.submit_otp(dev_otp(outbox, sent.masked_phone)).passed
d = s.decide()
claims = bg.verify_token(d.token, "otp-bank", session_id=s.id)
refusals = []
for call in (lambda: bg.record_consent("otp-bank", "13800135678"),
             lambda: bg.set_phone("otp-bank", "sdk-fresh-0001", "not a number")):
    try:
        call()
        refusals.append(None)
    except InvalidArgument as e:
        refusals.append({"reason": e.reason, "fields": e.fields})
bg.close()
print(json.dumps({
    "present": absent, "server_installed": server_installed, "sdk_file": biogate_client.__file__,
    "loaded": sorted(m for m in sys.modules if m.split(".")[0] in ("services", "torch", "onnxruntime")),
    "passed": passed, "outcome": outcome_name(d.outcome), "session_id": s.id, "claims": claims,
    "refusals": refusals, "webhook_headers": [webhooks.SIGNATURE_HEADER, webhooks.EVENT_HEADER],
    "tampered": tampered,
}))
'''


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON") and k != "VIRTUAL_ENV"}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def test_the_sdk_installs_alone_and_logs_in_against_a_real_mfa(mfa_only, tmp_path):
    source = tmp_path / "biogate-client"  # a copy: pip builds in the source tree (build/, *.egg-info)
    shutil.copytree(SDK, source, ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))
    venv = tmp_path / "venv"
    subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", str(venv)], check=True,
                   env=_env())
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", str(source)], check=True, env=_env(), cwd=tmp_path)
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    token = json.loads(Path(mfa_only.settings.dev_credentials_file).read_text())["dev-all"]
    secret, body, t = "whsec-sample-0123456789", '{"id":"evt_1","type":"review.opened"}', 1_700_000_000
    hook = {"secret": secret, "body": body, "t": t,
            "header": webhook_signature.signature(["whsec-new-0123456789", secret], body.encode(), t)}
    run = subprocess.run([str(python), "-I", str(script), mfa_only.address, token, str(mfa_only.outbox),
                          json.dumps(hook)],
                         capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["present"] == [] and out["server_installed"] is False and out["loaded"] == []
    assert Path(out["sdk_file"]).is_relative_to(venv)  # the installed copy, not the worktree's
    assert out["passed"] and out["outcome"] == "ALLOW"
    assert out["claims"]["sid"] == out["session_id"] and out["claims"]["decision"] == "allow"
    consent, phone = out["refusals"]
    assert consent is not None and consent["reason"] == "PERSONAL_NUMBER_AS_ID", consent
    assert phone is not None and phone["fields"] and phone["reason"], phone
    assert out["webhook_headers"] == [webhook_signature.SIGNATURE_HEADER, webhook_signature.EVENT_HEADER]
    assert out["tampered"] == "the signature does not match the body"


def _sdk_imports(root: Path) -> list[str]:
    return [f"{p.relative_to(ROOT)}:{line}: {target}" for p in sorted(root.rglob("*.py"))
            for line, target in imports_of(p) if target.split(".")[0] == "services"]


def _import_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    return roots | {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}


def test_no_sdk_module_imports_the_server_and_the_shared_modules_import_neither_side():
    assert _sdk_imports(SDK / "biogate_client") == []
    wire = _import_roots(ROOT / "services" / "common" / "wire.py")
    assert wire <= {"__future__", "uuid", "collections", "pathlib", "typing", "grpc", "google", "grpc_status"}, wire
    signing = _import_roots(ROOT / "services" / "common" / "webhook_signature.py")  # the standard library only
    assert signing <= {"__future__", "hashlib", "hmac", "re", "collections"}, signing


def test_the_sdk_import_check_catches_a_server_import():
    planted = SDK / "biogate_client" / "_planted_for_standalone_test.py"
    planted.write_text("from services.common.errors import details_of\n")
    try:
        assert any("services.common.errors" in v for v in _sdk_imports(SDK / "biogate_client"))
    finally:
        planted.unlink()
