"""Policy files: the shipped default is valid; errors name their line and field; a broken file
leaves the running policy in force; a changed file is picked up without restart."""

from __future__ import annotations

import os
import time

import grpc
import pytest

from services.common.config import PROJECT_ROOT
from services.common.errors import ServiceError
from services.mfa.policy import PolicyError, PolicyStore, load_policy, parse_policy
from tests.conftest import present

DEFAULT = PROJECT_ROOT / "services" / "mfa" / "policies" / "default.yaml"

MINIMAL = """\
version: v1
actions:
  login:
    required: 6.0
    acceptable: [[face, sms_otp]]
"""


def problems(text: str) -> list[tuple[int, str, str]]:
    with pytest.raises(PolicyError) as err:
        parse_policy(text, "tenant.yaml")
    return [(p.line, p.field, p.message) for p in err.value.problems]


def test_the_shipped_default_policy_is_valid_and_ships_fraud_phrases_in_both_languages():
    policy = load_policy(DEFAULT)
    phrases = present(policy.risk.rules.fraud_phrases).phrases
    assert {"代操作", "紧急转账", "安全账户"} <= set(phrases["zh"])
    assert {"safe account", "remote access", "AnyDesk"} <= set(phrases["en"])
    assert policy.factors.sms_otp.digits >= 6 and policy.factors.sms_otp.ttl_s <= 600
    assert policy.lockout.max_failures == 5 and policy.lockout.max_failures_with_liveness == 10


@pytest.mark.parametrize("text,expected", [
    (MINIMAL.replace("required: 6.0", "required: -2"), (4, "actions.login.required", "greater than 0")),
    (MINIMAL.replace("required: 6.0", "requird: 6.0"), (4, "actions.login.requird", "unknown key")),
    (MINIMAL.replace("[[face, sms_otp]]", "[[face, iris]]"), (5, "actions.login.acceptable.0.1", "'face'")),
    (MINIMAL + "factors:\n  sms_otp:\n    digits: 4\n", (8, "factors.sms_otp.digits", "greater than or equal to 6")),
    (MINIMAL + "factors:\n  sms_otp:\n    ttl_s: 900\n", (8, "factors.sms_otp.ttl_s", "less than or equal to 600")),
    (MINIMAL + "actions:\n  payment: {required: 1, acceptable: [[face]]}\n", (6, "actions", "duplicate key")),
    (MINIMAL.replace("[[face, sms_otp]]", "[[face, face]]"), (5, "actions.login.acceptable", "twice")),
    (MINIMAL + "risk:\n  levels: {medium: 60, high: 50}\n", (7, "risk.levels", "medium <= high")),
    (MINIMAL.replace("version: v1\n", ""), (1, "version", "Field required")),
    ("version: v1\nactions:\n  login: {required: 6, acceptable: [[face]]\n", (4, "", "YAML syntax")),
    ("- just\n- a list\n", (1, "", "mapping")),
])
def test_errors_name_the_line_and_the_field(text, expected):
    line, field, words = expected
    found = problems(text)
    assert any(p[0] == line and p[1] == field and words in p[2] for p in found), found


OLD_BIOMETRIC_KEYS = MINIMAL + """\
factors:
  face:
    uncalibrated_llr: 5.0
    calibration_channel: mobile-selfie
  voice:
    calibration_channels: {wideband: mobile-16k, telephone: telephony-8k}
"""


def test_a_policy_naming_calibration_channels_or_a_guessed_llr_is_refused_with_the_key_named(tmp_path):
    """The services calibrate their own scores: the MFA has no channel to name and credits no guess."""
    found = problems(OLD_BIOMETRIC_KEYS)
    assert [(line, field) for line, field, _ in found] == [
        (8, "factors.face.uncalibrated_llr"), (9, "factors.face.calibration_channel"),
        (11, "factors.voice.calibration_channels")]
    assert all(m.startswith("no longer a policy key: ") and m.endswith("remove the key") for _, _, m in found)
    assert "face service applies the calibration of its own model" in found[1][2]
    assert "never a default credit" in found[0][2]
    # As a tenant's file it is refused (the default stays in force for everyone else); as the
    # default policy the service does not start.
    (tmp_path / "pol").mkdir()
    (tmp_path / "pol" / "bank-x.yaml").write_text(OLD_BIOMETRIC_KEYS)
    store = PolicyStore(DEFAULT, tmp_path / "pol", check_s=0)
    with pytest.raises(ServiceError) as err:
        store.get("bank-x")
    assert err.value.reason == "POLICY_INVALID"
    assert "factors.face.calibration_channel" in str(store.errors[str(tmp_path / "pol" / "bank-x.yaml")])
    assert store.get("bank-y").version == load_policy(DEFAULT).version
    (tmp_path / "default.yaml").write_text(OLD_BIOMETRIC_KEYS)
    with pytest.raises(PolicyError, match="factors.voice.calibration_channels: no longer a policy key"):
        PolicyStore(tmp_path / "default.yaml", None)


def test_the_device_counters_a_subject_keeps_are_policy_at_least_one():
    assert parse_policy(MINIMAL, "t.yaml").lockout.device_counters_per_subject == 10
    assert parse_policy(MINIMAL + "lockout: {device_counters_per_subject: 3}\n", "t.yaml").lockout \
        .device_counters_per_subject == 3
    assert [p[1] for p in problems(MINIMAL + "lockout: {device_counters_per_subject: 0}\n")] == [
        "lockout.device_counters_per_subject"]


def test_all_problems_are_reported_at_once_in_line_order():
    text = MINIMAL.replace("required: 6.0", "required: 0") + "lockout: {max_failures: 0, delay_s: -1}\n"
    found = problems(text)
    assert [p[1] for p in found] == ["actions.login.required", "lockout.max_failures", "lockout.delay_s"]
    assert [p[0] for p in found] == [4, 6, 6]
    assert "line 4, column" in str(PolicyError("t.yaml", parse_error(text)))


def test_an_action_with_amounts_requires_its_payee_unless_the_policy_says_otherwise():
    """PSD2 dynamic linking: a payment action written without a `payee:` line let its sessions start,
    and its SMS codes go out, with no payee at all. An action that carries amounts now requires one
    by default; an action without amounts stays optional; `payee: optional` is said outright."""
    bands = "    amount_bands:\n      CNY: [{up_to: null}]\n"
    payment = "  payment:\n    required: 3.0\n    acceptable: [[sms_otp]]\n"
    policy = parse_policy(MINIMAL + payment + bands)
    assert policy.actions["payment"].payee == "required"
    assert policy.actions["login"].payee == "optional"
    relaxed = parse_policy(MINIMAL + payment + "    payee: optional\n" + bands)
    assert relaxed.actions["payment"].payee == "optional"


def parse_error(text):
    try:
        parse_policy(text)
    except PolicyError as e:
        return e.problems
    raise AssertionError("no error")


def _write(path, text):
    path.write_text(text)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # a visibly newer mtime


def test_reload_without_restart_and_a_broken_file_keeps_the_policy_in_force(tmp_path, caplog):
    store = PolicyStore(DEFAULT, tmp_path, check_s=0)
    assert store.get("bank-x").version == load_policy(DEFAULT).version  # no file: the default
    own = tmp_path / "bank-x.yaml"
    _write(own, MINIMAL)
    assert store.get("bank-x").version == "v1"
    _write(own, MINIMAL.replace("v1", "v2").replace("required: 6.0", "required: nope"))
    assert store.get("bank-x").version == "v1"  # still in force
    err = store.errors[str(own)]
    assert err.problems[0].line == 4 and err.problems[0].field == "actions.login.required"
    assert "policy rejected" in caplog.text
    _write(own, MINIMAL.replace("v1", "v3"))
    assert store.get("bank-x").version == "v3" and str(own) not in store.errors
    own.unlink()
    assert store.get("bank-x").version == "v3"  # a vanished file keeps what was in force


def test_a_tenant_file_that_never_parsed_fails_closed(tmp_path):
    store = PolicyStore(DEFAULT, tmp_path, check_s=0)
    (tmp_path / "bank-y.yaml").write_text("version: [\n")
    with pytest.raises(ServiceError) as err:
        store.get("bank-y")
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION and err.value.reason == "POLICY_INVALID"


def test_the_service_refuses_to_start_with_a_broken_default(tmp_path):
    bad = tmp_path / "default.yaml"
    bad.write_text(MINIMAL.replace("required: 6.0", "required: x"))
    with pytest.raises(PolicyError):
        PolicyStore(bad, None)


def test_check_interval_limits_stat_calls(tmp_path):
    store = PolicyStore(DEFAULT, tmp_path, check_s=3600)
    own = tmp_path / "bank-z.yaml"
    _write(own, MINIMAL)
    assert store.get("bank-z").version == "v1"
    _write(own, MINIMAL.replace("v1", "v2"))
    time.sleep(0.01)
    assert store.get("bank-z").version == "v1"  # not looked at again within check_s
