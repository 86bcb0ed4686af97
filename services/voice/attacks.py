"""Simulated presentation attacks, for tests, calibration and benchmarks (never used to decide).

* :func:`loudspeaker_room`: a recording played through a small loudspeaker into a room and
  captured again (band-limited speaker response, a short synthetic room impulse response, noise);
  :func:`replay_in_room` does the same in one of :data:`ROOMS`, rooms of several sizes whose
  reverberation time is Sabine's and whose direct-to-reverberant ratio follows from the distance
  between loudspeaker and phone and the room's critical distance.
* :func:`espeak`: text-to-speech with espeak-ng (installed by scripts/setup.sh from Debian).
* :data:`SENDER_VARIANTS`: what an attacker may do to espeak-ng's digital-zero pauses before sending
  the clip (a cue AASIST uses): nothing, trim them (:func:`trimmed`), or fill them with low-level
  noise (:func:`noise_filled`); the calibration's attack lists carry all three
  (bench/voice_antispoof_refit.py).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
from numpy.typing import NDArray
from scipy.signal import butter, fftconvolve, sosfilt

FloatArray = NDArray[np.float32]

# Texts and espeak-ng voices of the synthetic-speech attack sets (bench and `biogate voice attacks`).
SENTENCES = (
    "Please verify my identity so that I can access my account.",
    "My voice is my password, and I would like to transfer some money today.",
    "I am calling about the recent charges on my credit card statement.",
    "Could you tell me the balance of my savings account, please?",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "I would like to report a lost card and order a replacement.",
    "Four seven one nine two eight.",
    "Yesterday I paid my electricity bill and my rent from the current account.",
    "Three one four one five nine two six.",
    "Good morning, I need to change the address on my account.",
)
# Variant names are file names (case-sensitive): a misspelt one silently gives the base voice.
# tests/voice/test_layers.py holds other voices out, to measure what calibration did not see.
VOICES = ("en-us", "en", "en-us+m3", "en+f2", "en-us+f4", "en-us+klatt", "en-gb-x-rp", "en+m7",
          "en-gb-scotland", "en-us+f3", "en-029+m2", "en-us-nyc+klatt3", "en-gb-x-gbclan+f5", "en+Annie",
          "en-us+Andy", "en-gb-x-gbcwmd+f1", "en-us+linda", "en+steph", "en-us+belinda", "en+Andrea",
          "en-us+anika", "en+max", "en-us+Mike", "en+Michael", "en-us+klatt5", "en+klatt6", "en-us+m1",
          "en+f5", "en-029+f2", "en-us-nyc+paul", "en-gb-scotland+Lee", "en-us+Gene")


@dataclass(frozen=True)
class Room:
    name: str
    size_m: tuple[float, float, float]  # length, width, height
    absorption: float  # mean absorption coefficient of the surfaces

    @property
    def rt60_s(self) -> float:
        """Sabine: RT60 = 0.161 V / (S a), in seconds (V in m^3, S in m^2)."""
        length, width, height = self.size_m
        volume = length * width * height
        surface = 2 * (length * width + length * height + width * height)
        return 0.161 * volume / (surface * self.absorption)

    @property
    def critical_distance_m(self) -> float:
        """Where direct and reverberant sound are equally loud: 0.057 sqrt(V / RT60), omnidirectional source."""
        length, width, height = self.size_m
        return 0.057 * float(np.sqrt(length * width * height / self.rt60_s))


# Where a replayed recording may be played to a phone: from a car to a meeting room.
ROOMS = (
    Room("car", (2.5, 1.5, 1.2), 0.45),
    Room("small office", (3.0, 4.0, 2.7), 0.3),
    Room("living room", (5.0, 6.0, 2.7), 0.2),
    Room("meeting room", (6.0, 8.0, 3.0), 0.12),
)


def room_impulse_response(rate: int, rt60_s: float, rng: np.random.Generator) -> FloatArray:
    """Direct path, a few early reflections, then exponentially decaying noise (the late tail)."""
    n = int(rt60_s * rate)
    t = np.arange(n) / rate
    tail = rng.standard_normal(n) * np.exp(-6.9 * t / rt60_s) * 0.3
    tail[: int(0.005 * rate)] = 0.0
    ir = tail
    ir[0] = 1.0
    for delay_ms, gain in ((3.1, 0.5), (7.4, 0.35), (11.9, 0.25)):
        ir[int(delay_ms * rate / 1000)] += gain * rng.choice((-1.0, 1.0))
    return (ir / np.sqrt(np.sum(ir**2))).astype(np.float32)


def room_response(rate: int, room: Room, distance_m: float, rng: np.random.Generator) -> FloatArray:
    """The direct path, then a diffuse tail decaying at the room's RT60 whose energy relative to the
    direct sound is (distance / critical distance)^2: near the loudspeaker the direct sound
    dominates, beyond the critical distance the reverberation does."""
    n = max(int(room.rt60_s * rate), 16)
    t = np.arange(n) / rate
    tail = rng.standard_normal(n) * np.exp(-6.9 * t / room.rt60_s)
    tail[: max(1, int(0.003 * rate))] = 0.0  # the first reflection travels a metre further
    tail *= np.sqrt((distance_m / room.critical_distance_m) ** 2 / np.sum(tail**2))
    tail[0] = 1.0
    return tail.astype(np.float32)


def _loudspeaker(x: FloatArray, rate: int) -> NDArray[np.float64]:
    speaker = butter(4, (250.0, min(6500.0, rate * 0.45)), btype="bandpass", fs=rate, output="sos")
    y = sosfilt(speaker, np.asarray(x, dtype=np.float64))
    return np.tanh(2.0 * y) / 2.0  # the small speaker's soft saturation


def _noisy(y: NDArray[np.float64], snr_db: float, rng: np.random.Generator) -> FloatArray:
    noise = rng.standard_normal(len(y))
    gain = np.sqrt(np.mean(y**2) / (np.mean(noise**2) * 10 ** (snr_db / 10)))
    y = y + gain * noise
    return (0.5 * y / max(np.max(np.abs(y)), 1e-9)).astype(np.float32)


def loudspeaker_room(x: FloatArray, rate: int = 16000, rt60_s: float = 0.25, snr_db: float = 25.0,
                     seed: int = 0) -> FloatArray:
    rng = np.random.default_rng(seed)
    y = fftconvolve(_loudspeaker(x, rate), room_impulse_response(rate, rt60_s, rng))[: len(x)]
    return _noisy(y, snr_db, rng)


def replay_in_room(x: FloatArray, rate: int, room: Room, distance_m: float = 0.3, snr_db: float = 20.0,
                   seed: int = 0) -> FloatArray:
    """A recording played through a small loudspeaker ``distance_m`` from the capturing phone in
    ``room``, with background noise at ``snr_db``."""
    rng = np.random.default_rng(seed)
    y = fftconvolve(_loudspeaker(x, rate), room_response(rate, room, distance_m, rng))[: len(x)]
    return _noisy(y, snr_db, rng)


def resample(x: FloatArray, rate_in: int, rate_out: int) -> FloatArray:
    return soxr.resample(np.asarray(x, dtype=np.float32), rate_in, rate_out, quality="HQ").astype(np.float32)


NOISE_FILL_DB = -50.0  # noise_filled: the noise's RMS relative to the clip's RMS


def trimmed(x: FloatArray) -> FloatArray:
    """The clip with every run of >= 20 ms within one PCM-16 step of zero removed (the sender's cut:
    the service's voice.antispoof_cut_digital_silence rule, at 16 kHz before any channel)."""
    from .antispoof import without_digital_silence

    return without_digital_silence(x)[0]


def noise_filled(x: FloatArray, seed: int = 0) -> FloatArray:
    """The clip with every run of >= 20 ms within one PCM-16 step of zero replaced by white Gaussian
    noise whose RMS is NOISE_FILL_DB below the clip's RMS (a recording's noise floor instead of
    digital zero); the length is kept."""
    from .antispoof import digital_silence_runs

    y = np.array(x, dtype=np.float32)
    rms = float(np.sqrt(np.mean(np.square(y, dtype=np.float64)))) * 10 ** (NOISE_FILL_DB / 20)
    rng = np.random.default_rng(seed)
    for start, end in zip(*digital_silence_runs(y), strict=True):
        y[start:end] = rng.standard_normal(end - start) * rms
    return y


# Sender-side variants of a synthetic clip (name -> function of the clip and a seed).
SENDER_VARIANTS = {
    "": lambda x, seed: x,
    "trimmed": lambda x, seed: trimmed(x),
    "noisefill": noise_filled,
}


def espeak(text: str, voice: str = "en-us", speed: int = 150, gap: int = 0, rate: int = 16000) -> FloatArray:
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise FileNotFoundError("espeak-ng is not installed (scripts/setup.sh installs it: apt-get install espeak-ng)")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tts.wav"
        subprocess.run([exe, "-v", voice, "-s", str(speed), "-g", str(gap), "-w", str(path), text],
                       check=True, capture_output=True, timeout=60)
        y, native = sf.read(path, dtype="float32")
    return resample(y, native, rate)
