import pytest

from services.common.crypto import EnvelopeCrypto, LocalKeyring, TemplateBinding
from services.common.crypto.hsm import Pkcs11Keyring, open_token
from tests.conftest import make_settings


@pytest.fixture(params=["AES-256-GCM", "SM4-GCM"])
def cipher(request) -> str:
    return request.param


@pytest.fixture
def keyring(tmp_path, cipher) -> LocalKeyring:
    return LocalKeyring(tmp_path / "keys" / "keyring.json", cipher=cipher)


@pytest.fixture
def crypto(keyring) -> EnvelopeCrypto:
    return EnvelopeCrypto(keyring)


@pytest.fixture
def binding() -> TemplateBinding:
    return TemplateBinding("bank-a", "cust-42", "voice", "ecapa-tdnn-v1", "telephone")


class Backend:
    """Opens keyring instances on one key store, each as a separate process would hold it."""

    def __init__(self, kind: str, keys_config: dict, env: dict[str, str], data_dir) -> None:
        self.kind, self.keys_config, self.env, self.data_dir = kind, keys_config, env, data_dir

    def open(self, check_interval_s: float = 0):
        """A keyring instance; every instance reads the primary afresh (one stat of the file, one
        listing of the token's keys), other lookups of a service's are served from memory between
        checks (the file every 0.1 s, the token once a second), an operator's command looks every time."""
        if self.kind == "file":
            return LocalKeyring(self.keys_config["keyring_file"], check_interval_s=check_interval_s)
        cfg = make_settings(self.data_dir, keys=self.keys_config).keys.pkcs11
        return Pkcs11Keyring(open_token(cfg))


@pytest.fixture(params=["file", "pkcs11"])
def backend(request, tmp_path) -> Backend:
    if request.param == "file":
        return Backend("file", {"keyring_file": str(tmp_path / "keys" / "keyring.json")}, {}, tmp_path / "data")
    hsm = request.getfixturevalue("softhsm")
    return Backend("pkcs11", hsm.keys_config(), hsm.env(), tmp_path / "data")


class Pinned:
    """A keyring view whose primary is pinned to an older key: a service that sealed just before a
    rotation added the new primary and commits afterwards."""

    def __init__(self, keyring, key_id) -> None:
        self._k, self._id = keyring, key_id

    def __getattr__(self, name):
        return getattr(self._k, name)

    def primary_key_id(self) -> str:
        return self._id
