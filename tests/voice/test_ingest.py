import io
import struct
import tracemalloc

import cv2
import numpy as np
import pytest
import soundfile as sf
import soxr

from services.voice import g711
from services.voice.ingest import (
    AudioError,
    AudioFormat,
    Conditioner,
    Encoding,
    ErrorCode,
    IngestLimits,
    RawDecoder,
    decode,
    dtmf_fraction,
    ingest,
)
from voice_audio import read, tone, wav_bytes

# A speech-like test signal: a harmonic tone with a slow amplitude envelope.
RATE = 16000
SIGNAL = (tone([150, 300, 450, 900], 2.0) * (0.6 + 0.4 * np.sin(np.linspace(0, 8, 32000)))).astype(np.float32) * 0.5


def refused(code: ErrorCode, data: bytes, fmt: AudioFormat = AudioFormat(), limits: IngestLimits = IngestLimits()):
    with pytest.raises(AudioError) as info:
        ingest(data, fmt, limits)
    assert info.value.code is code, info.value
    return info.value


# ----------------------------------------------------------------------------- formats


@pytest.mark.parametrize("subtype,tol", [("PCM_16", 1 / 32768), ("PCM_24", 1e-6), ("PCM_32", 1e-8), ("FLOAT", 0.0), ("DOUBLE", 1e-7)])
def test_wav_subtypes_round_trip(subtype, tol):
    d = decode(wav_bytes(SIGNAL, RATE, subtype))
    assert d.sample_rate == RATE and d.samples.dtype == np.float32
    assert np.max(np.abs(d.samples - SIGNAL)) <= tol + 1e-7


def test_flac_round_trip():
    d = decode(wav_bytes(SIGNAL, RATE, "PCM_16", fmt="FLAC"))
    assert np.max(np.abs(d.samples - SIGNAL)) <= 1 / 32768


def test_declared_container_must_match_the_bytes():
    flac = wav_bytes(SIGNAL, RATE, "PCM_16", fmt="FLAC")
    assert decode(flac, AudioFormat(Encoding.FLAC)).sample_rate == RATE
    with pytest.raises(AudioError) as info:
        decode(flac, AudioFormat(Encoding.WAV))
    assert info.value.code is ErrorCode.UNSUPPORTED_FORMAT


def test_stereo_is_mixed_down():
    left, right = SIGNAL, -0.5 * SIGNAL
    d = decode(wav_bytes(np.stack([left, right], axis=1), RATE, "FLOAT"))
    assert np.allclose(d.samples, (left + right) / 2, atol=1e-7)
    raw = (np.stack([left, right], axis=1) * 32767).astype("<i2").tobytes()
    d2 = decode(raw, AudioFormat(Encoding.LINEAR16, RATE, channels=2))
    assert np.allclose(d2.samples, (left + right) / 2, atol=2 / 32768)


@pytest.mark.parametrize("rate", [8000, 16000, 44100])
def test_raw_linear16_round_trip_and_resampled_to_16k(rate):
    x = soxr.resample(SIGNAL, RATE, rate).astype(np.float32)
    raw = np.round(x * 32767).astype("<i2").tobytes()
    out = ingest(raw, AudioFormat(Encoding.LINEAR16, rate))
    assert out.source_rate == rate
    assert abs(len(out.samples) - 2.0 * RATE) <= 2
    assert out.channel == ("telephone" if rate == 8000 else "wideband")
    # the partials survive resampling at their frequencies
    spec = np.abs(np.fft.rfft(out.samples[4000:20000]))
    peaks = np.fft.rfftfreq(16000, 1 / RATE)[np.argsort(spec)[-4:]]
    assert sorted(peaks.tolist()) == [150, 300, 450, 900]
    if rate == RATE:  # no resampling: only the 10 Hz DC blocker (a few degrees of phase at 150 Hz)
        assert np.corrcoef(out.samples, x)[0, 1] > 0.999


@pytest.mark.parametrize("encoding,encode", [(Encoding.MULAW, g711.ulaw_encode), (Encoding.ALAW, g711.alaw_encode)])
def test_raw_g711_round_trip(encoding, encode):
    x8 = soxr.resample(SIGNAL, RATE, 8000).astype(np.float32)
    codes = encode(np.round(x8 * 32767)).tobytes()
    d = decode(codes, AudioFormat(encoding))
    assert d.sample_rate == 8000 and len(d.samples) == len(codes)
    snr = 10 * np.log10(np.sum(x8**2) / np.sum((d.samples - x8) ** 2))
    assert snr > 30  # G.711 gives about 38 dB on a full-band signal
    assert ingest(codes, AudioFormat(encoding, 8000)).channel == "telephone"


def test_wav_carrying_g711():
    x8 = soxr.resample(SIGNAL, RATE, 8000).astype(np.float32)
    d = decode(wav_bytes(x8, 8000, "ULAW"))
    assert d.sample_rate == 8000 and np.max(np.abs(d.samples - x8)) < 0.02


def test_raw_decoder_is_chunk_invariant():
    raw = (SIGNAL * 32767).astype("<i2").tobytes()
    whole = RawDecoder(AudioFormat(Encoding.LINEAR16, RATE)).decode(raw)
    dec = RawDecoder(AudioFormat(Encoding.LINEAR16, RATE))
    parts = [dec.decode(raw[i : i + 333]) for i in range(0, len(raw), 333)]  # odd sizes split samples
    dec.finish()
    assert np.array_equal(np.concatenate(parts), whole)


def test_conditioner_is_chunk_invariant():
    x = soxr.resample(SIGNAL, RATE, 8000).astype(np.float32) + 0.05
    one = Conditioner(8000)
    whole = np.concatenate([one.push(x), one.finish()])
    many = Conditioner(8000)
    parts = [many.push(x[i : i + 160]) for i in range(0, len(x), 160)] + [many.finish()]
    assert np.array_equal(np.concatenate(parts), whole)
    q1, q2 = one.quality(), many.quality()
    assert q1.issues == q2.issues == ("DC_OFFSET",)
    assert q1.rms_dbfs == pytest.approx(q2.rms_dbfs, abs=1e-9) and q1.dc_offset == pytest.approx(q2.dc_offset, abs=1e-9)


def test_fixture_speech_passes_with_a_clean_report(voice_dir):
    x = read(voice_dir / "speechbrain_spk1" / "spk1_snt1.wav")
    out = ingest(wav_bytes(x, RATE, "PCM_16"))
    assert out.quality.issues == () and -40 < out.quality.rms_dbfs < -10
    assert dtmf_fraction(out.samples) == 0.0


# ----------------------------------------------------------------------------- quality


def test_dc_offset_is_flagged_and_removed():
    out = ingest(wav_bytes(SIGNAL * 0.5 + 0.2, RATE, "FLOAT"))
    assert "DC_OFFSET" in out.quality.issues and out.quality.dc_offset == pytest.approx(0.2, abs=0.01)
    assert abs(out.samples[4000:].mean()) < 0.005


def test_clipping_flagged_then_refused():
    mild = np.clip(SIGNAL / np.abs(SIGNAL).max() * 1.05, -1, 1)  # 0.9 % of the samples at full scale
    q = ingest(wav_bytes(mild, RATE, "PCM_16")).quality
    assert "CLIPPING" in q.issues and 0.005 < q.clipped_fraction < 0.02
    hard = np.clip(SIGNAL * 8, -1, 1)
    err = refused(ErrorCode.CLIPPING, wav_bytes(hard, RATE, "PCM_16"))
    assert err.status == "FAILED_PRECONDITION" and err.details["clipped_fraction"] > 0.05


# ----------------------------------------------------------------------------- bad inputs


def test_empty():
    err = refused(ErrorCode.EMPTY_AUDIO, b"", AudioFormat(Encoding.LINEAR16, RATE))
    assert err.status == "INVALID_ARGUMENT"
    refused(ErrorCode.EMPTY_AUDIO, wav_bytes(np.zeros(0, np.float32), RATE))


def test_one_millisecond_is_too_short():
    refused(ErrorCode.TOO_SHORT, wav_bytes(SIGNAL[:16], RATE))
    refused(ErrorCode.TOO_SHORT, g711.ulaw_encode(np.zeros(8)).tobytes(), AudioFormat(Encoding.MULAW))


def test_two_hours_declared_in_a_header_is_refused_without_decoding():
    small = wav_bytes(SIGNAL, RATE)
    at = small.find(b"data")
    two_hours = small[: at + 4] + struct.pack("<I", 2 * 3600 * RATE * 2) + small[at + 8 :]
    tracemalloc.start()
    try:
        err = refused(ErrorCode.TOO_LONG, two_hours)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert err.details["duration_s"] == pytest.approx(7200)
    assert peak < 2_000_000  # the 230 MB of two hours were never allocated


def _flac(x: np.ndarray, rate: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, rate, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def test_two_hours_declared_in_a_flac_header_is_refused_without_decoding():
    data = bytearray(_flac(SIGNAL, RATE))
    at = 8 + 10  # STREAMINFO after "fLaC" and its block header: rate, channels, bits, then 36 bits of samples
    packed = int.from_bytes(data[at : at + 8], "big")
    data[at : at + 8] = ((packed & ~((1 << 36) - 1)) | (2 * 3600 * RATE)).to_bytes(8, "big")
    tracemalloc.start()
    try:
        err = refused(ErrorCode.TOO_LONG, bytes(data))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert err.details["duration_s"] == pytest.approx(7200)
    assert peak < 2_000_000


def test_a_many_channel_flac_is_decoded_in_the_memory_of_its_mono_result():
    """92 KB of FLAC: 59 s of 8-channel 192 kHz silence, 362 MB as one float32 array."""
    rate, seconds = 192000, 59
    data = _flac(np.zeros((rate * seconds, 8), np.float32), rate)
    assert len(data) < 200_000
    tracemalloc.start()
    try:
        decoded = decode(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    mono = rate * seconds * 4
    assert decoded.samples.shape == (rate * seconds,) and decoded.sample_rate == rate
    assert peak < 1.3 * mono  # the mono result and one block, not 8 channels at once


@pytest.mark.parametrize("data", [b"RIFF\x10\x00\x00\x00WAVEfmt " + b"\xff" * 30, b"fLaC" + b"\x00" * 60])
def test_errors_name_the_problem_not_the_decoder_library(data):
    err = refused(ErrorCode.MALFORMED_AUDIO, data)
    assert "object at" not in err.message and "0x" not in err.message and "Error" not in err.message


def test_two_hours_of_raw_bytes():
    codes = bytes(2 * 3600 * 8000)  # 57.6 MB of mu-law
    refused(ErrorCode.TOO_LARGE, codes, AudioFormat(Encoding.MULAW))
    tracemalloc.start()
    try:
        refused(ErrorCode.TOO_LONG, codes, AudioFormat(Encoding.MULAW), IngestLimits(max_bytes=10**9))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000  # refused from the byte count, before decoding


def test_wrong_declared_sample_rate():
    err = refused(ErrorCode.BAD_SAMPLE_RATE, wav_bytes(SIGNAL, RATE), AudioFormat(Encoding.WAV, 8000))
    assert err.details == {"declared_hz": 8000, "header_hz": 16000}
    refused(ErrorCode.BAD_SAMPLE_RATE, bytes(16000), AudioFormat(Encoding.MULAW, 16000))
    refused(ErrorCode.BAD_SAMPLE_RATE, bytes(32000), AudioFormat(Encoding.LINEAR16))
    refused(ErrorCode.BAD_SAMPLE_RATE, bytes(32000), AudioFormat(Encoding.LINEAR16, 4000))


def test_raw_length_not_a_whole_number_of_samples():
    raw = (SIGNAL * 32767).astype("<i2").tobytes()
    refused(ErrorCode.MALFORMED_AUDIO, raw + b"\x00", AudioFormat(Encoding.LINEAR16, RATE))
    refused(ErrorCode.MALFORMED_AUDIO, raw[:-2], AudioFormat(Encoding.LINEAR16, RATE, channels=2))


@pytest.mark.parametrize("fmt", [AudioFormat(), AudioFormat(Encoding.WAV), AudioFormat(Encoding.LINEAR16, RATE),
                                 AudioFormat(Encoding.MULAW)])
def test_jpeg_sent_as_audio(fmt):
    img = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    ok, jpeg = cv2.imencode(".jpg", img)
    assert ok
    err = refused(ErrorCode.UNSUPPORTED_FORMAT, jpeg.tobytes(), fmt)
    assert "JPEG" in err.message


def test_unknown_bytes_without_a_declared_encoding():
    refused(ErrorCode.UNSUPPORTED_FORMAT, bytes(range(256)) * 100)


def test_nan_samples():
    x = SIGNAL.copy()
    x[1000:1010] = np.nan
    err = refused(ErrorCode.NON_FINITE, wav_bytes(x, RATE, "FLOAT"))
    assert err.details["at_s"] == pytest.approx(1000 / RATE, abs=1e-3)
    x[1000:1010] = np.inf
    refused(ErrorCode.NON_FINITE, wav_bytes(x, RATE, "FLOAT"))


def test_pure_silence():
    err = refused(ErrorCode.SILENCE, wav_bytes(np.zeros(RATE * 2, np.float32), RATE))
    assert err.status == "FAILED_PRECONDITION"
    refused(ErrorCode.SILENCE, g711.ulaw_encode(np.zeros(16000)).tobytes(), AudioFormat(Encoding.MULAW))
    hiss = np.random.default_rng(0).normal(0, 10 ** (-75 / 20), RATE * 2).astype(np.float32)
    refused(ErrorCode.SILENCE, wav_bytes(hiss, RATE, "FLOAT"))


def test_pure_dtmf_tones_are_not_speech():
    keys = [(697, 1209), (770, 1336), (852, 1477), (941, 1633), (697, 1336), (770, 1209)]
    gap = np.zeros(int(0.08 * 8000), np.float32)
    signal = np.concatenate([np.concatenate([tone(k, 0.12, 8000, 0.25), gap]) for k in keys] * 3)
    codes = g711.ulaw_encode(np.round(signal * 32767)).tobytes()  # as an IVR would receive them
    err = refused(ErrorCode.NO_SPEECH, codes, AudioFormat(Encoding.MULAW))
    assert err.status == "FAILED_PRECONDITION" and err.details["dtmf_fraction"] >= 0.5
