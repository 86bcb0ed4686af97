import re
import time
import uuid

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from services.common.audit.guard import AuditDataError, check_text
from services.common.errors import ServiceError
from services.common.privacy import (
    Pseudonymizer,
    is_personal_data,
    is_valid_cn_resident_id,
    looks_like_personal_number,
    luhn_valid,
    mask_phone,
    redact,
)
from services.common.validation import identifier, label

# 11010519491231002X is the PRC standard's (GB 11643) published example number.
CN_ID = "11010519491231002X"


def test_pseudonyms_are_stable_keyed_and_tenant_scoped():
    p = Pseudonymizer(b"k" * 32)
    a = p.pseudonymize("bank-a", "cust-42")
    assert a == p("bank-a", "cust-42")
    assert re.fullmatch(r"ps1_[0-9a-f]{32}", a)
    assert "cust-42" not in a
    assert a != p("bank-b", "cust-42")
    assert a != Pseudonymizer(b"j" * 32).pseudonymize("bank-a", "cust-42")
    # Length-prefixed parts: moving characters across the boundary changes the pseudonym.
    assert p("ab", "c") != p("a", "bc")
    assert "k" * 32 not in repr(p)
    with pytest.raises(ValueError):
        Pseudonymizer(b"short")


@pytest.mark.parametrize(
    "e164,masked",
    [
        ("+8613800135678", "+86 *** **** 5678"),
        ("+86 138-0013-5678", "+86 *** **** 5678"),
        ("+14155552671", "+1 *** *** 2671"),
        ("+442079460958", "+44 *** *** 0958"),
        ("+85291234567", "+852 **** 4567"),
        ("+79161234567", "+7 *** *** 4567"),
    ],
)
def test_mask_phone(e164, masked):
    assert mask_phone(e164) == masked
    assert redact(masked) == masked  # a masked number is not personal data any more


@pytest.mark.parametrize("bad", ["13800135678", "+0123456789", "+86", "phone", "+86138001356781234"])
def test_mask_phone_refuses_non_e164(bad):
    with pytest.raises(ValueError):
        mask_phone(bad)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("客户手机13800138000已登记", "客户手机[phone]已登记"),
        ("手机号：139 1234 5678。", "手机号：[phone]。"),
        ("mobile=8613800138000&x=1", "mobile=[phone]&x=1"),
        ("拨打0086-13912345678", "拨打[phone]"),
        ("call +86 138 0013 8000 now", "call [phone] now"),
        ("UK office +44 20 7946 0958.", "UK office [phone]."),
        ("sms to +14155552671", "sms to [phone]"),
        ("call 0044 20 7946 0958 now", "call [phone] now"),
        ("ref 0044-20-7946-0958", "ref [phone]"),
        ('{"phone":"+8613800138000"}', '{"phone":"[phone]"}'),
        (f"身份证号{CN_ID}，请核对", "身份证号[id-number]，请核对"),
        ("id=110105194912310021 end", "id=[id-number] end"),
        ("card 6222 0202 0000 1234 567 ok", "card [number] ok"),
        ("card 4111-1111-1111-1111", "card [number]"),
        ("acct=6217000010001234567;", "acct=[number];"),
        ("Visa 4111111111111111 declined", "Visa [number] declined"),
        ("account 310000123456 opened", "account [number] opened"),
        ("mail zhang.san@example.com.cn please", "mail [email] please"),
        ("From: Li Lei <li_lei+bank@163.com>", "From: Li Lei <[email]>"),
    ],
)
def test_redact_masks_personal_data(text, expected):
    assert redact(text) == expected


def test_redact_leaves_ordinary_log_content_alone():
    now_s, now_ms, now_ns = int(time.time()), int(time.time() * 1000), time.time_ns()
    now_us = now_ns // 1000
    samples = [
        "",
        "2024-05-01T12:30:45.123456+08:00 INFO request_id=req-8f3a2c subject=cust-000123",
        f"uuid={uuid.uuid4()} and {uuid.UUID('13800138-0001-3800-1380-013800138000')}",
        "trace 4bf92f3577b34da6a3ce929d0e0e4736 span 00f067aa0ba902b7",
        "took 12.345678901234 s, score=0.13800138000123, version 1.13800138000.2",
        "2024-05-01 12:30:45,123 port 50051 pid 12345 tenant bank-a",
        "model arcface-r100@sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
        "compact stamp 20240501123045123456 and 20240501123045",
        "ip 192.168.100.200:8080 and 2001:db8::ff00:42:8329",
        "FMR=0.0001 FNMR@FMR=1e-4: 0.0213 over 1234567 trials",
    ]
    # Timestamps in seconds, ms, us and ns pass unless they happen to be valid card numbers.
    for stamp in (now_s, now_ms, now_us, now_ns):
        if not luhn_valid(str(stamp)):
            samples.append(f"ts={stamp}")
    for s in samples:
        assert redact(s) == s, s


def test_redact_is_fast_on_ordinary_lines():
    line = "2024-05-01T12:30:45.123Z INFO face.verify request_id=req-8f3a2c tenant=bank-a decision=accept score=0.7312 latency_ms=41"
    start = time.perf_counter()
    for _ in range(2000):
        redact(line)
    per_line = (time.perf_counter() - start) / 2000
    assert per_line < 200e-6, f"{per_line * 1e6:.1f} us per line"


def test_cn_resident_id_checksum():
    assert is_valid_cn_resident_id(CN_ID)
    assert is_valid_cn_resident_id(CN_ID.lower())
    assert not is_valid_cn_resident_id("110105194912310021")  # wrong check character
    assert not is_valid_cn_resident_id("11010519491331002X")  # month 13


@pytest.mark.parametrize(
    "s", [CN_ID, "13800138000", "+86 138 0013 8000", "8613800138000", "+14155552671", "0044 20 7946 0958",
          "4111111111111111", "6217 0000 1000 1234 569", "zhang.san@example.com"],
)  # fmt: skip
def test_looks_like_personal_number_true(s):
    assert looks_like_personal_number(s)


@pytest.mark.parametrize(
    "s", ["cust-000123", "C2024050100012", "1000234567890", "12345", "bank-a:42", str(uuid.uuid4()), "张三-001"]
)
def test_looks_like_personal_number_false(s):
    assert not looks_like_personal_number(s)


# Ids as a hostile caller writes them: digit runs of every length, separators, '@', letters.
_ID_TEXT = st.one_of(
    st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,40}", fullmatch=True),
    st.from_regex(r"(00|\+)?[0-9]{6,20}[Xx]?", fullmatch=True).filter(lambda v: v[0].isalnum()),
    st.from_regex(r"[a-z]{1,8}[.@-][0-9]{8,19}(@[a-z]{2,8}\.[a-z]{2,3})?", fullmatch=True),
)


@settings(max_examples=400, derandomize=True, database=None, deadline=None)
@given(_ID_TEXT)
@example("102100099996")  # a 12-digit bank code: accepted as a tenant, then refused by the audit (issue 12)
@example("11010519491231002X")
@example("0044-20-7946-0958")
@example("li.lei@example.com")
def test_request_validation_and_the_audit_guard_agree_on_every_id(value):
    """One rule: what the validation accepts as an id or a label, the audit guard accepts in a record."""
    for validate in (lambda v: identifier(v, "tenant_id"), lambda v: label(v, "reason", 256)):
        try:
            validate(value)
        except ServiceError:
            continue
        try:
            check_text("tenant_id", value)
        except AuditDataError:
            pytest.fail(f"{value!r} passed the request validation but the audit guard refuses it")
    assert is_personal_data(value) == (redact(value) != value or looks_like_personal_number(value))
