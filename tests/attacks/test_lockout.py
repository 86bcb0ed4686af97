"""Lockout as a weapon: an attacker who knows a customer's subject id, without the customer's phone,
fails on purpose until the subject locks (default policy: growing delays from the third failure,
a lock of 900 s after the fifth). The customer's own bound phone is not locked out."""

from __future__ import annotations

import grpc
import pytest

from services.common.api.v1 import mfa_pb2
from services.common.errors import details_of
from tests.attacks.conftest import FACE_IDENTITY, identity_photo
from tests.mfa.conftest import App, outbox_codes, phone_device

pytestmark = pytest.mark.attacks
F = mfa_pb2


def test_an_attacker_without_the_device_cannot_lock_the_customer_out_of_the_bound_device(world, face_customer):
    ref, app = face_customer("lock-target")
    attacker = App(phone_device(install="attacker-lock-1", model="Redmi Note 12"))
    s = world.start(ref, attacker)
    world.mfa_stub.SendOtp(F.SendOtpRequest(session_id=s.session_id))  # the code goes to the customer
    wrong = f"{(int(outbox_codes(world.mfa.settings)[-1]) + 1) % 10 ** 6:06d}"
    for _ in range(5):
        r = world.submit_patiently(s, otp=F.OtpEvidence(code=wrong))
        assert not r.result.passed
    assert r.attempts_left == 0
    d = world.decide(s)
    assert d.outcome == F.OUTCOME_DENY and d.reasons[0].code == "SUBJECT_LOCKED", d
    with pytest.raises(grpc.RpcError) as err:  # the attacker's next device: the subject is locked
        world.start(ref, App(phone_device(install="attacker-lock-2")))
    assert details_of(err.value)["reason"] == "SUBJECT_LOCKED" and "bound device" in (err.value.details() or "")

    # The customer, on the bound phone, signs a selfie: the phone's key proves the device, the
    # failures only raised the risk.
    mine = world.start(ref, app)
    assert mine.device_bound and "FAILED_ATTEMPTS" in [x.code for x in mine.risk.reasons]
    r = world.submit(mine, face=app.face(mine, identity_photo(FACE_IDENTITY, 2))).result
    assert r.passed and r.binding == "device", r
    d = world.decide(mine)
    if d.outcome == F.OUTCOME_STEP_UP:  # the raised risk may ask for the SMS code as well
        assert world.otp(mine).result.passed
        d = world.decide(mine)
    assert d.outcome == F.OUTCOME_ALLOW, d
