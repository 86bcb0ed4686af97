"""Genuine flows through the real services: how often the default policy ALLOWs the customer
(issue 11: the attack suite must not be bought with refusing customers).

Face, voice and MFA services each run in their own process on loopback (bench/harness.py), with
the default policy and two callers: the bank's back end and the IVR platform (a registered
terminal of the ivr channel). Three channels:

* **face app**: each person of ``../shared/fixtures/face/identities`` (118 x 4 photos) is enrolled
  from photo 1; the app binds its key after a login with that photo and the SMS code (setup); then
  each of photos 2-4 is one login on the bound phone, the photo signed by the bound key (which
  proves the device too): [face, device].
* **voice app (16 kHz)** and **voice IVR (8 kHz G.711 mu-law)**: the two speakers of
  ``../shared/fixtures/voice/digits``, each enrolled under several subject ids (takes 0-2 of every
  digit, at 16 kHz for the app and 8 kHz for the IVR). Every session asks the MFA for the digit
  challenge and answers it with the speaker's own takes 3-9 of the asked digits, chosen at random
  (never filtered by what the recogniser hears). App: the first session is on a new phone
  ([voice, sms_otp], then the phone binds its key), the next ones on the bound phone ([voice,
  device]); IVR: [voice, sms_otp], the audio through the telephone simulation (300-3400 Hz, G.711
  mu-law) as the platform receives it.

  The fixtures are 8 kHz recordings: the 16 kHz app row sends them resampled, which is narrowband
  speech in a wideband container. A diagnostic row sends the same kind of answers from the app at
  their own 8 kHz (the service then uses its telephone-family layers), to tell a refusal of the
  recordings' bandwidth from one of the flow.

An attempt counts as ALLOW when the session's decision is ALLOW; otherwise the layer that refused
is recorded (the factor's first reason, or the status reason of a refused request). Nothing here is
tuned: thresholds, policy and recogniser are the shipped ones. The 95 % intervals are exact
binomial (Clopper-Pearson) over attempts, which are not independent (the same people and voices
recur), so they understate the uncertainty; the voice rows rest on two speakers.

    .venv/bin/python -m bench.genuine_rates [--identities 118] [--voice-subjects 20] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import grpc

from bench.harness import FIXTURES, ServiceProcess, command_line, machine, machine_line, write_json
from services.common.api.v1 import (
    common_pb2, face_pb2, face_pb2_grpc, mfa_pb2, mfa_pb2_grpc, voice_pb2, voice_pb2_grpc,
)
from services.common.client import connect
from services.common.errors import details_of
from services.common.evaluation.metrics import binomial_ci
from services.common.server.auth import ROLES, token_sha256
from tests.mfa import spoken_digits
from tests.mfa.conftest import App, phone_device

F = mfa_pb2
TENANT = "bench-genuine"
BANK, IVR = "bench-bank-token", "bench-ivr-token"
AUTH = {"auth": {"dev_credentials": False, "principals": [
    {"name": "bank-backend", "roles": list(ROLES), "token_sha256": token_sha256(BANK)},
    {"name": "ivr-platform", "roles": ["orchestrator"], "token_sha256": token_sha256(IVR),
     "terminal": {"channel": "ivr"}}]}}
IDENTITIES = FIXTURES / "face" / "identities"


def phone(install: str) -> mfa_pb2.DeviceInfo:
    """A customer's phone as its app reports it (the install id differs per customer)."""
    return phone_device(install)  # an Android phone in Shanghai, as the MFA tests' customers


class Flows:
    def __init__(self, face: ServiceProcess, voice: ServiceProcess, mfa: ServiceProcess) -> None:
        self.mfa_svc = mfa
        self._channels = [connect(mfa.address, BANK), connect(mfa.address, IVR), connect(face.address, BANK),
                          connect(voice.address, BANK)]
        self.bank = mfa_pb2_grpc.MfaServiceStub(self._channels[0])
        self.ivr = mfa_pb2_grpc.MfaServiceStub(self._channels[1])
        self.face = face_pb2_grpc.FaceServiceStub(self._channels[2])
        self.voice = voice_pb2_grpc.VoiceServiceStub(self._channels[3])
        self.outbox = mfa.dir / "data" / "sms-outbox.jsonl"
        self.phones = 0

    def close(self) -> None:
        for c in self._channels:
            c.close()

    def subject(self, sid: str) -> common_pb2.SubjectRef:
        ref = common_pb2.SubjectRef(tenant_id=TENANT, subject_id=sid)
        self.bank.RecordConsent(common_pb2.RecordConsentRequest(consent=common_pb2.Consent(
            subject=ref, purpose=common_pb2.CONSENT_PURPOSE_BIOMETRIC_VERIFICATION,
            modalities=[common_pb2.MODALITY_FACE, common_pb2.MODALITY_VOICE], granted=True,
            policy_version="privacy-2025-01")))
        self.phones += 1
        self.bank.SetPhoneNumber(F.SetPhoneNumberRequest(subject=ref, phone_e164=f"+86137{self.phones:08d}"))
        return ref

    def start(self, ref, app: App):
        req = F.StartAuthenticationRequest(subject=ref, channel=F.CHANNEL_APP, action="login", device=app.device)
        return app.opened(req, self.bank.StartAuthentication(req))

    def otp(self, stub, s) -> None:
        stub.SendOtp(F.SendOtpRequest(session_id=s.session_id))
        code = json.loads(self.outbox.read_text().splitlines()[-1])["text"].split()[0]
        stub.SubmitFactor(F.SubmitFactorRequest(session_id=s.session_id, otp=F.OtpEvidence(code=code)))

    def bind(self, s, app: App) -> None:
        app.device_id = self.bank.RegisterDevice(F.RegisterDeviceRequest(
            session_id=s.session_id, device=app.device, public_key=app.public_der, label="phone")).device_id

    def voice_challenge(self, stub, s):
        return stub.StartBiometricChallenge(F.StartBiometricChallengeRequest(
            session_id=s.session_id, modality=common_pb2.MODALITY_VOICE))


def attempt(run) -> dict:
    """One genuine attempt: run() -> (decision, factor result); the outcome and the refusing layer."""
    t0 = time.perf_counter()
    try:
        d, r = run()
    except grpc.RpcError as err:
        return {"allow": False, "refused_by": f"{err.code().name}:{details_of(err)['reason']}",
                "message": err.details(), "s": time.perf_counter() - t0}
    out = {"allow": d.outcome == F.OUTCOME_ALLOW, "outcome": F.Outcome.Name(d.outcome),
           "factor_passed": r.passed, "llr": round(r.llr, 3), "factor_reasons": [x.code for x in r.reasons],
           "decision_reasons": [x.code for x in d.reasons], "s": time.perf_counter() - t0}
    if not out["allow"]:
        out["refused_by"] = (out["factor_reasons"] or out["decision_reasons"] or [out["outcome"]])[0]
    return out


# ---------------------------------------------------------------------------------------- face
def face_app(flows: Flows, identities: list[Path], log) -> dict:
    attempts: list[dict] = []
    setup: Counter[str] = Counter()
    for person in identities:
        photos = sorted(person.glob("*.jpg"))
        ref = flows.subject(f"face-{person.name}")
        try:
            flows.face.Enroll(face_pb2.EnrollFaceRequest(subject=ref, images=[common_pb2.Image(
                data=photos[0].read_bytes())]), timeout=120)
        except grpc.RpcError as err:
            setup[f"enrol refused: {details_of(err)['reason']}"] += 1
            continue
        app = App(phone(f"{person.name}-phone"))
        s = flows.start(ref, app)
        try:  # setup: the phone binds its key after a login with the enrolment photo and the SMS code
            flows.bank.SubmitFactor(F.SubmitFactorRequest(session_id=s.session_id,
                                                          face=app.face(s, photos[0].read_bytes())), timeout=120)
            flows.otp(flows.bank, s)
            if flows.bank.Decide(F.DecideRequest(session_id=s.session_id)).outcome != F.OUTCOME_ALLOW:
                setup["binding login not allowed"] += 1
                continue
            flows.bind(s, app)
        except grpc.RpcError as err:
            setup[f"binding refused: {details_of(err)['reason']}"] += 1
            continue
        setup["bound"] += 1
        for photo in photos[1:]:
            def run(photo=photo, ref=ref, app=app):
                s = flows.start(ref, app)
                r = flows.bank.SubmitFactor(F.SubmitFactorRequest(
                    session_id=s.session_id, face=app.face(s, photo.read_bytes())), timeout=120).result
                return flows.bank.Decide(F.DecideRequest(session_id=s.session_id)), r
            a = {"who": person.name, "photo": photo.name, **attempt(run)}
            attempts.append(a)
            log(a)
    return {"attempts": attempts, "setup": dict(setup)}


# ---------------------------------------------------------------------------------------- voice
def voice(flows: Flows, subjects: int, app_sessions: int, app8k_sessions: int, ivr_sessions: int, seed: int,
          log) -> dict:
    rng = random.Random(seed)
    attempts: dict[str, list[dict]] = {"app": [], "app8k": [], "ivr": []}
    for speaker in spoken_digits.SPEAKERS:
        for k in range(subjects):
            ref = flows.subject(f"voice-{speaker}-{k:02d}")
            for rate in (16000, spoken_digits.RATE):  # a wideband template for the app, telephone for the IVR
                flows.voice.Enroll(voice_pb2.EnrollVoiceRequest(subject=ref, utterances=[
                    common_pb2.Audio(data=u) for u in spoken_digits.enrolment(speaker, rate)]), timeout=300)
            app = App(phone(f"{speaker}-{k}-phone"))
            for channel, rate, sessions in (("app", 16000, app_sessions), ("app8k", spoken_digits.RATE, app8k_sessions)):
                for _ in range(sessions):
                    def run_app(rate=rate, ref=ref, app=app, speaker=speaker):
                        s = flows.start(ref, app)
                        challenge = flows.voice_challenge(flows.bank, s)
                        audio = spoken_digits.answer(challenge.digits, speaker, rng, rate=rate)
                        r = flows.bank.SubmitFactor(F.SubmitFactorRequest(session_id=s.session_id, voice=app.voice(
                            s, audio, challenge.challenge.nonce)), timeout=300).result
                        if not app.device_id and r.passed:  # a new phone: the SMS code too, then it binds its key
                            flows.otp(flows.bank, s)
                        d = flows.bank.Decide(F.DecideRequest(session_id=s.session_id))
                        if not app.device_id and d.outcome == F.OUTCOME_ALLOW:
                            flows.bind(s, app)
                        return d, r
                    bound = bool(app.device_id)
                    a = {"who": f"{speaker}-{k}", "channel": channel, "bound_device": bound, **attempt(run_app)}
                    attempts[channel].append(a)
                    log(a)
            for _ in range(ivr_sessions):
                def run_ivr(ref=ref, speaker=speaker):
                    s = flows.ivr.StartAuthentication(F.StartAuthenticationRequest(
                        subject=ref, channel=F.CHANNEL_IVR, action="login"))
                    challenge = flows.voice_challenge(flows.ivr, s)
                    mulaw = spoken_digits.over_the_line(spoken_digits.answer(challenge.digits, speaker, rng))
                    audio = common_pb2.Audio(data=mulaw, format=common_pb2.AudioFormat(
                        encoding=common_pb2.AUDIO_ENCODING_MULAW, sample_rate_hz=8000))
                    r = flows.ivr.SubmitFactor(F.SubmitFactorRequest(session_id=s.session_id, voice=F.VoiceEvidence(
                        audio=audio, challenge_nonce=challenge.challenge.nonce,
                        binding=F.CaptureBinding(terminal=F.TerminalCapture()))), timeout=300).result
                    if r.passed:  # the SMS code only when it can matter: a phone gets 5 an hour
                        flows.otp(flows.ivr, s)
                    return flows.ivr.Decide(F.DecideRequest(session_id=s.session_id)), r
                a = {"who": f"{speaker}-{k}", "channel": "ivr", **attempt(run_ivr)}
                attempts["ivr"].append(a)
                log(a)
    return attempts


# ---------------------------------------------------------------------------------------- report
def summary(attempts: list[dict]) -> dict:
    n = len(attempts)
    allowed = sum(a["allow"] for a in attempts)
    out = {"n": n, "allow": allowed}
    if n:
        lo, hi = binomial_ci(n - allowed, n)
        out.update(rate=allowed / n, ci95=(1 - hi, 1 - lo),
                   refused_by=dict(Counter(a["refused_by"] for a in attempts if not a["allow"]).most_common()))
    by_who: defaultdict[str, list[int]] = defaultdict(lambda: [0, 0])
    for a in attempts:
        who = a["who"].split("-")[0] if "channel" in a else "all"
        by_who[who][0] += a["allow"]
        by_who[who][1] += 1
    out["by_speaker"] = {k: f"{v[0]}/{v[1]}" for k, v in by_who.items()}
    return out


def markdown(report: dict) -> str:
    lines = ["| channel | flow | ALLOW | rate | 95 % CI | not allowed: the layer that refused |", "|---|---|---|---|---|---|"]
    flows = {"face app": "login, bound phone, photo signed by its key: [face, device]",
             "voice app (16 kHz)": "login; new phone [voice, sms_otp] then bound phone [voice, device]; digit challenge",
             "voice app at 8 kHz (diagnostic)": "as the app row, the recording sent at its own 8 kHz",
             "voice IVR (8 kHz mu-law)": "login, IVR terminal: [voice, sms_otp]; digit challenge"}
    for name, s in report["channels"].items():
        if not s["n"]:
            continue
        refused = ", ".join(f"{k} {v}" for k, v in s["refused_by"].items()) or "none"
        lines.append(f"| {name} | {flows[name]} | {s['allow']}/{s['n']} | {100 * s['rate']:.1f} % | "
                     f"{100 * s['ci95'][0]:.1f}-{100 * s['ci95'][1]:.1f} % | {refused} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--identities", type=int, default=0, help="face: the first N people (default all)")
    ap.add_argument("--voice-subjects", type=int, default=20, help="subject ids enrolled per speaker")
    ap.add_argument("--app-sessions", type=int, default=3)
    ap.add_argument("--app8k-sessions", type=int, default=2,
                    help="diagnostic: app sessions recorded at 8 kHz (the fixtures' own rate)")
    ap.add_argument("--ivr-sessions", type=int, default=3)
    ap.add_argument("--skip", choices=["face", "voice"], action="append", default=[])
    ap.add_argument("--seed", type=int, default=20261204)
    ap.add_argument("--dsn", default="", help="PostgreSQL DSN of an empty schema (default: SQLite in a temp dir)")
    ap.add_argument("--json", help="write the report (every attempt) here")
    ap.add_argument("--markdown", help="print the table of a report written with --json, and stop")
    args = ap.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(Path(args.markdown).read_text())))
        return 0
    people = sorted(p for p in IDENTITIES.iterdir() if p.is_dir())
    people = people[: args.identities] if args.identities else people
    tmp = tempfile.TemporaryDirectory(prefix="bench-genuine-")
    # One database for the three services, as a deployment has: the MFA records the consent the
    # face and voice services check. The figures are rates: a loaded machine must not fail calls.
    slow = {"server": {"rpc_timeout_s": 300}, "storage": {"dsn": args.dsn or f"sqlite:///{tmp.name}/biogate.db"}}
    started = time.time()
    face = ServiceProcess("face", {**AUTH, **slow}).start()
    voice_svc = ServiceProcess("voice", {**AUTH, **slow}).start()
    mfa = ServiceProcess("mfa", {**AUTH, **slow, "clients": {
        name: {"target": svc.address, "token": BANK, "deadline_s": 240, "retries": 0}
        for name, svc in (("face", face), ("voice", voice_svc))}}).start()
    flows = Flows(face, voice_svc, mfa)

    def log(a):
        print(json.dumps({k: v for k, v in a.items() if k != "message"}), file=sys.stderr, flush=True)

    try:
        face_part = {"attempts": [], "setup": {}} if "face" in args.skip else face_app(flows, people, log)
        voice_part = ({"app": [], "app8k": [], "ivr": []} if "voice" in args.skip else
                      voice(flows, args.voice_subjects, args.app_sessions, args.app8k_sessions, args.ivr_sessions,
                            args.seed, log))
    finally:
        flows.close()
        for svc in (mfa, voice_svc, face):
            svc.stop()
        tmp.cleanup()
    report = {
        "machine": machine(), "command": command_line(), "minutes": round((time.time() - started) / 60, 1),
        "channels": {"face app": summary(face_part["attempts"]), "voice app (16 kHz)": summary(voice_part["app"]),
                     "voice app at 8 kHz (diagnostic)": summary(voice_part["app8k"]),
                     "voice IVR (8 kHz mu-law)": summary(voice_part["ivr"])},
        "face_setup": face_part["setup"],
        "attempts": {"face": face_part["attempts"], "voice": [a for v in voice_part.values() for a in v]},
    }
    write_json(args.json, report)
    print(machine_line(report["machine"]))
    print(markdown(report))
    for name, s in report["channels"].items():
        print(name, json.dumps({k: v for k, v in s.items() if k != "refused_by"}))
    print("face setup:", report["face_setup"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
