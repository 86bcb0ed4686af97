"""One set of real face, voice and MFA services on loopback for the whole attack suite, with the
default policy, the bank's back end and the IVR platform (a registered terminal of the ivr channel)
as callers, and the customers the attacks are aimed at."""

from __future__ import annotations

import itertools
import random

import grpc
import pytest

from services.common.api.v1 import mfa_pb2 as F
from services.common.errors import details_of
from services.common.server.auth import ROLES, token_sha256
from tests.conftest import require
from tests.mfa import spoken_digits
from tests.mfa.conftest import App, phone_device
from tests.mfa.world import FIX, World, running_services

TENANT = "bank-attacks"
BANK_TOKEN, IVR_TOKEN = "tok-bank-backend", "tok-ivr-platform"
PRINCIPALS: list[dict] = [
    {"name": "bank-backend", "roles": list(ROLES), "token_sha256": token_sha256(BANK_TOKEN)},
    {"name": "ivr-platform", "roles": ["orchestrator"], "token_sha256": token_sha256(IVR_TOKEN),
     "tenants": [TENANT], "terminal": {"channel": "ivr"}},
]
# The customer whose face the attacks use: enrolled from photo 1, photo 2 is the customer's own
# selfie, photo 3 is the one an attacker finds online.
FACE_IDENTITY = "Aaron_Peirsol"
VOICE_SPEAKER = "george"


def codes(result) -> list[str]:
    return [r.code for r in result.reasons]


def refused(call) -> tuple[grpc.StatusCode, str]:
    """The status code and reason of a call that must be refused."""
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code(), details_of(err.value)["reason"]


def identity_photo(identity: str, n: int) -> bytes:
    return (FIX / "face" / "identities" / identity / f"{identity}_{n:04d}.jpg").read_bytes()


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    with running_services(tmp_path_factory.mktemp("attacks"), PRINCIPALS, BANK_TOKEN) as (bio, mfa):
        w = World(bio, mfa, TENANT, ivr_token=IVR_TOKEN)
        yield w
        w.close()


@pytest.fixture(scope="session")
def face_customer(world):
    """customer(sid) -> (ref, app): a customer enrolled from photo 1 whose phone bound its key after
    a login with the customer's selfie (photo 2) and the SMS code (default policy: aal2 before a
    binding). Each test attacks a customer of its own: the failures it provokes count per subject
    and device, and must not lock out the next test's customer."""
    require(world.bio.face_ok, "the face service (SERVING, with its Verify RPC)")
    phones = itertools.count(1)

    def customer(sid: str, identity: str = FACE_IDENTITY, enrol: bytes | None = None, selfie: bytes | None = None):
        ref = world.enrol(sid, face_image=enrol or identity_photo(identity, 1), phone=f"+86138000{next(phones):05d}")
        app = App(phone_device(install=f"{sid}-phone"))
        s = world.start(ref, app)
        r = world.submit(s, face=app.face(s, selfie or identity_photo(identity, 2))).result
        assert r.passed and r.binding == "new_device", r
        assert world.otp(s).result.passed
        d = world.decide(s)
        assert d.outcome == F.OUTCOME_ALLOW and d.acr == "aal2", d
        world.bind(s, app)
        return ref, app

    return customer


@pytest.fixture(scope="session")
def voice_customer(world):
    """(ref, rng): a caller enrolled from real recordings of spoken digits (telephone family)."""
    require(world.bio.voice_ok, "the voice service (SERVING, with its Verify RPC)")
    ref = world.enrol("voice-customer", utterances=spoken_digits.enrolment(VOICE_SPEAKER), phone="+8613900000001")
    return ref, random.Random(11)
