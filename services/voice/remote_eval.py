"""`biogate eval --modality voice --target HOST:PORT`: the evaluation through a running VoiceService.

Each distinct enrolment becomes a subject of the evaluation tenant (Enroll, replace=True), each
trial one Verify RPC; the score is the service's normalised score. Channels as in evaluation.py:
``wideband`` sends the fixture WAV as it is, ``telephony-8k`` sends 8 kHz mu-law bytes through the
telephone simulation, as an IVR would (the service's telephone templates and thresholds apply).
Besides the scores, every response's decision and anti-spoofing outcome is kept (``outcomes``).

Enrolment needs consent: by default it is recorded through MfaService.RecordConsent at
``BIOGATE_EVAL_MFA_TARGET`` (default: this configuration's mfa endpoint); a caller may pass its own.
Credentials: $BIOGATE_EVAL_TOKEN, else the development ``dev-all`` token of this data dir.
The trials are text-independent: the service must run the evaluation tenant without the digit
challenge (``voice.tenants.eval.require_challenge: false``; by default Verify needs one).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import grpc

from services.common.api.v1 import common_pb2, mfa_pb2_grpc, voice_pb2, voice_pb2_grpc
from services.common.client import connect
from services.common.errors import details_of
from services.common.evaluation.scorers import Failure, Scored, ScorerOptions, register_scorer

from .evaluation import EVAL_TENANT, decision_of, parse_channel, read_channel, subject_for

Consent = Callable[[str, str], None]


@dataclass
class Outcome:
    match: bool
    spoof_passed: bool
    score: float


@dataclass
class RemoteVoiceScorer:
    channel_stub: voice_pb2_grpc.VoiceServiceStub
    consent: Consent
    channel: str = "wideband"
    tenant: str = EVAL_TENANT
    timeout_s: float = 60.0
    outcomes: dict[tuple[str, str], Outcome] = field(default_factory=dict)
    score_name: str = "service_score"
    probe_crop_s: float | None = None  # probes only: the middle N s (enrolments stay whole)
    _handles: dict = field(default_factory=dict, repr=False)
    _scores: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.telephone_channel, self.crop_s = parse_channel(self.channel)
        self.voice_channel = voice_pb2.VOICE_CHANNEL_TELEPHONE if self.telephone_channel else voice_pb2.VOICE_CHANNEL_WIDEBAND

    def audio(self, path: Path, crop_s: float | None = None) -> common_pb2.Audio:
        crop_s = crop_s or self.crop_s
        if self.telephone_channel or crop_s:
            data, rate = read_channel(path, self.telephone_channel, crop_s)
            if isinstance(data, bytes):  # the telephone channel's mu-law
                return common_pb2.Audio(data=data, format=common_pb2.AudioFormat(
                    encoding=common_pb2.AUDIO_ENCODING_MULAW, sample_rate_hz=8000))
            import numpy as np

            pcm = (np.clip(data, -1, 1) * 32767).astype("<i2").tobytes()
            return common_pb2.Audio(data=pcm, format=common_pb2.AudioFormat(
                encoding=common_pb2.AUDIO_ENCODING_LINEAR16, sample_rate_hz=rate))
        return common_pb2.Audio(data=Path(path).read_bytes())

    def prefetch(self, trials: Sequence, workers: int = 2) -> None:
        """Run the enrolments, then the probes, of ``trials`` with ``workers`` concurrent RPCs; the
        runner's later calls are answered from these results (the service's cores all busy)."""
        from concurrent.futures import ThreadPoolExecutor

        enrolments = list(dict.fromkeys(tuple(t.enroll) for t in trials))
        with ThreadPoolExecutor(workers) as pool:
            handles = dict(zip(enrolments, pool.map(self._enroll, enrolments), strict=True))
            self._handles.update(handles)
            pairs = list(dict.fromkeys((handles[tuple(t.enroll)], t.probe) for t in trials
                                       if not isinstance(handles[tuple(t.enroll)], Failure)))
            self._scores.update(zip(pairs, pool.map(lambda hp: self._score(*hp), pairs), strict=True))

    def enroll(self, paths: Sequence[Path]) -> str | Failure:
        key = tuple(paths)
        return self._handles[key] if key in self._handles else self._enroll(key)

    def score(self, handle: str, probe: Path) -> Scored | Failure:
        key = (handle, probe)
        return self._scores[key] if key in self._scores else self._score(handle, probe)

    def _enroll(self, paths: Sequence[Path]) -> str | Failure:
        subject = subject_for(paths, self.channel)
        self.consent(self.tenant, subject)
        request = voice_pb2.EnrollVoiceRequest(
            subject=common_pb2.SubjectRef(tenant_id=self.tenant, subject_id=subject),
            utterances=[self.audio(Path(p)) for p in paths], channel=self.voice_channel, replace=True)
        try:
            self.channel_stub.Enroll(request, timeout=self.timeout_s)
        except grpc.RpcError as err:
            return _failure(err)
        return subject

    def _score(self, handle: str, probe: Path) -> Scored | Failure:
        request = voice_pb2.VerifyVoiceRequest(
            subject=common_pb2.SubjectRef(tenant_id=self.tenant, subject_id=handle),
            audio=self.audio(Path(probe), self.probe_crop_s), channel=self.voice_channel)
        try:
            reply = self.channel_stub.Verify(request, timeout=self.timeout_s)
        except grpc.RpcError as err:
            return _failure(err)
        self.outcomes[(handle, str(probe))] = Outcome(reply.match, reply.spoof_passed, reply.score)
        codes = [r.code for r in reply.reasons]
        return Scored(float(reply.score), decision_of(reply.match, codes, reply.spoof_checked or reply.replay_checked,
                                                      reply.spoof_passed,
                                                      reply.challenge_passed or "CHALLENGE_FAILED" in codes,
                                                      reply.challenge_passed))


def _failure(err: grpc.RpcError) -> Failure:
    if err.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION):
        reason = details_of(err)["reason"] or err.code().name
        return Failure(reason.lower(), "anti_spoofing" if reason == "SPOOF_SUSPECTED" else "acquisition")
    raise err  # unavailable, unauthenticated...: not a property of the sample


def mfa_consent(channel: grpc.Channel) -> Consent:
    stub = mfa_pb2_grpc.MfaServiceStub(channel)
    done: set[tuple[str, str]] = set()

    def record(tenant: str, subject: str) -> None:
        if (tenant, subject) in done:
            return
        stub.RecordConsent(common_pb2.RecordConsentRequest(consent=common_pb2.Consent(
            subject=common_pb2.SubjectRef(tenant_id=tenant, subject_id=subject),
            purpose=common_pb2.CONSENT_PURPOSE_BIOMETRIC_VERIFICATION, modalities=[common_pb2.MODALITY_VOICE],
            granted=True, policy_version="evaluation", evidence_ref="biogate-eval")), timeout=10.0)
        done.add((tenant, subject))

    return record


def _token(settings) -> str | None:
    if os.environ.get("BIOGATE_EVAL_TOKEN"):
        return os.environ["BIOGATE_EVAL_TOKEN"]
    path = settings.dev_credentials_file
    return json.loads(path.read_text())["dev-all"] if path.exists() else None


def make_remote_verification_scorer(options: ScorerOptions) -> RemoteVoiceScorer:
    settings, token = options.settings, _token(options.settings)
    mfa = settings.endpoint("mfa")
    mfa_target = os.environ.get("BIOGATE_EVAL_MFA_TARGET", f"{mfa.host}:{mfa.port}")
    stub = voice_pb2_grpc.VoiceServiceStub(connect(options.remote_target(), token))
    return RemoteVoiceScorer(stub, mfa_consent(connect(mfa_target, token)), options.channel or "wideband",
                             options.tenant or EVAL_TENANT)


register_scorer("voice", "verification", make_remote_verification_scorer, mode="remote")
