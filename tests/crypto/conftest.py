import pytest

from services.common.crypto import EnvelopeCrypto, LocalKeyring, TemplateBinding


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
