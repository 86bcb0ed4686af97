"""Risk rules and evidence fusion (pure functions of the policy and the signals)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from services.common.config import PROJECT_ROOT
from services.mfa.fusion import FactorOutcome, decide, make_plan
from services.mfa.policy import load_policy
from services.mfa.reasons import Reason
from services.mfa.risk import PhraseMatcher, Place, RiskEngine, RiskSignals
from tests.conftest import present

POLICY = load_policy(PROJECT_ROOT / "services" / "mfa" / "policies" / "default.yaml")
NOW = datetime(2025, 3, 1, 12, tzinfo=timezone.utc)


def assess(action="login", **signals):
    signals.setdefault("device", "bound")
    return RiskEngine(POLICY).assess(RiskSignals(**signals), POLICY.actions[action].amount_bands)


def codes(a):
    return [r.code for r in a.reasons]


@pytest.mark.parametrize("text,hit", [
    ("他让我下载软件让他代操作", "代操作"),
    ("紧 急 转 账，不然账户会被冻结", "紧急转账"),
    ("把钱转到ＡｎｙＤｅｓｋ里面说的安全账户", "安全账户"),
    ("Please move your savings to a Safe Account today", "safe account"),
    ("install any desk so I can help", "AnyDesk"),
    ("he needs REMOTE-ACCESS to your phone", "remote access"),
    ("Sir, YOUR account has been   compromised!", "your account has been compromised"),
])
def test_fraud_phrases_match_across_case_width_and_spacing(text, hit):
    found = [p for _, p in PhraseMatcher(present(POLICY.risk.rules.fraud_phrases).phrases).find(text)]
    assert hit in found


@pytest.mark.parametrize("text", ["my accountant's safe", "remote accessories shop", "查询余额", ""])
def test_ordinary_text_is_not_flagged(text):
    assert PhraseMatcher(present(POLICY.risk.rules.fraud_phrases).phrases).find(text) == []


def test_fraud_phrase_raises_risk_and_forces_review():
    a = assess(conversation_text="客服说要转到安全账户")
    assert "FRAUD_SCRIPT_PHRASE" in codes(a) and a.level in ("high", "critical") and a.requirement.review
    assert a.fraud_phrases == ("安全账户",)


def test_levels_from_device_failures_velocity_and_location():
    assert assess().level == "low"
    assert assess(device="new").level == "medium"
    a = assess(device="new", failures=3, sessions_in_window=50)
    assert {"NEW_DEVICE", "FAILED_ATTEMPTS", "VELOCITY"} <= set(codes(a)) and a.level == "high"
    assert a.requirement.min_factors == 2
    here = Place("CN", 31.23, 121.47, NOW)
    a = assess(place=Place("DE", 52.52, 13.40, NOW + timedelta(hours=1)), last_place=here)
    assert {"LOCATION_CHANGE", "IMPOSSIBLE_TRAVEL"} <= set(codes(a))
    a = assess(place=Place("CN", 39.9, 116.4, NOW + timedelta(hours=5)), last_place=here)
    assert codes(a) == []  # Shanghai -> Beijing in five hours is travel, not fraud


def test_amount_bands_by_currency():
    small = assess("payment", amount=("CNY", 100_00))
    assert small.band.up_to == 500000 and small.requirement.min_factors == 0
    mid = assess("payment", amount=("CNY", 20_000_00))
    assert mid.requirement.min_factors == 2 and "AMOUNT_BAND" in codes(mid)
    huge = assess("payment", amount=("CNY", 10_000_000_00))
    assert huge.requirement.review
    usd = assess("payment", amount=("USD", 5_000_00))  # "*" bands
    assert usd.requirement.min_factors == 2


def plan(action="login", channel="app", device_usable=True, unavailable=(), **signals):
    return make_plan(POLICY, action, channel, assess(action, **signals), device_usable, set(unavailable))


def face(llr=6.0, passed=True, **kw):
    return FactorOutcome("face", passed, llr, **kw)


DEVICE = FactorOutcome("device", True, 3.0)
OTP = FactorOutcome("sms_otp", True, 3.0)


def test_genuine_face_on_a_bound_device_is_allowed_with_aal2():
    d = decide(plan(), [face(), DEVICE])
    assert d.outcome == "allow" and d.acr == "aal2" and set(d.amr) == {"face", "swk", "mfa"}


def test_a_liveness_veto_outweighs_any_evidence():
    d = decide(plan(), [face(10.0, veto=True, reasons=(Reason("LIVENESS_FAILED"),)), DEVICE, OTP])
    assert d.outcome == "deny" and [r.code for r in d.reasons][:2] == ["VETO", "LIVENESS_FAILED"]
    assert d.amr == () and d.acr == ""


def test_a_decision_names_each_reason_once_in_order():
    """The face factor put LIVENESS_FAILED before the face service's own LIVENESS_FAILED, and the
    decision listed the vetoed attempts' reasons after its own: the kiosk page showed it twice
    (three times after a second spoofed attempt)."""
    service = Reason("LIVENESS_FAILED", "from the face service")
    factor = Reason("LIVENESS_FAILED", "passive liveness: presentation attack suspected")
    spoof = face(10.0, passed=False, veto=True, reasons=(factor, service, Reason("NO_MATCH")))
    assert [r.code for r in spoof.reasons] == ["LIVENESS_FAILED", "NO_MATCH"] and spoof.reasons[0] == factor
    d = decide(plan(), [spoof, spoof, DEVICE])
    assert [r.code for r in d.reasons] == ["VETO", "LIVENESS_FAILED", "NO_MATCH"] and d.reasons[1] == factor
    mismatch = Reason("BIOMETRIC_MISMATCH", "LLR -8.00 at or below -6.00")
    d = decide(plan(), [face(-8.0, passed=False, deny=True, reasons=(mismatch,)), DEVICE])
    assert [r.code for r in d.reasons] == ["BIOMETRIC_MISMATCH"]


def test_a_strongly_negative_llr_denies_and_a_weak_one_steps_up():
    assert decide(plan(), [face(-8.0, passed=False, deny=True), DEVICE]).outcome == "deny"
    d = decide(plan(), [face(1.0, passed=True), DEVICE])  # 4.0 < 6.0
    assert d.outcome == "step_up" and ("sms_otp",) in d.still_needed


def test_the_best_attempt_of_a_factor_counts():
    assert decide(plan(), [face(-1.0, passed=False), face(6.0), DEVICE]).outcome == "allow"


def test_step_up_lists_what_is_still_needed():
    d = decide(plan(device_usable=False), [])
    assert d.outcome == "step_up" and set(d.still_needed) == {("face", "sms_otp"), ("voice", "sms_otp")}
    d = decide(plan(device_usable=False), [OTP])
    assert set(d.still_needed) == {("face",), ("voice",)}


def test_degraded_mode_reviews_and_never_allows():
    p = plan(unavailable=("face",))
    assert ("sms_otp", "device") in p.degraded_sets and not any("face" in s for s in p.sets)
    d = decide(p, [OTP, DEVICE])
    assert d.outcome == "review" and "DEGRADED_MODE" in [r.code for r in d.reasons]
    p = plan(device_usable=False, unavailable=("face", "voice"))
    d = decide(p, [OTP])
    assert d.outcome == "deny" and d.reasons[-1].code == "NO_ACCEPTABLE_FACTORS"


def test_a_locked_subject_is_denied_whatever_the_evidence():
    assert decide(plan(), [face(), DEVICE], locked=True).outcome == "deny"


def test_review_after_successful_authentication_when_risk_requires_it():
    p = plan(conversation_text="remote access please", device="new", device_usable=False)
    assert p.review
    assert decide(p, [face(), OTP]).outcome in ("review", "step_up")
    assert decide(p, [face(9.0), OTP, FactorOutcome("voice", True, 4.0)]).outcome == "review"
