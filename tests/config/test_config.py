import re

import pytest
from pydantic import ValidationError

from services.common.config import PROJECT_ROOT
from services.settings import load_config


def test_the_example_deployment_configuration_is_valid():
    settings = load_config(PROJECT_ROOT / "deploy" / "biogate.example.yaml")
    assert settings.storage_dsn.startswith("postgresql://")
    assert settings.server.tls.client_ca_file is not None
    assert not settings.auth.dev_credentials
    assert {p.name for p in settings.auth.principals} >= {"core-banking-login", "security-operations"}
    # every section the file gives is read (a second `mfa:` once silently replaced the first)
    assert settings.mfa.webauthn.rp_id == "bank-a.example" and settings.mfa.sms.gateway == "http"
    assert settings.mfa.push.gateway == "fcm" and settings.mfa.http.public_url
    assert settings.voice.require_challenge and settings.voice.replay_store == "database"


def test_a_key_given_twice_in_the_file_is_refused_with_both_lines(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("mfa:\n  issuer: a\nvoice:\n  require_challenge: true\nmfa:\n  issuer: b\n")
    with pytest.raises(ValueError, match="line 5: 'mfa' is given twice in one mapping \\(first on line 1\\)"):
        load_config(cfg)


def test_environment_beats_the_file_and_defaults(tmp_path, monkeypatch):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("server:\n  face: {port: 6001}\nstorage:\n  dsn: postgresql://file/db\n")
    monkeypatch.setenv("BIOGATE_STORAGE__DSN", "postgresql://env/db")
    settings = load_config(cfg, data_dir=str(tmp_path))
    assert settings.server.face.port == 6001
    assert settings.storage_dsn == "postgresql://env/db"
    assert settings.server.voice.port == 50052  # default kept
    assert settings.sqlite_path == tmp_path / "biogate.db"


def test_the_embedded_default_is_sqlite_in_the_data_dir(tmp_path):
    settings = load_config(None, data_dir=str(tmp_path))
    assert settings.storage_dsn == f"sqlite:///{tmp_path / 'biogate.db'}"
    assert settings.keyring_file == tmp_path / "keys" / "keyring.json"


@pytest.mark.parametrize("text", ["storage:\n  dsm: x\n", "server:\n  face: {port: not-a-port}\n", "- a list\n"])
def test_mistakes_in_the_file_are_refused(tmp_path, text):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    with pytest.raises((ValidationError, ValueError)):
        load_config(cfg)


def test_a_calibration_channel_for_no_channel_family_is_refused_at_load_with_the_field_named(tmp_path):
    cfg = tmp_path / "c.yaml"
    # a template's family is wideband or telephone: a "mobile" entry was never looked up
    cfg.write_text("voice:\n  calibration_channels: {wideband: wideband, mobile: mobile-16k}\n")
    with pytest.raises(ValidationError, match=r"voice\.calibration_channels\.mobile"):
        load_config(cfg, data_dir=str(tmp_path))


def _principal(**fields):
    return {"name": "core-banking", "roles": ["orchestrator"], "token_sha256": "ab" * 32, **fields}


@pytest.mark.parametrize("principal,field", [
    # written verbatim into every audit record it makes: a second line, forged
    (_principal(name="kiosk-7\n2026-01-01 INFO actor=security-operations"), "name"),
    # the audit refuses it as personal data: every write of this caller failed INTERNAL
    (_principal(name="ops@bank-a.example"), "name"),
    (_principal(name=""), "name"),
    (_principal(token_sha256="the-token-itself"), "token_sha256"),  # never matched any token
    (_principal(token_sha256="ab" * 32 + "\n"), "token_sha256"),  # "$" let a final newline by
    (_principal(tenants=["bank-a "]), "tenants"),
], ids=["control characters", "e-mail", "empty", "token not a digest", "digest and a newline", "tenant with a space"])
def test_a_principal_that_could_never_authenticate_or_be_audited_is_refused_at_load(tmp_path, principal, field):
    with pytest.raises(ValidationError, match=field):
        load_config(None, data_dir=str(tmp_path), auth={"principals": [principal], "dev_credentials": False})


@pytest.mark.parametrize("second,what", [
    (_principal(token_sha256="cd" * 32), "name"),  # one name, two callers: the audit cannot tell them apart
    (_principal(name="other", roles=["admin"]), "token"),  # one token, two principals: the last silently won
    (_principal(name="other", token_sha256=None, cert_subject="spiffe://bank/x"), "certificate"),
], ids=["name", "token", "certificate"])
def test_two_principals_sharing_a_name_token_or_certificate_are_refused(tmp_path, second, what):
    first = _principal(cert_subject="spiffe://bank/x")
    with pytest.raises(ValidationError, match=f"same {what}"):
        load_config(None, data_dir=str(tmp_path), auth={"principals": [first, second], "dev_credentials": False})


def test_a_token_digest_in_upper_case_is_the_same_digest(tmp_path):
    settings = load_config(None, data_dir=str(tmp_path),
                           auth={"principals": [_principal(token_sha256="AB" * 32)], "dev_credentials": False})
    assert settings.auth.principals[0].token_sha256 == "ab" * 32


def test_a_terminal_names_the_tenants_it_serves(tmp_path):
    # a kiosk's certificate lifted from one bank's branch must not act for every bank the deployment serves
    for tenants in ({}, {"tenants": ["*"]}, {"tenants": ["bank-a", "*"]}):
        with pytest.raises(ValidationError, match="terminal"):
            load_config(None, data_dir=str(tmp_path), auth={"principals": [
                _principal(terminal={"channel": "kiosk"}, **tenants)], "dev_credentials": False})
    settings = load_config(None, data_dir=str(tmp_path), auth={"principals": [
        _principal(terminal={"channel": "kiosk"}, tenants=["bank-a"])], "dev_credentials": False})
    assert settings.auth.principals[0].tenants == ["bank-a"]


def test_development_credentials_written_before_a_role_existed_gain_it_and_keep_the_others(tmp_path):
    """var/dev-credentials.json from before the `service` role: the MFA's development client needs
    that role's token, and every token already handed out stays valid."""
    import json

    from services.common.server.auth import ROLES, ensure_dev_credentials

    settings = load_config(None, data_dir=str(tmp_path))
    old = {f"dev-{r}": f"old-{r}" for r in ROLES if r != "service"} | {"dev-all": "old-all"}
    settings.dev_credentials_file.parent.mkdir(parents=True, exist_ok=True)
    settings.dev_credentials_file.write_text(json.dumps(old))
    tokens = ensure_dev_credentials(settings)
    assert tokens["dev-service"] and tokens.items() >= old.items()
    assert json.loads(settings.dev_credentials_file.read_text()) == tokens == ensure_dev_credentials(settings)


@pytest.mark.parametrize("section,field", [
    ("mfa:\n  sms: {gateway: http, http_url: 'http://sms.vendor.example/send'}\n", "mfa.sms.http_url"),
    ("mfa:\n  push: {fcm_base_url: 'http://fcm.googleapis.com'}\n", "mfa.push.fcm_base_url"),
    ("mfa:\n  reviews: {webhook: {url: 'http://10.0.0.7/hook', secret: 'sixteen-chars-ok'}}\n", "mfa.reviews.webhook.url"),
    ("mfa:\n  reviews: {webhook: {tenants: {bank-a: {url: 'http://hooks.bank-a.example/biogate', "
     "secret: 'sixteen-chars-ok'}}}}\n", "mfa.reviews.webhook.tenants.bank-a.url"),
])
def test_an_outbound_url_in_clear_off_this_host_is_refused_at_load(tmp_path, section, field):
    """The SMS vendor's token, phone numbers and codes, and webhook bodies with signed decisions, would
    cross the network in clear; loopback (a local relay or a test double) and an explicit opt-in pass."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(section)
    with pytest.raises(ValidationError, match=rf"{re.escape(field)} sends in clear"):
        load_config(cfg, data_dir=str(tmp_path))
    cfg.write_text(section.replace("mfa:\n", "mfa:\n  allow_plain_http: true\n", 1))
    load_config(cfg, data_dir=str(tmp_path))
    local = section.replace("sms.vendor.example", "127.0.0.1:8080").replace("fcm.googleapis.com", "[::1]:9000")
    local = local.replace("10.0.0.7", "localhost").replace("hooks.bank-a.example", "127.0.0.1")
    cfg.write_text(local)
    load_config(cfg, data_dir=str(tmp_path))
