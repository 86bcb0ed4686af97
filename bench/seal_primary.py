"""What reading the primary afresh on every seal costs: the file keyring's stat, the token's search.

    .venv/bin/python -m bench.seal_primary [--n 2000]

On the file keyring and on a SoftHSM2 token (made in a temporary directory, as tests/softhsm.py
does), process CPU time per call of:

* ``primary_key_id()`` as a seal asks it now (a stat of the file / a search of the token's keys),
  and the lookup served from memory that it replaced (``_current()`` / ``_list()`` within the
  reuse interval);
* a whole ``EnvelopeCrypto.seal`` of a 2 KB template-sized payload, for scale.

CPU time, not wall time: the development VM's 2 cores are shared (the load average is printed).
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from services.common.crypto import EnvelopeCrypto, LocalKeyring, TemplateBinding

MODULES = ("/usr/lib/softhsm/libsofthsm2.so", "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so")
PIN = "bench-pin-1234"


def per_call_us(fn: Callable[[], object], n: int) -> float:
    fn()
    t0 = time.process_time()
    for _ in range(n):
        fn()
    return (time.process_time() - t0) / n * 1e6


def softhsm_keyring(root: Path):
    from services.common.crypto.hsm import Pkcs11Keyring, open_token
    from services.settings import load_config

    module = next(m for m in MODULES if Path(m).exists())
    (root / "tokens").mkdir(parents=True)
    conf = root / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {root / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
    os.environ.update(SOFTHSM2_CONF=str(conf), BIOGATE_PKCS11_PIN=PIN)
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", "bench", "--pin", PIN, "--so-pin",
                    "so-" + PIN], check=True, capture_output=True)
    settings = load_config(None, data_dir=str(root / "data"), keys={
        "backend": "pkcs11", "pkcs11": {"module": module, "token_label": "bench", "label_prefix": "bench"}})
    return Pkcs11Keyring(open_token(settings.keys.pkcs11))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    args = ap.parse_args()
    binding = TemplateBinding("bank-a", "cust-1", "face", "arcface-r100")
    payload = os.urandom(2048)
    print(f"load average before: {Path('/proc/loadavg').read_text().strip()}")
    root = Path(tempfile.mkdtemp(prefix="bench-seal-"))
    try:
        file_kr = LocalKeyring(root / "keyring.json", check_interval_s=3600)
        token_kr = softhsm_keyring(root / "hsm")
        rows = [
            ("file", file_kr.primary_key_id, lambda: file_kr._current().primary, EnvelopeCrypto(file_kr)),
            ("SoftHSM2", token_kr.primary_key_id, lambda: max(token_kr._list()), EnvelopeCrypto(token_kr)),
        ]
        print("| keyring | primary_key_id() afresh, us | from memory, us | whole seal, us |")
        print("|---|---|---|---|")
        for name, fresh, cached, crypto in rows:
            print(f"| {name} | {per_call_us(fresh, args.n):.1f} | {per_call_us(cached, args.n):.2f} | "
                  f"{per_call_us(functools.partial(crypto.seal, binding, payload), args.n):.1f} |")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"load average after: {Path('/proc/loadavg').read_text().strip()}")


if __name__ == "__main__":
    main()
