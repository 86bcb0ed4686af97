"""Voice: an utterance verified by VoiceService.Verify, bound to the session and the device by its
CaptureBinding, answering the digit challenge this session handed out (replay defence; required
unless the policy turns it off for the action and channel). A failed spoof check or challenge is a
veto.

The IVR may stream the utterance instead (MfaService.StreamVoiceFactor): the evidence is then a
:class:`StreamedVoice`, the same checks run on its header, and check() passes the chunks on to
VoiceService.StreamVerify as they arrive (joined into blocks of up to mfa.ivr_stream.max_hold_s)
instead of calling Verify with the whole recording, and StreamVerify's end message only once the
caller's own end message arrived: a caller who hangs up has the voice service decide nothing."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from services.common import errors
from services.common.api.v1 import common_pb2, mfa_pb2, voice_pb2
from services.common.stream_end import check_end, hung_up

from ..config import IvrStreamConfig

from ..fusion import FactorOutcome
from ..reasons import Reason
from .base import FactorContext
from .biometric import BiometricFactor, optional, service_reasons


# bytes per sample of the raw encodings a stream may carry
_SAMPLE_BYTES = {common_pb2.AUDIO_ENCODING_MULAW: 1, common_pb2.AUDIO_ENCODING_ALAW: 1,
                 common_pb2.AUDIO_ENCODING_LINEAR16: 2}


class StreamedVoice:
    """VoiceEvidence whose audio arrives in chunks: ``header`` is a VoiceEvidence with the nonce,
    the binding and the audio's format but no audio data (its fields are this object's);
    ``chunks`` yields the audio as the caller speaks, read while the voice service hears it."""

    def __init__(self, header: mfa_pb2.VoiceEvidence, chunks: Iterator[bytes]) -> None:
        self.header, self.chunks = header, chunks

    def __getattr__(self, name: str) -> Any:
        return getattr(self.header, name)


def stream_byte_rate(fmt: common_pb2.AudioFormat) -> int:
    """Bytes per second of a streamed format: raw mono audio at 8 or 16 kHz; refuses anything else."""
    if fmt.encoding not in _SAMPLE_BYTES:
        raise errors.invalid_argument("a voice stream carries raw audio: MULAW, ALAW or LINEAR16",
                                      header__format__encoding="MULAW, ALAW or LINEAR16")
    if fmt.sample_rate_hz not in (8000, 16000) or fmt.channels > 1:
        raise errors.invalid_argument("a voice stream carries mono audio at 8000 or 16000 Hz",
                                      header__format="mono, sample_rate_hz 8000 or 16000")
    return _SAMPLE_BYTES[fmt.encoding] * fmt.sample_rate_hz


def stream_chunks(messages: Iterable, byte_rate: int, cfg: IvrStreamConfig) -> Iterator[bytes]:
    """The audio of a StreamVoiceFactor's messages after the header, within the stream's limits:
    each chunk at most ``max_chunk_s`` of audio and not empty, all of them at most ``max_audio_s``.
    Ends normally only at the caller's end message, once its count matched and the stream closed
    after it; a stream closed without it is a hang-up (CANCELLED STREAM_NOT_ENDED)."""
    max_chunk, max_total = int(byte_rate * cfg.max_chunk_s), int(byte_rate * cfg.max_audio_s)
    total = 0
    stream = iter(messages)
    for n, msg in enumerate(stream, 1):
        if msg.WhichOneof("part") == "end":
            check_end(msg.end, total, stream)
            return
        if msg.WhichOneof("part") != "chunk":
            raise errors.invalid_argument(f"message {n + 1} is not an audio chunk: one header, the chunks, then the end message",
                                          "UNEXPECTED_HEADER", chunk="expected")
        if not 0 < len(msg.chunk) <= max_chunk:
            raise errors.invalid_argument(
                f"chunk {n} has {len(msg.chunk)} bytes: send 1 to {max_chunk} bytes ({cfg.max_chunk_s * 1000:g} ms "
                "of audio) per message", "CHUNK_SIZE", chunk=f"1..{max_chunk} bytes")
        total += len(msg.chunk)
        if total > max_total:
            raise errors.invalid_argument(
                f"the stream carried more than {cfg.max_audio_s:g} s of audio ({max_total} bytes): end the stream "
                "once the digits are spoken", "STREAM_TOO_LONG", chunk=f"at most {max_total} bytes in all")
        yield msg.chunk
    raise hung_up(total)


def held(chunks: Iterable[bytes], byte_rate: int, max_hold_s: float,
         clock: Callable[[], float] = time.monotonic) -> Iterator[bytes]:
    """``chunks`` joined into blocks for the voice service: a block goes on once it holds
    ``max_hold_s`` of audio, or with the first chunk that arrives ``max_hold_s`` or more after the
    block's first one (a caller slower than real time), and at the end of the stream. An error of
    ``chunks`` is raised at once (the held audio is dropped with the stream)."""
    block = byte_rate * max_hold_s
    parts: list[bytes] = []
    size, since = 0, 0.0
    for chunk in chunks:
        if not parts:
            since = clock()
        parts.append(chunk)
        size += len(chunk)
        if size >= block or clock() - since >= max_hold_s:
            yield b"".join(parts)
            parts, size = [], 0
    if parts:
        yield b"".join(parts)


def ended(chunks: Iterable[bytes]) -> Iterator[voice_pb2.StreamVerifyVoiceRequest]:
    """StreamVerify's messages after the header: ``chunks``, then the end message, sent only once
    ``chunks`` ended normally (the caller's own end message arrived); an error of ``chunks`` is
    raised before it, so the voice service never decides on part of an answer."""
    sent = 0
    for chunk in chunks:
        sent += len(chunk)
        yield voice_pb2.StreamVerifyVoiceRequest(chunk=chunk)
    yield voice_pb2.StreamVerifyVoiceRequest(end=voice_pb2.StreamVerifyVoiceRequest.End(audio_bytes=sent))


class VoiceFactor(BiometricFactor):
    name = "voice"
    challenge_rpc = ("voice", "StartVoiceChallenge", voice_pb2.StartVoiceChallengeRequest, "digits")

    def validate_capture(self, ctx: FactorContext, ev: mfa_pb2.VoiceEvidence | StreamedVoice) -> None:
        if isinstance(ev, StreamedVoice):
            if ev.binding.WhichOneof("proof") != "terminal":  # a signature covers the whole recording's digest
                raise errors.invalid_argument("a streamed voice capture is bound by the terminal that streams it "
                                              "(binding.terminal); send a signed capture with SubmitFactor",
                                              header__binding="terminal")
        elif not ev.audio.data:
            raise errors.invalid_argument("voice.audio is required", voice__audio="required")
        if ev.challenge_nonce and ev.challenge_nonce not in ctx.state.challenges.get("voice", []):
            raise errors.failed_precondition("voice.challenge_nonce was not issued to this session",
                                             "CHALLENGE_NOT_IN_SESSION")
        if not ev.challenge_nonce and ctx.policy.voice_challenge(ctx.state.action, ctx.state.channel):
            raise errors.failed_precondition(
                "the voice factor needs the digit challenge: call StartBiometricChallenge (modality voice) "
                "and send the recording of the digits with its challenge_nonce", "CHALLENGE_REQUIRED")

    def check(self, ctx: FactorContext, ev: mfa_pb2.VoiceEvidence | StreamedVoice) -> FactorOutcome:
        cfg = ctx.policy.factors.voice
        callback = ctx.state.callback_channel == "ivr" and ev.binding.WhichOneof("proof") == "terminal"
        telephone = ctx.state.channel == "ivr" or callback
        channel = voice_pb2.VOICE_CHANNEL_TELEPHONE if telephone else voice_pb2.VOICE_CHANNEL_UNSPECIFIED
        subject = common_pb2.SubjectRef(tenant_id=ctx.tenant, subject_id=ctx.subject)
        if isinstance(ev, StreamedVoice):
            header = voice_pb2.StreamVerifyVoiceRequest(header=voice_pb2.StreamVerifyVoiceRequest.Header(
                subject=subject, format=ev.audio.format, channel=channel, challenge_nonce=ev.challenge_nonce))
            r = ctx.clients["voice"].stream("StreamVerify", header, ended(ev.chunks), budget_s=ctx.budget_s)
            ctx.notes["audit"] = {"via": "stream"}
        else:
            r = ctx.clients["voice"].call("Verify", voice_pb2.VerifyVoiceRequest(
                subject=subject, audio=ev.audio, channel=channel, challenge_nonce=ev.challenge_nonce),
                idempotent=not ev.challenge_nonce, budget_s=ctx.budget_s)  # a nonce is single use
        reasons = service_reasons(r.reasons)
        if r.HasField("quality") and not r.quality.accepted:
            reasons = service_reasons(r.quality.issues) + reasons
            reasons.insert(0, Reason("CAPTURE_REJECTED", "the recording is not usable; record again"))
            return self.outcome(cfg, False, 0.0, False, False, reasons, capture_error=True)
        veto = False
        if not r.spoof_passed:  # a layer that ran (synthetic speech, replay) refused the audio
            veto = True
            reasons.insert(0, Reason("SPOOF_DETECTED", "synthetic or replayed speech suspected"))
        if ev.challenge_nonce and not (r.challenge_checked and r.challenge_passed):
            veto = True
            reasons.insert(0, Reason("CHALLENGE_FAILED", "the spoken digits do not answer the challenge"))
        passed = r.match
        if cfg.require_spoof_check and not r.spoof_checked:
            passed = False
            reasons.insert(0, Reason("SPOOF_NOT_CHECKED", "the policy requires the synthetic-speech check"))
        return self.outcome(cfg, passed, self.evidence(cfg, r, reasons), veto, r.spoof_checked, reasons,
                            target_fmr=r.target_fmr or None, measured_fmr=optional(r, "measured_fmr"),
                            target_apcer=optional(r, "spoof_target_apcer"),
                            measured_apcer=optional(r, "spoof_measured_apcer"))
