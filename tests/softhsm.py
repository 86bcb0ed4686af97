"""A SoftHSM2 token for the PKCS#11 key backend's tests.

SoftHSM reads its configuration ($SOFTHSM2_CONF) and lists its tokens once, when a process
loads the library: one token per test session, made before any test loads it. Tests keep apart
by a label prefix of their own (``keys.pkcs11.label_prefix``). Child processes (replicas) get
the same token through the environment of :func:`hsm_env`.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

MODULE_CANDIDATES = ("/usr/lib/softhsm/libsofthsm2.so", "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
                     "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so")
TOKEN_LABEL = "biogate-test"
PIN = "4821-test-pin"


@dataclass(frozen=True)
class SoftHsm:
    conf: Path
    tokens: Path  # the token directory: every object SoftHSM keeps is a file under it
    module: str

    def env(self) -> dict[str, str]:
        return {"SOFTHSM2_CONF": str(self.conf), "BIOGATE_PKCS11_PIN": PIN}

    def keys_config(self, prefix: str | None = None) -> dict:
        return {"backend": "pkcs11", "pkcs11": {"module": self.module, "token_label": TOKEN_LABEL,
                                                 "label_prefix": prefix or f"t{uuid.uuid4().hex[:10]}"}}


@pytest.fixture(scope="session", name="softhsm")
def softhsm_fixture(tmp_path_factory) -> Iterator[SoftHsm]:
    module = next((m for m in MODULE_CANDIDATES if Path(m).exists()), None)
    assert module and shutil.which("softhsm2-util"), "SoftHSM2 is missing: run scripts/setup.sh (Debian softhsm2)"
    root = tmp_path_factory.mktemp("softhsm")
    tokens = root / "tokens"
    tokens.mkdir()
    conf = root / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n")
    env = dict(os.environ, SOFTHSM2_CONF=str(conf))
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", TOKEN_LABEL, "--pin", PIN,
                    "--so-pin", "so-" + PIN], env=env, check=True, capture_output=True)
    saved = {k: os.environ.get(k) for k in ("SOFTHSM2_CONF", "BIOGATE_PKCS11_PIN")}
    os.environ.update(SOFTHSM2_CONF=str(conf), BIOGATE_PKCS11_PIN=PIN)
    yield SoftHsm(conf, tokens, module)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def restart_hsm(hsm: SoftHsm) -> None:
    """What an HSM restart, a failover or a token reset looks like to this process: the library
    initialised again, every session it had gone (the backend's included: one library per process)."""
    import pkcs11

    pkcs11.lib(hsm.module).reinitialize()


@contextmanager
def hsm_away(hsm: SoftHsm) -> Iterator[None]:
    """The token unreachable (restarted without it) until the block ends; then back, with every
    object it held, as after a network HSM's outage."""
    import pkcs11

    (token,) = hsm.tokens.iterdir()  # the one token: a directory of SoftHSM's files
    parked = hsm.tokens.parent / "token-away"
    token.rename(parked)
    try:
        pkcs11.lib(hsm.module).reinitialize()
        yield
    finally:
        parked.rename(token)


def objects(hsm: SoftHsm) -> set[Path]:
    """The token's object files (one per object; SoftHSM encrypts a private object's attributes in it)."""
    return set(hsm.tokens.glob("*/*.object"))


def _attributes(data: bytes) -> Iterator[tuple[int, int, int, int]]:
    """(type, kind, offset of its value, length) of each attribute of an object file: an 8-byte
    generation, then attributes, each type, kind and value (kind 1 a byte, 2 an 8-byte number, 3 a
    length and bytes, 4 a length and 8-byte mechanisms), all numbers big-endian."""
    at = 8
    while at < len(data):
        attr, kind = struct.unpack(">QQ", data[at:at + 16])
        at += 16
        if kind in (1, 2):
            yield attr, kind, at, 1 if kind == 1 else 8
            at += 1 if kind == 1 else 8
            continue
        assert kind in (3, 4), f"attribute kind {kind} at {at - 16} is not one this reader knows"
        (n,) = struct.unpack(">Q", data[at:at + 8])
        yield attr, kind, at, n
        at += 8 + (n if kind == 3 else 8 * n)


def object_class(path: Path) -> int:
    """The CKA_CLASS of the object in ``path`` (3: a private key, 2: a public key, 4: a secret key)."""
    data = path.read_bytes()
    for attr, kind, at, _ in _attributes(data):
        if attr == 0x0 and kind == 2:
            return int(struct.unpack(">Q", data[at:at + 8])[0])
    raise AssertionError(f"{path.name}: no CKA_CLASS")


def corrupt_key_value(path: Path) -> None:
    """What a failing HSM's key storage looks like: the stored (encrypted) CKA_VALUE of the object
    in ``path`` cut to a length no AES-CBC ciphertext has, so SoftHSM cannot decrypt it and every
    operation with the key fails (GeneralError); its generation counter moved on, so sessions that
    hold the object read it again."""
    data = path.read_bytes()
    for attr, kind, at, n in _attributes(data):
        if attr == 0x11 and kind == 3:  # CKA_VALUE
            generation = struct.unpack(">Q", data[:8])[0] + 1
            path.write_bytes(struct.pack(">Q", generation) + data[8:at] + struct.pack(">Q", 37)
                             + data[at + 8:at + 8 + 37] + data[at + 8 + n:])
            return
    raise AssertionError(f"{path.name}: no CKA_VALUE")
