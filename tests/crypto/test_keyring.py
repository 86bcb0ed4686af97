import json
import os
import stat
import threading

import pytest

from services.settings import load_config
from services.common.crypto import (
    EnvelopeCrypto,
    KeyringError,
    LocalKeyring,
    StaticKeyring,
    TemplateBinding,
    UnknownKeyError,
    envelope_key_id,
    open_keyring,
)
from services.common.crypto.keyring import ENV_VAR

B = TemplateBinding("bank-a", "cust-1", "face", "arcface-r100")


def test_file_created_0600_on_first_use(tmp_path):
    path = tmp_path / "keys" / "keyring.json"
    kr = LocalKeyring(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    doc = json.loads(path.read_text())
    assert doc["primary"] == kr.primary_key_id() and len(doc["keys"]) == 1
    assert len(kr.pseudonym_key()) == 32
    # A second opener reads the same keyring instead of making another.
    assert LocalKeyring(path).primary_key_id() == kr.primary_key_id()


def test_missing_file_without_create(tmp_path):
    with pytest.raises(KeyringError, match="keys init"):
        LocalKeyring(tmp_path / "none.json", create=False)


def test_malformed_file(tmp_path):
    path = tmp_path / "k.json"
    path.write_text('{"format": "biogate-keyring", "version": 1}')
    with pytest.raises(KeyringError, match="malformed"):
        LocalKeyring(path)


def test_running_service_sees_rotation_without_restart(tmp_path):
    """The primary is read from the file on every seal, however long the service's check interval
    for other lookups: the service looked just before the rotation and would not look for an hour."""
    path = tmp_path / "keyring.json"
    service = EnvelopeCrypto(LocalKeyring(path, check_interval_s=3600))  # a service process
    admin = LocalKeyring(path)  # `biogate keys rotate` in another process
    before = service.encrypt_template(B, b"t1")
    new = admin.add_key()
    after = service.encrypt_template(B, b"t2")  # no restart, no reload call
    assert envelope_key_id(before) != new.key_id
    assert envelope_key_id(after) == new.key_id
    assert service.decrypt_template(B, before) == b"t1"  # the old key stays readable
    assert EnvelopeCrypto(admin).decrypt_template(B, after) == b"t2"


def test_key_lookups_between_checks_are_served_from_memory(tmp_path):
    """Only the primary is read through; other lookups see the file at most every interval (a
    retired key stays in memory until then), so reads cost no stat each."""
    path = tmp_path / "keyring.json"
    admin = LocalKeyring(path)
    old = admin.primary_key_id()
    lazy = LocalKeyring(path, check_interval_s=3600)
    assert old in {k.key_id for k in lazy.keys()}  # looked now, not again for an hour
    admin.add_key()
    admin.remove_key(old)
    assert old in {k.key_id for k in lazy.keys()}  # not looked yet
    assert lazy.primary_key_id() == admin.primary_key_id()  # looks, and reloads
    assert old not in {k.key_id for k in lazy.keys()}


def test_unknown_key_id_makes_a_lazy_keyring_look_at_once(tmp_path):
    """A record re-wrapped by a rotation in another process is readable immediately."""
    path = tmp_path / "keyring.json"
    lazy = EnvelopeCrypto(LocalKeyring(path, check_interval_s=3600))
    admin = EnvelopeCrypto(LocalKeyring(path))
    sealed = lazy.encrypt_template(B, b"t")  # looked now, not again for an hour
    new = admin.keyring.add_key()
    moved = admin.rewrap(sealed, new.key_id)
    assert new.key_id not in {k.key_id for k in lazy.keyring.keys()}  # not looked yet
    assert lazy.decrypt_template(B, moved) == b"t"
    assert new.key_id in {k.key_id for k in lazy.keyring.keys()}


def test_rotation_keeps_the_pseudonym_key(tmp_path):
    kr = LocalKeyring(tmp_path / "k.json")
    pkey = kr.pseudonym_key()
    kr.add_key()
    kr.add_key("SM4-GCM")
    assert kr.pseudonym_key() == pkey
    assert [k.cipher for k in kr.keys()] == ["AES-256-GCM", "AES-256-GCM", "SM4-GCM"]
    assert sum(k.primary for k in kr.keys()) == 1


def test_concurrent_add_key_from_two_openers_loses_nothing(tmp_path):
    path = tmp_path / "k.json"
    a, b = LocalKeyring(path), LocalKeyring(path)

    def add(kr):
        for _ in range(5):
            kr.add_key()

    threads = [threading.Thread(target=add, args=(kr,)) for kr in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(LocalKeyring(path).keys()) == 11


def test_remove_key_rules(tmp_path):
    kr = LocalKeyring(tmp_path / "k.json")
    first = kr.primary_key_id()
    with pytest.raises(KeyringError, match="primary"):
        kr.remove_key(first)
    with pytest.raises(UnknownKeyError):
        kr.remove_key("k-nope")
    kr.add_key()
    kr.remove_key(first)
    assert [k.key_id for k in kr.keys()] == [kr.primary_key_id()]


def test_env_keyring_is_read_only_and_interoperable(tmp_path, monkeypatch):
    file_kr = LocalKeyring(tmp_path / "k.json")
    monkeypatch.setenv(ENV_VAR, file_kr.dump_json())
    settings = load_config(None, data_dir=str(tmp_path / "data"))
    kr = open_keyring(settings)
    assert isinstance(kr, StaticKeyring) and not isinstance(kr, LocalKeyring)
    assert not settings.keyring_file.exists()
    sealed = EnvelopeCrypto(file_kr).encrypt_template(B, b"x")
    assert EnvelopeCrypto(kr).decrypt_template(B, sealed) == b"x"
    with pytest.raises(KeyringError, match="read-only"):
        kr.add_key()


def test_open_keyring_defaults_to_the_settings_file(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    settings = load_config(None, data_dir=str(tmp_path / "data"), keys={"cipher": "SM4-GCM"})
    kr = open_keyring(settings)
    assert isinstance(kr, LocalKeyring) and kr.path == settings.keyring_file
    assert kr.key_info(kr.primary_key_id()).cipher == "SM4-GCM"


KMS_MODULE = '''
from services.common.crypto import StaticKeyring, LocalKeyring

class FakeKms(LocalKeyring):
    """Stands in for an HSM adapter: it only has to satisfy the Keyring protocol."""

def factory(settings):
    return FakeKms(settings.data_dir / "kms.json")

def not_a_keyring(settings):
    return object()
'''


def test_kms_hook(tmp_path, monkeypatch):
    (tmp_path / "my_kms_adapter.py").write_text(KMS_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    settings = load_config(None, data_dir=str(tmp_path / "data"), keys={"kms": "my_kms_adapter:factory"})
    kr = open_keyring(settings)
    assert type(kr).__name__ == "FakeKms"
    assert (tmp_path / "data" / "kms.json").exists() and not settings.keyring_file.exists()
    bad = load_config(None, data_dir=str(tmp_path / "data"), keys={"kms": "my_kms_adapter:not_a_keyring"})
    with pytest.raises(KeyringError, match="did not return a Keyring"):
        open_keyring(bad)
    with pytest.raises(KeyringError, match="module:factory"):
        open_keyring(load_config(None, data_dir=str(tmp_path), keys={"kms": "nocolon"}))
