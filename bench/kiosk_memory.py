"""The kiosk gateway's peak memory with maximum-size frames held at once: `biogate kiosk` in its
own process (the MFA a dead address: each frame is read whole, checked and decoded, then the MFA
call fails with 503), ``--concurrent`` clients each posting a 4 MB frame (5.6 MB of base64 JSON)
``--rounds`` times (kiosk.http.max_frames set to ``--concurrent``); RSS and its peak (VmHWM) from
/proc. kiosk.http.max_frames bounds how many frames are held at once, so its value sizes the pod's
memory (deploy/k8s).

    .venv/bin/python -m bench.kiosk_memory --concurrent 16 [--rounds 4]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def memory_mb(pid: int) -> dict[str, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    return {k: int(re.search(k + r":\s+(\d+)", status).group(1)) // 1024 for k in ("VmRSS", "VmHWM")}  # type: ignore[union-attr]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrent", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    env = dict(os.environ, BIOGATE_DATA_DIR=tempfile.mkdtemp(), BIOGATE_KIOSK__TENANT="bank-a",
               BIOGATE_KIOSK__MFA_TOKEN="t", BIOGATE_KIOSK__MFA_TARGET="127.0.0.1:9", BIOGATE_KIOSK__PORT="0",
               BIOGATE_KIOSK__RATE_LIMIT__ENABLED="false",
               BIOGATE_KIOSK__HTTP__MAX_CONNECTIONS=str(max(64, args.concurrent)),
               BIOGATE_KIOSK__HTTP__MAX_CONNECTIONS_PER_IP=str(max(64, args.concurrent)),  # one client here
               BIOGATE_KIOSK__HTTP__MAX_FRAMES=str(args.concurrent))
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "kiosk"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        found = re.match(r"biogate: kiosk gateway on (\S+) \(open \S+#key=(\S+)\)", proc.stdout.readline())  # type: ignore[union-attr]
        assert found, "the gateway did not start"
        url, key = found.groups()
        idle = memory_mb(proc.pid)
        frame = json.dumps({"image_b64": base64.b64encode(os.urandom(4 * 1024 * 1024 - 2048)).decode()}).encode()
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}

        def post(_: int) -> str:
            req = urllib.request.Request(f"{url}/v1/sessions/ses_{'0' * 32}/face", frame, headers)
            try:
                with urllib.request.urlopen(req, timeout=300) as r:
                    return str(r.status)
            except urllib.error.HTTPError as err:
                return f"{err.code} {json.loads(err.read())['reason']}"

        cpu0, t0 = time.process_time(), time.monotonic()
        with ThreadPoolExecutor(args.concurrent) as pool:
            codes = Counter(pool.map(post, range(args.rounds * args.concurrent)))
        wall = time.monotonic() - t0
        after = memory_mb(proc.pid)
        print(json.dumps({"concurrent": args.concurrent, "frames": sum(codes.values()), "status": dict(codes),
                          "idle_rss_mb": idle["VmRSS"], "peak_rss_mb": after["VmHWM"], "rss_after_mb": after["VmRSS"],
                          "client_cpu_s": round(time.process_time() - cpu0, 2), "wall_s": round(wall, 2),
                          "load": os.getloadavg()[0]}))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


if __name__ == "__main__":
    main()
