"""Red-team pass: request fields that only looked checked. Python's ``$`` also matches before a
final newline, and a currency of the right shape need not be one: a value that differs from the
real one by a trailing newline, or names no currency at all, reached the session, its policy's
amount bands and the signed decision. Each is refused INVALID_ARGUMENT naming the field, before
anything is stored."""

from __future__ import annotations

import grpc
import pytest

from services.common.api.v1 import common_pb2, mfa_pb2
from services.common.errors import details_of
from tests.mfa.conftest import App, subject

F = mfa_pb2


def payment(currency: str, ref: common_pb2.SubjectRef | None = None) -> mfa_pb2.StartAuthenticationRequest:
    """A CNY 100 000.00 payment of otp-bank, whose policy asks two factors above CNY 5 000.00."""
    return F.StartAuthenticationRequest(subject=ref or subject(), channel=F.CHANNEL_APP, action="payment",
                                        device=App().device,
                                        amount=F.Money(currency=currency, amount_minor=10_000_000))


def test_the_currency_of_a_band_is_what_decides_how_much_a_payment_needs(stub):
    """The baseline the attack below evades: CNY above the band's floor raises the risk and asks
    two factors (none of which a new device can give here: no single SMS code will do)."""
    started = stub.StartAuthentication(payment("CNY"))
    assert "AMOUNT_BAND" in {r.code for r in started.risk.reasons}
    assert all(len(s.factors) >= 2 for s in started.acceptable)


@pytest.mark.parametrize("currency", ["CNY\n", "ZZZ"])
def test_a_currency_that_is_not_an_iso_4217_code_is_refused_not_let_past_the_amount_bands(stub, currency):
    """"CNY\\n" matched ^[A-Z]{3}$, missed the policy's CNY bands and started a one-factor session
    for CNY 100 000.00 (a bank's payment core that trims the field pays it in CNY). "ZZZ" names no
    currency, and fell to the same gap."""
    with pytest.raises(grpc.RpcError) as err:
        stub.StartAuthentication(payment(currency))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "amount.currency" in details_of(err.value)["fields"]


@pytest.mark.parametrize("field, ref", [
    ("subject.subject_id", common_pb2.SubjectRef(tenant_id="otp-bank", subject_id="cust-0001\n")),
    ("subject.tenant_id", common_pb2.SubjectRef(tenant_id="otp-bank\n", subject_id="cust-0001")),
])
def test_an_identifier_with_a_trailing_newline_is_refused(stub, field, ref):
    """"cust-0001\\n" is another subject than "cust-0001" (its own lockout counters, templates and
    signals) though a bank's systems may take them for one; and "otp-bank\\n" is a tenant of no
    policy but the default's."""
    with pytest.raises(grpc.RpcError) as err:
        stub.StartAuthentication(payment("CNY", ref))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in details_of(err.value)["fields"]


@pytest.mark.parametrize("phone", ["+8613800135678\n", "+86138001356\u0667\u0668"])
def test_a_phone_number_that_is_not_plain_e164_is_refused(stub, phone):
    """A trailing newline, or Arabic-Indic digits (which \\d matches), is another string for the
    same number: another key of the per-number OTP rate limit, and a number the SMS gateway may not
    read as the one it is."""
    with pytest.raises(grpc.RpcError) as err:
        stub.SetPhoneNumber(F.SetPhoneNumberRequest(subject=subject(), phone_e164=phone))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "phone_e164" in details_of(err.value)["fields"]


def test_a_currency_the_actions_amount_bands_do_not_cover_is_refused_not_waved_through(stub):
    """otp-bank bands payments in CNY only, with no "*" band for the rest: a USD 100 000.00 payment
    fell past every band and started a session one SMS code allowed. A currency the bands do not
    name, nor a "*" band, is refused saying so (the policy's author adds its bands, or "*")."""
    with pytest.raises(grpc.RpcError) as err:
        stub.StartAuthentication(payment("USD"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = details_of(err.value)
    assert details["reason"] == "CURRENCY_NOT_IN_POLICY" and "amount.currency" in details["fields"]
    assert "CNY" in (err.value.details() or "")
