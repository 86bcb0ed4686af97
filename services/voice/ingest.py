"""Audio ingest: bytes in any accepted format -> checked mono float32 at 16 kHz.

Accepted: WAV (PCM 8/16/24/32-bit, float, G.711), FLAC, raw LINEAR16 at a declared rate, raw
G.711 mu-law / A-law at 8 kHz. Size and duration limits are checked from the byte count and the
container header before anything is decoded, so a request declaring two hours never allocates them;
a container is then decoded block by block and mixed down to mono as it goes, so memory is the
mono result whatever the channel count (92 KB of FLAC hold 59 s of 8-channel 192 kHz silence: 362
MB as one float32 array). Messages name what is wrong, never the decoder library's own text (which
goes to the debug log).

Conditioning is causal and stateful (:class:`Conditioner`): a DC-blocking high-pass filter, then
soxr's HQ resampler to 16 kHz. Feeding a clip whole or in 20 ms chunks gives bit-identical output,
which is what lets the IVR stream reach exactly the decision of a unary call on the same audio.

Every refusal is an :class:`AudioError` with a machine-readable :class:`ErrorCode`; its ``status``
is the gRPC status of the code in the reason catalogue (services/common/modality/reasons.py).
"""

from __future__ import annotations

import io
import logging
import math
import struct
from dataclasses import dataclass
from enum import Enum

import numpy as np
import soundfile as sf
import soxr
from numpy.typing import NDArray
from scipy.signal import lfilter

from services.common.modality.reasons import entry

from . import g711
from .config import ChannelFamily

log = logging.getLogger("biogate.voice.ingest")

TARGET_RATE = 16000
MIN_RATE, MAX_RATE = 8000, 192000
TELEPHONE_MAX_RATE = 8000  # sources at or below this rate are the telephone channel family

FloatArray = NDArray[np.float32]


class ErrorCode(str, Enum):
    """Why audio was refused. INVALID_ARGUMENT: the request is wrong; FAILED_PRECONDITION: the
    audio is well-formed but not usable speech (the catalogue says which)."""

    EMPTY_AUDIO = "EMPTY_AUDIO"
    TOO_SHORT = "TOO_SHORT"
    TOO_LONG = "TOO_LONG"
    TOO_LARGE = "TOO_LARGE"
    UNSUPPORTED_FORMAT = "UNSUPPORTED_FORMAT"
    MALFORMED_AUDIO = "MALFORMED_AUDIO"
    BAD_SAMPLE_RATE = "BAD_SAMPLE_RATE"
    NON_FINITE = "NON_FINITE"
    SILENCE = "SILENCE"
    CLIPPING = "CLIPPING"
    NO_SPEECH = "NO_SPEECH"
    LOW_NET_SPEECH = "LOW_NET_SPEECH"

    @property
    def status(self) -> str:
        status = entry(self.value).status
        if status is None:
            raise LookupError(f"{self.value} is catalogued as a reason only, never a refusal")
        return status.name


class AudioError(ValueError):
    """Audio refused. ``details`` are machine-readable facts (e.g. ``net_speech_s``), never samples."""

    def __init__(self, code: ErrorCode, message: str, **details: float | int | str) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message
        self.details = details

    @property
    def status(self) -> str:
        return self.code.status


class Encoding(str, Enum):
    AUTO = "AUTO"  # detect the container (WAV, FLAC) from the bytes
    WAV = "WAV"
    FLAC = "FLAC"
    LINEAR16 = "LINEAR16"  # raw little-endian signed 16-bit PCM
    MULAW = "MULAW"  # raw G.711 mu-law, 8 kHz
    ALAW = "ALAW"  # raw G.711 A-law, 8 kHz

    @property
    def raw(self) -> bool:
        return self in (Encoding.LINEAR16, Encoding.MULAW, Encoding.ALAW)


@dataclass(frozen=True)
class AudioFormat:
    encoding: Encoding = Encoding.AUTO
    sample_rate_hz: int = 0  # required for LINEAR16; 0 or 8000 for G.711; checked against a container's header
    channels: int = 1  # raw encodings only (interleaved)


@dataclass(frozen=True)
class IngestLimits:
    max_bytes: int = 16 * 1024 * 1024
    max_duration_s: float = 60.0
    min_duration_s: float = 0.5
    silence_dbfs: float = -60.0  # RMS below this (after DC removal) is silence
    max_clipped_fraction: float = 0.05  # refuse above; flag CLIPPING above 0.1 %
    dc_offset_flag: float = 0.01  # |mean| above this is reported as DC_OFFSET (it is removed anyway)
    dtmf_max_fraction: float = 0.5  # refuse when this share of active frames are DTMF tones


@dataclass(frozen=True)
class Decoded:
    samples: FloatArray  # mono, native rate, full scale +-1
    sample_rate: int
    full_scale: float  # the largest magnitude the encoding can carry (G.711 < 1)


@dataclass(frozen=True)
class Quality:
    duration_s: float
    rms_dbfs: float
    peak: float
    dc_offset: float
    clipped_fraction: float
    issues: tuple[str, ...]  # CLIPPING, DC_OFFSET: flagged but accepted


@dataclass(frozen=True)
class IngestedAudio:
    samples: FloatArray  # mono float32 at 16 kHz, DC removed
    source_rate: int
    quality: Quality

    @property
    def channel(self) -> ChannelFamily:
        return "telephone" if self.source_rate <= TELEPHONE_MAX_RATE else "wideband"

    @property
    def duration_s(self) -> float:
        return self.quality.duration_s


# ---------------------------------------------------------------------------------------------
# Decoding

_WAV_SUBTYPES = {"PCM_U8", "PCM_S8", "PCM_16", "PCM_24", "PCM_32", "FLOAT", "DOUBLE", "ULAW", "ALAW"}
_FLAC_SUBTYPES = {"PCM_S8", "PCM_16", "PCM_24"}
_NOT_AUDIO = (  # magic numbers of things sometimes sent by mistake
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"\x89PNG", "a PNG image"),
    (b"GIF8", "a GIF image"),
    (b"%PDF", "a PDF document"),
    (b"PK\x03\x04", "a ZIP archive"),
    (b"ID3", "MP3 audio"),
    (b"OggS", "Ogg audio"),
)
_G711_FULL_SCALE = {
    Encoding.MULAW: float(g711.ULAW_TO_LINEAR.max()) / 32768.0,
    Encoding.ALAW: float(g711.ALAW_TO_LINEAR.max()) / 32768.0,
}


def sniff(data: bytes) -> Encoding | None:
    if len(data) >= 12 and data[:4] in (b"RIFF", b"RF64") and data[8:12] == b"WAVE":
        return Encoding.WAV
    if data[:4] == b"fLaC":
        return Encoding.FLAC
    return None


def _refuse_non_audio(data: bytes) -> None:
    for magic, what in _NOT_AUDIO:
        if data.startswith(magic):
            raise AudioError(ErrorCode.UNSUPPORTED_FORMAT, f"the data looks like {what}, not WAV, FLAC or raw PCM/G.711")


def _check_size(data: bytes, limits: IngestLimits) -> None:
    if not data:
        raise AudioError(ErrorCode.EMPTY_AUDIO, "no audio data")
    if len(data) > limits.max_bytes:
        raise AudioError(ErrorCode.TOO_LARGE, f"{len(data)} bytes exceed the limit of {limits.max_bytes}",
                         bytes=len(data), max_bytes=limits.max_bytes)


def _check_duration(frames: int, rate: int, limits: IngestLimits, declared: bool = False) -> None:
    duration = frames / rate
    if duration > limits.max_duration_s:
        what = "the header declares" if declared else "the audio lasts"
        raise AudioError(ErrorCode.TOO_LONG, f"{what} {duration:.1f} s, over the limit of {limits.max_duration_s:g} s",
                         duration_s=round(duration, 3), max_duration_s=limits.max_duration_s)
    if frames == 0:
        raise AudioError(ErrorCode.EMPTY_AUDIO, "the audio holds no samples")
    if duration < limits.min_duration_s:
        raise AudioError(ErrorCode.TOO_SHORT, f"{duration * 1000:.0f} ms of audio, under the minimum of {limits.min_duration_s:g} s",
                         duration_s=round(duration, 4), min_duration_s=limits.min_duration_s)


def _check_rate(rate: int) -> None:
    if not MIN_RATE <= rate <= MAX_RATE:
        raise AudioError(ErrorCode.BAD_SAMPLE_RATE, f"sample rate {rate} Hz is outside {MIN_RATE}-{MAX_RATE} Hz",
                         sample_rate_hz=rate)


def wav_declared_frames(data: bytes) -> int | None:
    """Frames the RIFF header's data chunk claims (libsndfile reports only what is present)."""
    pos, block_align, limit = 12, 0, min(len(data), 1 << 20)
    while pos + 8 <= limit:
        cid, size = data[pos : pos + 4], struct.unpack_from("<I", data, pos + 4)[0]
        if cid == b"fmt " and pos + 22 <= len(data):
            block_align = struct.unpack_from("<H", data, pos + 20)[0]
        elif cid == b"data":
            if not block_align or size == 0xFFFFFFFF:  # RF64 / streaming writers leave it unset
                return None
            return size // block_align
        pos += 8 + size + (size & 1)
    return None


def decode(data: bytes, fmt: AudioFormat = AudioFormat(), limits: IngestLimits = IngestLimits()) -> Decoded:
    """Decode to mono float32 at the native rate, enforcing the limits before decoding."""
    _check_size(data, limits)
    encoding = fmt.encoding
    if encoding is Encoding.AUTO:
        encoding = sniff(data) or _unknown_container(data)
    elif not encoding.raw and sniff(data) is not encoding:
        _refuse_non_audio(data)
        raise AudioError(ErrorCode.UNSUPPORTED_FORMAT, f"declared {encoding.value} but the data is not a {encoding.value} stream")
    if encoding.raw:
        return _decode_raw(data, fmt, encoding, limits)
    return _decode_container(data, fmt, encoding, limits)


def _unknown_container(data: bytes) -> Encoding:
    _refuse_non_audio(data)
    raise AudioError(ErrorCode.UNSUPPORTED_FORMAT, "not a WAV or FLAC file; raw audio needs a declared encoding")


def _decode_container(data: bytes, fmt: AudioFormat, encoding: Encoding, limits: IngestLimits) -> Decoded:
    try:
        info = sf.info(io.BytesIO(data))
    except (RuntimeError, sf.LibsndfileError) as exc:
        log.debug("audio header refused", extra={"encoding": encoding.value, "error": str(exc)})
        raise AudioError(ErrorCode.MALFORMED_AUDIO, f"the {encoding.value} header cannot be read (damaged, cut off "
                                                    "or another format)") from None
    allowed = _WAV_SUBTYPES if encoding is Encoding.WAV else _FLAC_SUBTYPES
    if info.subtype not in allowed:
        raise AudioError(ErrorCode.UNSUPPORTED_FORMAT, f"{encoding.value} sample format {info.subtype} is not accepted")
    _check_rate(info.samplerate)
    if fmt.sample_rate_hz and fmt.sample_rate_hz != info.samplerate:
        raise AudioError(ErrorCode.BAD_SAMPLE_RATE,
                         f"declared {fmt.sample_rate_hz} Hz but the {encoding.value} header says {info.samplerate} Hz",
                         declared_hz=fmt.sample_rate_hz, header_hz=info.samplerate)
    declared = wav_declared_frames(data) if encoding is Encoding.WAV else None
    if declared is not None:
        _check_duration(max(declared, info.frames), info.samplerate, limits, declared=True)
    _check_duration(info.frames, info.samplerate, limits)
    try:
        x = _read_mono(data, int(limits.max_duration_s * info.samplerate) + 1)
    except (RuntimeError, sf.LibsndfileError) as exc:
        log.debug("audio data refused", extra={"encoding": encoding.value, "error": str(exc)})
        raise AudioError(ErrorCode.MALFORMED_AUDIO, f"the {encoding.value} audio data cannot be decoded "
                                                    "(damaged or cut off)") from None
    _check_duration(len(x), info.samplerate, limits)
    full_scale = {"ULAW": _G711_FULL_SCALE[Encoding.MULAW], "ALAW": _G711_FULL_SCALE[Encoding.ALAW]}.get(info.subtype, 1.0)
    return Decoded(x, info.samplerate, full_scale)


_BLOCK_FRAMES = 65536


def _read_mono(data: bytes, max_frames: int) -> FloatArray:
    """At most ``max_frames`` frames, decoded a block at a time and mixed to mono into one array."""
    with sf.SoundFile(io.BytesIO(data)) as fh:
        out = np.empty(min(max_frames, fh.frames), np.float32)
        at = 0
        for block in fh.blocks(_BLOCK_FRAMES, dtype="float32", always_2d=True, frames=len(out)):
            out[at : at + len(block)] = _mono(block)
            at += len(block)
    return out[:at]


def _mono(x: np.ndarray) -> FloatArray:
    return np.ascontiguousarray(x.mean(axis=1) if x.shape[1] > 1 else x[:, 0], dtype=np.float32)


class RawDecoder:
    """Decodes raw LINEAR16 / G.711 bytes, whole or in chunks of any size (partial frames carried)."""

    def __init__(self, fmt: AudioFormat) -> None:
        if not fmt.encoding.raw:
            raise AudioError(ErrorCode.UNSUPPORTED_FORMAT, f"{fmt.encoding.value} is not a raw encoding")
        if not 1 <= fmt.channels <= 8:
            raise AudioError(ErrorCode.UNSUPPORTED_FORMAT, f"{fmt.channels} channels", channels=fmt.channels)
        if fmt.encoding is Encoding.LINEAR16:
            if not fmt.sample_rate_hz:
                raise AudioError(ErrorCode.BAD_SAMPLE_RATE, "LINEAR16 needs a declared sample rate")
            _check_rate(fmt.sample_rate_hz)
            self.sample_rate, self.sample_bytes, self.full_scale = fmt.sample_rate_hz, 2, 1.0
        else:
            if fmt.sample_rate_hz not in (0, 8000):
                raise AudioError(ErrorCode.BAD_SAMPLE_RATE, f"G.711 is 8000 Hz, not {fmt.sample_rate_hz} Hz",
                                 sample_rate_hz=fmt.sample_rate_hz)
            self.sample_rate, self.sample_bytes = 8000, 1
            self.full_scale = _G711_FULL_SCALE[fmt.encoding]
        self.encoding, self.channels = fmt.encoding, fmt.channels
        self.frame_bytes = self.sample_bytes * self.channels
        self._pending = b""

    def frames_in(self, n_bytes: int) -> int:
        return n_bytes // self.frame_bytes

    def decode(self, chunk: bytes) -> FloatArray:
        data = self._pending + bytes(chunk)
        usable = len(data) - len(data) % self.frame_bytes
        self._pending = data[usable:]
        return self._convert(data[:usable])

    def finish(self) -> None:
        if self._pending:
            raise AudioError(ErrorCode.MALFORMED_AUDIO,
                             f"{len(self._pending)} trailing byte(s): the length is not a whole number of "
                             f"{self.encoding.value} frames ({self.frame_bytes} bytes); wrong encoding or channel count?")

    def _convert(self, data: bytes) -> FloatArray:
        if self.encoding is Encoding.LINEAR16:
            pcm = np.frombuffer(data, dtype="<i2")
        elif self.encoding is Encoding.MULAW:
            pcm = g711.ulaw_decode(data)
        else:
            pcm = g711.alaw_decode(data)
        x = pcm.astype(np.float32) / 32768.0
        return _mono(x.reshape(-1, self.channels))


def _decode_raw(data: bytes, fmt: AudioFormat, encoding: Encoding, limits: IngestLimits) -> Decoded:
    _refuse_non_audio(data)
    dec = RawDecoder(AudioFormat(encoding, fmt.sample_rate_hz, fmt.channels))
    _check_duration(dec.frames_in(len(data)), dec.sample_rate, limits)
    samples = dec.decode(data)
    dec.finish()
    return Decoded(samples, dec.sample_rate, dec.full_scale)


# ---------------------------------------------------------------------------------------------
# Conditioning and quality


class Conditioner:
    """Causal conditioning of a native-rate stream: DC blocker, then soxr HQ resampling to 16 kHz.

    Keeps running statistics for the quality report. ``push`` returns the 16 kHz samples available
    so far; ``finish`` flushes the resampler.
    """

    DC_CUTOFF_HZ = 10.0

    def __init__(self, sample_rate: int, full_scale: float = 1.0, limits: IngestLimits = IngestLimits()) -> None:
        _check_rate(sample_rate)
        self.sample_rate, self.full_scale, self.limits = sample_rate, full_scale, limits
        r = math.exp(-2.0 * math.pi * self.DC_CUTOFF_HZ / sample_rate)
        self._b, self._a = np.array([1.0, -1.0]), np.array([1.0, -r])
        self._zi = np.zeros(1)
        self._resampler = (
            None if sample_rate == TARGET_RATE
            else soxr.ResampleStream(sample_rate, TARGET_RATE, 1, dtype="float32", quality="HQ")
        )
        self.frames = 0
        self._sum = self._sumsq = 0.0
        self._peak = 0.0
        self._clipped = 0

    @property
    def duration_s(self) -> float:
        return self.frames / self.sample_rate

    def push(self, x: FloatArray) -> FloatArray:
        if x.size == 0:
            return np.zeros(0, np.float32)
        if not np.all(np.isfinite(x)):
            raise AudioError(ErrorCode.NON_FINITE, "the audio contains NaN or infinite samples",
                             at_s=round((self.frames + int(np.argmin(np.isfinite(x)))) / self.sample_rate, 3))
        if self.frames + x.size > self.limits.max_duration_s * self.sample_rate:
            raise AudioError(ErrorCode.TOO_LONG, f"the audio exceeds the limit of {self.limits.max_duration_s:g} s",
                             max_duration_s=self.limits.max_duration_s)
        x64 = x.astype(np.float64)
        self.frames += x.size
        self._sum += float(x64.sum())
        a = np.abs(x64)
        self._peak = max(self._peak, float(a.max()))
        self._clipped += int(np.count_nonzero(a >= self.full_scale * 0.999))
        y, self._zi = lfilter(self._b, self._a, x64, zi=self._zi)
        self._sumsq += float(np.dot(y, y))
        y = y.astype(np.float32)
        return y if self._resampler is None else self._resampler.resample_chunk(y)

    def finish(self) -> FloatArray:
        if self._resampler is None:
            return np.zeros(0, np.float32)
        return self._resampler.resample_chunk(np.zeros(0, np.float32), last=True)

    def quality(self) -> Quality:
        n = max(self.frames, 1)
        rms = math.sqrt(self._sumsq / n)
        dc = self._sum / n
        clipped = self._clipped / n
        issues = []
        if clipped > 0.001:
            issues.append("CLIPPING")
        if abs(dc) > self.limits.dc_offset_flag:
            issues.append("DC_OFFSET")
        return Quality(
            duration_s=self.frames / self.sample_rate,
            rms_dbfs=20 * math.log10(rms) if rms > 0 else -math.inf,
            peak=self._peak,
            dc_offset=dc,
            clipped_fraction=clipped,
            issues=tuple(issues),
        )

    def check(self, samples16k: FloatArray) -> Quality:
        """Refuse what is too short, silent, clipped or only DTMF; return the quality report."""
        limits, q = self.limits, self.quality()
        _check_duration(self.frames, self.sample_rate, limits)
        if q.rms_dbfs < limits.silence_dbfs:
            raise AudioError(ErrorCode.SILENCE, f"the audio is silent ({q.rms_dbfs:.1f} dBFS RMS)",
                             rms_dbfs=round(q.rms_dbfs, 1) if math.isfinite(q.rms_dbfs) else -999.0)
        if q.clipped_fraction > limits.max_clipped_fraction:
            raise AudioError(ErrorCode.CLIPPING, f"{q.clipped_fraction:.1%} of the samples are clipped",
                             clipped_fraction=round(q.clipped_fraction, 4))
        tones = dtmf_fraction(samples16k, limits.silence_dbfs)
        if tones >= limits.dtmf_max_fraction:
            raise AudioError(ErrorCode.NO_SPEECH, f"the audio is DTMF key tones ({tones:.0%} of active frames), not speech",
                             dtmf_fraction=round(tones, 3))
        return q


def ingest(data: bytes, fmt: AudioFormat = AudioFormat(), limits: IngestLimits = IngestLimits()) -> IngestedAudio:
    """Decode, check and condition a whole clip."""
    decoded = decode(data, fmt, limits)
    return condition(decoded.samples, decoded.sample_rate, decoded.full_scale, limits)


def condition(samples: FloatArray, sample_rate: int, full_scale: float = 1.0,
              limits: IngestLimits = IngestLimits()) -> IngestedAudio:
    """Check and condition already-decoded mono float audio (e.g. read by the evaluation)."""
    cond = Conditioner(sample_rate, full_scale, limits)
    _check_duration(len(samples), sample_rate, limits)
    y = np.concatenate([cond.push(np.asarray(samples, dtype=np.float32)), cond.finish()])
    return IngestedAudio(y, sample_rate, cond.check(y))


# ---------------------------------------------------------------------------------------------
# DTMF

DTMF_LOW = (697.0, 770.0, 852.0, 941.0)
DTMF_HIGH = (1209.0, 1336.0, 1477.0, 1633.0)
_DTMF_FRAME = 512  # 32 ms at 16 kHz: resolves the 73 Hz spacing of the low group


def dtmf_fraction(x: FloatArray, silence_dbfs: float = -60.0, min_tone_share: float = 0.8) -> float:
    """Share of the active 32 ms frames whose energy is one low plus one high DTMF tone."""
    n = len(x) // _DTMF_FRAME
    if n == 0:
        return 0.0
    frames = x[: n * _DTMF_FRAME].reshape(n, _DTMF_FRAME).astype(np.float64)
    active = np.sqrt((frames**2).mean(axis=1)) > 10 ** ((silence_dbfs + 10) / 20)
    if not active.any():
        return 0.0
    spec = np.abs(np.fft.rfft(frames[active] * np.hanning(_DTMF_FRAME), axis=1)) ** 2
    freqs = np.fft.rfftfreq(_DTMF_FRAME, 1.0 / TARGET_RATE)
    total = spec.sum(axis=1) + 1e-20

    def best(group: tuple[float, ...]) -> np.ndarray:
        bands = [spec[:, np.abs(freqs - f) <= 2.5 * TARGET_RATE / _DTMF_FRAME].sum(axis=1) for f in group]
        return np.max(bands, axis=0)

    share = (best(DTMF_LOW) + best(DTMF_HIGH)) / total
    return float(np.mean(share >= min_tone_share))
