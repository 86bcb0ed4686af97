"""The voice pipeline the VoiceService calls: ingest -> VAD (net speech check) -> ECAPA embedding.

Unary (:meth:`VoicePipeline.analyse`) and streamed (:meth:`VoicePipeline.stream`) audio go through
the same causal stages (decoder, conditioner, VAD stream), so a stream fed in 20 ms chunks yields
exactly the embedding of a unary call on the same bytes. For micro-batching across requests, call
:meth:`prepare` per request and :meth:`embed` on a batch of prepared clips.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Sequence

import numpy as np
from numpy.typing import NDArray

from .config import ChannelFamily
from .ecapa import SpeakerEmbedder
from .ingest import (
    AudioError,
    AudioFormat,
    Conditioner,
    ErrorCode,
    IngestedAudio,
    IngestLimits,
    Quality,
    RawDecoder,
    decode,
)
from .vad import SileroVad, VadResult, VadStream

Purpose = Literal["enroll", "verify"]
FloatArray = NDArray[np.float32]


@dataclass(frozen=True)
class VoicePipelineConfig:
    """The pipeline's settings; the models themselves come built (services/voice/models.py)."""

    providers: tuple[str, ...] = ("CUDAExecutionProvider", "CPUExecutionProvider")
    threads: int | None = 1  # intra-op threads per worker (torch and ONNX Runtime); None: their default
    # Net speech = Silero segments without padding (pauses over 100 ms excluded): about 70 % of
    # the duration of read speech.
    min_net_speech_enroll_s: float = 1.0  # per utterance
    min_net_speech_verify_s: float = 1.0
    stream_target_net_speech_s: float = 3.0  # an IVR stream is decided once this much has arrived
    max_duration_s: float = 60.0
    min_duration_s: float = 0.5
    max_bytes: int = 16 * 1024 * 1024
    silence_dbfs: float = -60.0
    max_clipped_fraction: float = 0.05
    vad_threshold: float = 0.5
    max_batch: int = 64
    max_pad_ratio: float = 0.0  # see EcapaOnnx: > 0 pads clips of unequal length into one batch
    # Longer clips are embedded in equal segments of at most this length and the embeddings
    # averaged: ONNX Runtime keeps ~15 MB of activations per second of audio (60 s: +0.9 GB).
    max_embed_s: float = 20.0
    max_batch_audio_s: float = 40.0  # audio per ECAPA call (bounds activations; raise on a GPU)
    device_features: bool | None = None  # see EcapaOnnx (None: on CUDA)
    io_binding: bool | None = None
    frame_buckets: bool = False

    @property
    def limits(self) -> IngestLimits:
        return IngestLimits(max_bytes=self.max_bytes, max_duration_s=self.max_duration_s,
                            min_duration_s=self.min_duration_s, silence_dbfs=self.silence_dbfs,
                            max_clipped_fraction=self.max_clipped_fraction)

    def min_net_speech(self, purpose: Purpose) -> float:
        return self.min_net_speech_enroll_s if purpose == "enroll" else self.min_net_speech_verify_s


@dataclass(frozen=True)
class PreparedAudio:
    """A clip that passed every check: the conditioned 16 kHz audio and its speech segments."""

    audio: IngestedAudio
    vad: VadResult

    @property
    def samples(self) -> FloatArray:
        return self.audio.samples

    @property
    def quality(self) -> Quality:
        return self.audio.quality

    @property
    def channel(self) -> ChannelFamily:
        return self.audio.channel

    @property
    def net_speech_s(self) -> float:
        return self.vad.speech_s


@dataclass(frozen=True)
class VoiceSample:
    embedding: FloatArray  # L2-normalised, 192-d
    prepared: PreparedAudio = field(repr=False)

    @property
    def net_speech_s(self) -> float:
        return self.prepared.net_speech_s

    @property
    def channel(self) -> str:
        return self.prepared.channel


class _Chain:
    """Conditioner -> VAD stream, collecting the conditioned audio."""

    def __init__(self, pipeline: VoicePipeline, sample_rate: int, full_scale: float, purpose: Purpose) -> None:
        self.pipeline, self.purpose = pipeline, purpose
        self.cond = Conditioner(sample_rate, full_scale, pipeline.config.limits)
        self.vad: VadStream = pipeline.vad.stream()
        self.parts: list[FloatArray] = []

    def push(self, x: FloatArray) -> None:
        y = self.cond.push(x)
        self.vad.push(y)
        self.parts.append(y)

    def finish(self) -> PreparedAudio:
        tail = self.cond.finish()
        self.vad.push(tail)
        self.parts.append(tail)
        samples = np.concatenate(self.parts)
        quality = self.cond.check(samples)
        vad = self.vad.finish()
        need = self.pipeline.config.min_net_speech(self.purpose)
        if vad.speech_s <= 0.0:
            raise AudioError(ErrorCode.NO_SPEECH, "no speech detected", net_speech_s=0.0, min_net_speech_s=need)
        if vad.speech_s < need:
            raise AudioError(ErrorCode.LOW_NET_SPEECH,
                             f"{vad.speech_s:.2f} s of net speech, {need:g} s needed to {self.purpose}",
                             net_speech_s=round(vad.speech_s, 2), min_net_speech_s=need)
        return PreparedAudio(IngestedAudio(samples, self.cond.sample_rate, quality), vad)


class VoicePipeline:
    def __init__(self, config: VoicePipelineConfig, vad: SileroVad, embedder: SpeakerEmbedder) -> None:
        self.config = config
        self.vad = vad
        self.embedder = embedder

    @property
    def provider(self) -> str:
        return self.embedder.provider

    def prepare(self, data: bytes, fmt: AudioFormat = AudioFormat(), purpose: Purpose = "verify") -> PreparedAudio:
        """Decode and check one clip (raises :class:`AudioError`); no embedding yet."""
        decoded = decode(data, fmt, self.config.limits)
        return self.prepare_samples(decoded.samples, decoded.sample_rate, purpose, decoded.full_scale)

    def prepare_samples(self, samples: FloatArray, sample_rate: int, purpose: Purpose = "verify",
                        full_scale: float = 1.0) -> PreparedAudio:
        chain = _Chain(self, sample_rate, full_scale, purpose)
        chain.push(np.asarray(samples, dtype=np.float32))
        return chain.finish()

    def embed(self, prepared: Sequence[PreparedAudio]) -> FloatArray:
        """L2-normalised embeddings [N, 192] of prepared clips (one batched call)."""
        if not prepared:
            return np.zeros((0, self.embedder.dim), np.float32)
        limit = max(1, int(self.config.max_embed_s * 16000))
        pieces, owner = [], []
        for i, p in enumerate(prepared):
            n = max(1, math.ceil(len(p.samples) / limit))
            pieces += np.array_split(p.samples, n)
            owner += [i] * n
        e: np.ndarray = np.zeros((len(pieces), self.embedder.dim), np.float32)
        budget = max(limit, int(self.config.max_batch_audio_s * 16000))
        call: list[int] = []
        for i in sorted(range(len(pieces)), key=lambda k: len(pieces[k])) + [-1]:
            if i < 0 or (call and sum(len(pieces[k]) for k in call) + len(pieces[i]) > budget):
                e[call] = self.embedder.embed_batch([pieces[k] for k in call])
                call = []
            if i >= 0:
                call.append(i)
        if len(pieces) > len(prepared):  # length-weighted mean of each clip's segment embeddings
            weights = np.array([len(x) for x in pieces], np.float64)[:, None]
            sums = np.zeros((len(prepared), e.shape[1]))
            np.add.at(sums, np.array(owner), e * weights)
            e = sums
        return (e / np.linalg.norm(e, axis=1, keepdims=True)).astype(np.float32)

    def analyse(self, data: bytes, fmt: AudioFormat = AudioFormat(), purpose: Purpose = "verify") -> VoiceSample:
        prepared = self.prepare(data, fmt, purpose)
        return VoiceSample(self.embed([prepared])[0], prepared)

    def stream(self, fmt: AudioFormat, purpose: Purpose = "verify") -> VoiceStream:
        return VoiceStream(self, fmt, purpose)

    def warmup(self) -> None:
        """Run every model once so that the first request does not pay for lazy initialisation."""
        t = np.arange(3 * 16000, dtype=np.float32) / 16000  # a typical 3 s verification clip
        x = (0.1 * np.sin(2 * math.pi * 220 * t)).astype(np.float32)
        self.vad(x)
        self.embedder.warmup(x)


class VoiceStream:
    """IVR accumulator: feed raw LINEAR16 / G.711 chunks (any size; 20-100 ms typical).

    ``feed`` returns True once ``stream_target_net_speech_s`` of net speech has arrived; then (or at
    the end of the stream) ``finish`` checks the audio received so far and ``sample`` embeds it.
    """

    def __init__(self, pipeline: VoicePipeline, fmt: AudioFormat, purpose: Purpose = "verify") -> None:
        self.pipeline = pipeline
        self._decoder = RawDecoder(fmt)
        self._chain = _Chain(pipeline, self._decoder.sample_rate, self._decoder.full_scale, purpose)
        self._finished: PreparedAudio | None = None

    @property
    def net_speech_s(self) -> float:
        return self._chain.vad.speech_s

    @property
    def duration_s(self) -> float:
        return self._chain.cond.duration_s

    @property
    def ready(self) -> bool:
        return self.net_speech_s >= self.pipeline.config.stream_target_net_speech_s

    def feed(self, chunk: bytes) -> bool:
        if self._finished is not None:
            raise RuntimeError("the stream is finished")
        self._chain.push(self._decoder.decode(chunk))
        return self.ready

    def finish(self) -> PreparedAudio:
        if self._finished is None:
            self._decoder.finish()
            self._finished = self._chain.finish()
        return self._finished

    def sample(self) -> VoiceSample:
        prepared = self.finish()
        return VoiceSample(self.pipeline.embed([prepared])[0], prepared)
