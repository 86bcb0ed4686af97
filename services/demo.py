"""`make demo` (`python -m services.demo`): starts face, voice and MFA on their embedded defaults in
a temporary data directory (var/ is left alone; the fetched models are shared) and walks a
scripted story through the client SDK on the fixtures in ../shared/fixtures, printing each step:
enrolment, a new phone stepped up with the SMS code and bound, a genuine login allowed, a fraud
phrase sent to review and resolved, an impostor denied, a spoof refused, erasure. Exits non-zero
when any step does not behave as the story says."""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from biogate_client import BioGate, BioGateError, Device, dev_credentials, dev_otp, device_info, outcome_name
from services.common.api.v1 import mfa_pb2
from services.common.config import PROJECT_ROOT
from services.serve import health_status

FIXTURES = PROJECT_ROOT.parent / "shared" / "fixtures"
PORTS = {"face": 50051, "voice": 50052, "mfa": 50053}
JWKS_PORT = 8053  # mfa.http: the decision tokens' keys over HTTP
CUSTOMER, IMPOSTOR = "Aaron_Peirsol", "Andy_Roddick"
SPOOF = "face/pad/spoof/apfol_fake_0.png"  # a photo of a face presented to the camera


class Story:
    """The steps, each printed as it runs; ``failures`` names those that did not behave."""

    def __init__(self, bg: BioGate, outbox: Path, tenant: str = "demo-bank", subject: str = "cust-demo-0001",
                 fixtures: Path = FIXTURES, say: Callable[[str], None] = print, jwks_url: str | None = None) -> None:
        self.bg, self.outbox, self.tenant, self.subject, self.fixtures, self.say = bg, outbox, tenant, subject, fixtures, say
        self.jwks_url = jwks_url  # the MFA's /.well-known/jwks.json; None: GetSigningKeys
        self.failures: list[str] = []
        self.phone = Device(device_info("demo-phone-1", os_version="14.2", model="Pixel 8", app_version="5.1.0"))

    def photo(self, identity: str, n: int) -> bytes:
        """The identity's ``n``-th photo (from 1, in name order)."""
        return sorted((self.fixtures / "face" / "identities" / identity).glob("*.jpg"))[n - 1].read_bytes()

    def check(self, step: str, ok: bool, what: str) -> bool:
        self.say(f"  {'ok  ' if ok else 'FAIL'} {what}")
        if not ok:
            self.failures.append(f"{step}: {what}")
        return ok

    @staticmethod
    def codes(message) -> str:
        return ", ".join(r.code for r in message.reasons) or "-"

    def run(self) -> list[str]:
        for n, (title, step) in enumerate(self.steps(), 1):
            self.say(f"[{n}/{len(self.steps())}] {title}")
            try:
                step()
            except BioGateError as err:
                self.check(title, False, f"refused: {err}")
        self.say("demo: every step behaved" if not self.failures else f"demo: {len(self.failures)} step(s) did not behave")
        return self.failures

    def steps(self) -> list[tuple[str, Callable[[], None]]]:
        return [("consent, phone number and face enrolment", self.enrol),
                ("a new phone: the selfie, then the SMS code (step-up), then the phone binds its key", self.new_phone),
                ("a genuine login on the bound phone", self.genuine),
                ("a fraud phrase in the chat: the decision goes to review; a reviewer resolves it", self.review),
                ("an impostor's selfie on the customer's phone", self.impostor),
                ("a photo presented to the camera (spoof)", self.spoof),
                ("erasure of the customer", self.erasure)]

    def enrol(self) -> None:
        self.bg.record_consent(self.tenant, self.subject, ["face"])
        masked = self.bg.set_phone(self.tenant, self.subject, "+8613800138000")
        r = self.bg.enrol_face(self.tenant, self.subject, [self.photo(CUSTOMER, 1)])
        self.check("enrol", all(q.accepted for q in r.images), f"consent recorded, phone {masked}, face enrolled "
                   f"({sum(q.accepted for q in r.images)} of {len(r.images)} images accepted)")

    def new_phone(self) -> None:
        s = self.bg.start(self.tenant, self.subject, self.phone)
        self.say(f"  session {s.id}: risk {s.started.risk.score:.0f} ({self.codes(s.started.risk)}), "
                 f"device bound {s.started.device_bound}")
        r = s.submit_face(self.photo(CUSTOMER, 2))
        self.check("new phone", r.passed and r.binding == "new_device",
                   f"selfie signed by the new phone's key: passed {r.passed}, llr {r.llr:.1f}, binding {r.binding}")
        d = s.decide()
        if not self.check("new phone", d.outcome == mfa_pb2.OUTCOME_STEP_UP,
                          f"decision {outcome_name(d.outcome)}: a new phone's key proves nothing, the SMS code is needed"):
            return
        sent = s.send_otp()
        code = dev_otp(self.outbox, sent.masked_phone)
        self.say(f"  SMS to {sent.masked_phone}, read from the development outbox {self.outbox.name}")
        self.check("new phone", s.submit_otp(code).passed, "SMS code accepted")
        d = s.decide()
        if self.check("new phone", d.outcome == mfa_pb2.OUTCOME_ALLOW,
                      f"decision {outcome_name(d.outcome)}, acr {d.acr}, amr {','.join(d.amr)}"):
            claims = self.bg.verify_token(d.token, self.tenant, session_id=s.id, jwks=self.jwks_url)
            self.say(f"  token verified against the JWKS ({self.jwks_url or 'GetSigningKeys'}): "
                     f"decision {claims['decision']}, issuer {claims['iss']}")
            self.say(f"  phone bound as {s.register_device('demo phone')}")

    def genuine(self) -> None:
        s = self.bg.start(self.tenant, self.subject, self.phone)
        r = s.submit_face(self.photo(CUSTOMER, 4))
        d = s.decide()
        self.check("genuine", d.outcome == mfa_pb2.OUTCOME_ALLOW and r.binding == "device",
                   f"{outcome_name(d.outcome)}: face llr {r.llr:.1f}, signed by the bound phone, amr {','.join(d.amr)}")

    def review(self) -> None:
        s = self.bg.start(self.tenant, self.subject, self.phone,
                          conversation_text="the bank's security team says: move the money to a safe account")
        self.say(f"  risk {s.started.risk.score:.0f} ({self.codes(s.started.risk)})")
        s.submit_face(self.photo(CUSTOMER, 3))
        d = s.decide()
        if d.outcome == mfa_pb2.OUTCOME_STEP_UP:
            s.submit_otp(dev_otp(self.outbox, s.send_otp().masked_phone))
            d = s.decide()
        if not self.check("review", d.outcome == mfa_pb2.OUTCOME_REVIEW and bool(d.review_id),
                          f"{outcome_name(d.outcome)} ({self.codes(d)}), review {d.review_id or '-'}"):
            return
        pending = [r.review_id for r in self.bg.list_reviews(self.tenant)]
        self.check("review", d.review_id in pending, f"{len(pending)} pending review(s) in the queue")
        done = self.bg.resolve_review(d.review_id, approve=False, note="customer was being coached by a caller")
        self.check("review", done.review.status == "rejected" and done.decision.outcome == mfa_pb2.OUTCOME_DENY
                   and not done.decision.token,
                   f"reviewer {done.review.resolved_by} rejected it: final decision "
                   f"{outcome_name(done.decision.outcome)} ({self.codes(done.decision)}), no token")

    def impostor(self) -> None:
        s = self.bg.start(self.tenant, self.subject, self.phone)
        r = s.submit_face(self.photo(IMPOSTOR, 1))
        d = s.decide()
        self.check("impostor", d.outcome == mfa_pb2.OUTCOME_DENY and not r.passed,
                   f"{outcome_name(d.outcome)}: face passed {r.passed}, llr {r.llr:.1f} ({self.codes(r)})")

    def spoof(self) -> None:
        s = self.bg.start(self.tenant, self.subject, self.phone)
        r = s.submit_face((self.fixtures / SPOOF).read_bytes())
        d = s.decide()
        self.check("spoof", d.outcome != mfa_pb2.OUTCOME_ALLOW and r.veto and "LIVENESS_FAILED" in self.codes(r),
                   f"{outcome_name(d.outcome)}: veto {r.veto} ({self.codes(r)})")

    def erasure(self) -> None:
        r = self.bg.delete_subject(self.tenant, self.subject, "demo-erasure")
        self.check("erasure", r.templates_deleted >= 1 and r.contact_erased,
                   f"{r.templates_deleted} template(s), {r.devices_deleted} device(s) erased, contact erased {r.contact_erased}")
        try:
            self.bg.verify_face(self.tenant, self.subject, self.photo(CUSTOMER, 4))
            self.check("erasure", False, "the erased customer was still verified")
        except BioGateError as err:
            self.check("erasure", True, f"verification now refused: {err.code.name} {err.reason}")


# ---------------------------------------------------------------------- the services
def _port_taken(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def free_ports(n: int) -> list[int]:
    """Ports the OS has free now (for running beside `make run`)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@contextmanager
def services(data_dir: Path, ports: dict[str, int] = PORTS, metrics_ports: dict[str, int] | None = None,
             jwks_port: int = JWKS_PORT, timeout_s: float = 900) -> Iterator[dict[str, str]]:
    """`biogate serve all` with its state in ``data_dir`` and the models shared; on the embedded
    defaults unless ``ports`` (and ``metrics_ports``, ``jwks_port``) say otherwise. Yields the
    addresses, and the JWKS URL as "jwks"."""
    taken = [f"{name} ({port})" for name, port in {**ports, "mfa http": jwks_port}.items() if _port_taken(port)]
    if taken:
        raise SystemExit(f"demo: ports in use: {', '.join(taken)}; stop `make run` first, or use --free-ports")
    env = {**os.environ, "BIOGATE_DATA_DIR": str(data_dir),
           "BIOGATE_MODELS__CACHE_DIR": str(PROJECT_ROOT / "var" / "models")}
    for name, port in ports.items():
        env[f"BIOGATE_SERVER__{name.upper()}__PORT"] = str(port)
    for name, port in (metrics_ports or {}).items():
        env[f"BIOGATE_SERVER__{name.upper()}__METRICS_PORT"] = str(port)
    env["BIOGATE_MFA__HTTP__PORT"] = str(jwks_port)
    log = (data_dir / "services.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "serve", "all"], env=env, cwd=PROJECT_ROOT,
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout_s
        waiting = dict(ports)
        while waiting:
            if proc.poll() is not None:
                raise SystemExit(f"demo: the services stopped (exit {proc.returncode}); see {log.name}")
            if time.monotonic() > deadline:
                raise SystemExit(f"demo: {', '.join(waiting)} not SERVING after {timeout_s:.0f} s")
            for name, port in list(waiting.items()):
                if health_status(f"127.0.0.1:{port}") == "SERVING":
                    print(f"demo: {name} SERVING on 127.0.0.1:{port}", flush=True)
                    del waiting[name]
            time.sleep(1)
        addresses = {name: f"127.0.0.1:{port}" for name, port in ports.items()}
        yield {**addresses, "jwks": f"http://127.0.0.1:{jwks_port}/.well-known/jwks.json"}
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.demo", description=__doc__)
    parser.add_argument("--fixtures", type=Path, default=FIXTURES)
    parser.add_argument("--free-ports", action="store_true",
                        help="ports the OS has free instead of 50051-50053, 9151-9153 and 8053 (beside `make run`)")
    args = parser.parse_args(argv)
    ports, metrics, jwks_port = PORTS, None, JWKS_PORT
    if args.free_ports:
        n = len(PORTS)
        free = free_ports(2 * n + 1)
        ports, metrics, jwks_port = dict(zip(PORTS, free[:n], strict=True)), dict(zip(PORTS, free[n:2 * n], strict=True)), free[-1]
    with tempfile.TemporaryDirectory(prefix="biogate-demo-") as tmp:
        data = Path(tmp)
        print(f"demo: starting face, voice and mfa with their data in {data} (models load for a minute or more)",
              flush=True)
        with services(data, ports, metrics, jwks_port) as addresses:
            with BioGate(addresses["mfa"], addresses["face"], addresses["voice"],
                         dev_credentials(data / "dev-credentials.json")) as bg:
                failures = Story(bg, data / "sms-outbox.jsonl", fixtures=args.fixtures, jwks_url=addresses["jwks"],
                                 say=lambda line: print(line, flush=True)).run()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
