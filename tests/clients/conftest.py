"""The client SDK against real services on loopback. ``mfa_only``: one MFA server for the module
(the tenants of tests/mfa/conftest.py whose policies need no biometrics: otp-bank, bind-bank)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from biogate_client import BioGate, dev_credentials
from tests.conftest import ServiceHarness
from tests.mfa.conftest import settings_for


@pytest.fixture(scope="module")
def mfa_only(tmp_path_factory):
    """(harness, settings, client): the MFA server and an SDK client with the dev-all token."""
    settings = settings_for(tmp_path_factory.mktemp("sdk-mfa"))
    harness = ServiceHarness(settings)
    harness.start("mfa")
    client = BioGate(mfa=harness.running["mfa"].address, face="127.0.0.1:9", voice="127.0.0.1:9",
                     credentials=dev_credentials(settings.dev_credentials_file), timeout=30)
    yield SimpleNamespace(harness=harness, settings=settings, client=client,
                          outbox=settings.data_dir / "sms-outbox.jsonl", address=harness.running["mfa"].address)
    client.close()
    harness.stop()


@pytest.fixture(scope="session")
def with_models(tmp_path_factory):
    """Face, voice and MFA services with the default policy (tests/mfa/world.py), and an SDK client."""
    from tests.conftest import require
    from tests.mfa.world import running_services

    with running_services(tmp_path_factory.mktemp("sdk-models")) as (bio, mfa):
        require(bio.face_ok and bio.voice_ok, "the face and voice services (SERVING, with their Verify RPC)")
        addresses = {name: server.address for name, server in {**bio.running, **mfa.running}.items()}
        client = BioGate(**addresses, credentials=dev_credentials(mfa.settings.dev_credentials_file))
        yield SimpleNamespace(bio=bio, mfa=mfa, client=client, addresses=addresses, settings=mfa.settings,
                              outbox=mfa.settings.data_dir / "sms-outbox.jsonl")
        client.close()
