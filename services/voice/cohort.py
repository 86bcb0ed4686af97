"""Score normalisation: a cohort of impostor embeddings and adaptive s-norm against it.

Adaptive s-norm (Matejka et al. 2017): with mu/sd the mean and standard deviation of the top-K
cosines of an embedding against the cohort,

    s = ((c - mu_e) / sd_e + (c - mu_p) / sd_p) / 2

for the raw cosine c of enrolment e and probe p. The cohort is configuration: an ``.npz`` file
with one embedding matrix per channel family (wideband, telephone: the telephone entries are the
same audio through the telephone simulation), written by `biogate voice cohort build` from audio
of speakers who are NOT the ones being verified or evaluated (an evaluation whose cohort holds its
own speakers reports flattering error rates).

Default cohort audio: the speech recordings in the test data of the pocketsphinx source
distribution on PyPI (a registry package the service already depends on; BSD licence): LibriVox,
CMU and TIDIGITS speakers, none of them in ../shared/fixtures. An operator replaces it with a
larger set of their own callers' or a public corpus's audio (``--audio DIR``).

The cohort's id is a digest of the source audio, the model and the build parameters (not of the
embedding bytes, which may differ in the last bits between machines); the score name includes it,
so a calibration fitted with one cohort is never applied to scores normalised with another.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import soundfile as sf
from numpy.typing import NDArray

from . import telephone
from .config import ChannelFamily
from .ingest import AudioError, AudioFormat, Encoding
from .pipeline import VoicePipeline

FloatArray = NDArray[np.float32]
FAMILIES: tuple[ChannelFamily, ...] = ("wideband", "telephone")
FORMAT_VERSION = 1

# pocketsphinx 5.1.1 sdist: member -> sha256. Raw files are 16 kHz 16-bit mono little-endian.
DEFAULT_SOURCE_PACKAGE = "pocketsphinx==5.1.1"
DEFAULT_SOURCE_MEMBERS = {
    "test/data/cards/001.wav": "899951e768666f27c8f8b1d4090b96fe7909cae9cec01bec0a5d5d1b8a8d566e",
    "test/data/cards/002.wav": "a3f9eae6fdb69a1231989e39a14d62388a6f52fb59666c76d95005318fadafec",
    "test/data/cards/003.wav": "00d283e46bc257ae479e4aa86593cadb541656eba1d19fc8abeece37f6a5a18b",
    "test/data/cards/004.wav": "4c44a8177f5b128b99f078cdeb918119933155574231f1833e8840d1af09c521",
    "test/data/cards/005.wav": "090f18f5f76cf8b2b43cd9e6b07823f4685a4742d9a36cd98b174a6586c18cf9",
    "test/data/forever/input_2_16k.wav": "a67ddc6424abc306863a50aab4dcb37b31fa28e601dadc80e66751de39499402",
    "test/data/forever/input_4_16k.wav": "16ee530ce7017b80962d9c6cad884ca4d044805a7169cc6c80f8f55c58ae093b",
    "test/data/librivox/sense_and_sensibility_01_austen_64kb-0870.wav": "b0557cf95c974d930577e58e46b7f068c432a6e3afcc286563d88922b2a5315c",
    "test/data/librivox/sense_and_sensibility_01_austen_64kb-0880.wav": "fbec491ef00ee734a67f0ee318e98c51c157b479e1629ff4f4426861ecac0414",
    "test/data/librivox/sense_and_sensibility_01_austen_64kb-0890.wav": "5793ffbdee55fb8bfd284943a6866864c832d9d4accf2661cabd39915c84ee10",
    "test/data/librivox/sense_and_sensibility_01_austen_64kb-0920.wav": "40882414ef4cc51f3ff7a63bad0c8c87e7f595ffeb8209fbf756c8ebc5c28a59",
    "test/data/librivox/sense_and_sensibility_01_austen_64kb-0930.wav": "954adbf0b56ac8a148cbe77b39ca18d76b5f2a1e1f405565bd786ce3e68a68b7",
    "test/data/goforward.raw": "f15c60ec54059d8b66e410d0064945a0b0a04ea56e1ddca1958e493c0cf70e71",
    "test/data/numbers.raw": "45b5f6d3f88e36dd55b025cc9e8f1cae567583ea93f554ecdff6d09e6dd4577d",
    "test/data/something.raw": "eb95b74ce3f3037487e49dcfd935bbcf8c158b5f4083dd19451729c3ee694f5f",
    "test/data/tidigits/dhd.2934z.raw": "60c14412ad1412b83f37061e29c9e76f74cce0f90637debb8087f10cd559e552",
    "test/data/vad/leak-test.wav": "0e415756dd194d0287ac7a949162bafb221e833591c7ba20c33d0eadd3cf7ce9",
}


class CohortError(RuntimeError):
    pass


@dataclass(frozen=True)
class Cohort:
    cohort_id: str  # 16 hex digits
    model_id: str
    embeddings: dict[str, FloatArray]  # family -> [N, D], L2-normalised
    description: str = ""

    def family(self, family: str) -> FloatArray:
        if family not in self.embeddings or not len(self.embeddings[family]):
            raise CohortError(f"the cohort {self.cohort_id} has no {family} embeddings")
        return self.embeddings[family]

    def save(self, path: str | os.PathLike[str]) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"version": FORMAT_VERSION, "cohort_id": self.cohort_id, "model_id": self.model_id,
                "description": self.description}
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as fh:
            arrays: dict[str, Any] = {f: e.astype(np.float32) for f, e in self.embeddings.items()}
            np.savez(fh, meta=np.array(json.dumps(meta)), **arrays)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Cohort:
        try:
            with np.load(Path(path), allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
                embeddings: dict[str, FloatArray] = {f: np.asarray(data[f], np.float32) for f in FAMILIES if f in data.files}
        except (OSError, KeyError, ValueError) as err:
            raise CohortError(f"{path}: not a cohort file ({err})") from None
        if meta.get("version") != FORMAT_VERSION:
            raise CohortError(f"{path}: cohort format {meta.get('version')}, expected {FORMAT_VERSION}")
        return cls(meta["cohort_id"], meta["model_id"], embeddings, meta.get("description", ""))


class SNorm:
    """Adaptive s-norm of one channel family's cohort."""

    def __init__(self, cohort_embeddings: FloatArray, top_k: int = 50) -> None:
        self.cohort = np.ascontiguousarray(cohort_embeddings, dtype=np.float32)
        if self.cohort.ndim != 2 or len(self.cohort) < 2:
            raise CohortError("an s-norm cohort needs at least two embeddings")
        self.top_k = min(top_k, len(self.cohort))

    def stats(self, embeddings: FloatArray) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """Mean and standard deviation of the top-K cohort cosines of each row of ``embeddings``."""
        e = np.atleast_2d(np.asarray(embeddings, dtype=np.float32))
        c = e @ self.cohort.T
        top = -np.partition(-c, self.top_k - 1, axis=1)[:, : self.top_k].astype(np.float64)
        return top.mean(axis=1), np.maximum(top.std(axis=1), 1e-6)

    def normalise(self, cosine: float | FloatArray, enrol: FloatArray, probe: FloatArray) -> NDArray[np.float64]:
        mu_e, sd_e = self.stats(enrol)
        mu_p, sd_p = self.stats(probe)
        c = np.asarray(cosine, dtype=np.float64)
        return 0.5 * ((c - mu_e) / sd_e + (c - mu_p) / sd_p)


def score_name(cohort: Cohort | None, top_k: int) -> str:
    """What a calibration's threshold applies to: the raw cosine, or s-norm against one cohort."""
    return "cosine" if cohort is None else f"asnorm{top_k}:{cohort.cohort_id}"


# ---------------------------------------------------------------------------------------------
# Building


@dataclass(frozen=True)
class CohortAudio:
    name: str  # a label for reports; never a person's name
    sha256: str
    samples: FloatArray
    sample_rate: int


def read_audio(name: str, data: bytes) -> CohortAudio:
    digest = hashlib.sha256(data).hexdigest()
    if name.endswith(".raw"):
        x = np.frombuffer(data[: len(data) // 2 * 2], dtype="<i2").astype(np.float32) / 32768.0
        return CohortAudio(name, digest, x, 16000)
    x, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    return CohortAudio(name, digest, x.mean(axis=1), rate)


def audio_from_dir(directory: str | os.PathLike[str]) -> list[CohortAudio]:
    files = sorted(p for p in Path(directory).rglob("*") if p.suffix.lower() in (".wav", ".flac", ".raw"))
    if not files:
        raise CohortError(f"no .wav, .flac or .raw files under {directory}")
    return [read_audio(str(p.relative_to(directory)), p.read_bytes()) for p in files]


def default_audio(downloads_dir: Path, timeout_s: float = 900.0) -> list[CohortAudio]:
    """The default cohort audio from the pocketsphinx sdist (downloaded once into ``downloads_dir``)."""
    folder = downloads_dir / "pypi-sdist" / DEFAULT_SOURCE_PACKAGE
    archives = sorted(folder.glob("*.tar.gz")) if folder.is_dir() else []
    if not archives:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            proc = subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary=:all:",
                 "--disable-pip-version-check", "--quiet", "--dest", tmp, DEFAULT_SOURCE_PACKAGE],
                capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
            got = sorted(Path(tmp).glob("*.tar.gz"))
            if not got:
                tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
                raise CohortError(f"pip download of the {DEFAULT_SOURCE_PACKAGE} sdist failed: {tail}")
            os.replace(got[0], folder / got[0].name)
        archives = sorted(folder.glob("*.tar.gz"))
    out = []
    with tarfile.open(archives[0], "r:gz") as tf:
        prefix = tf.getnames()[0].split("/")[0]
        for member, sha in DEFAULT_SOURCE_MEMBERS.items():
            fh = tf.extractfile(f"{prefix}/{member}")
            if fh is None:
                raise CohortError(f"{archives[0].name} has no file {member}")
            item = read_audio(member, fh.read())
            if item.sha256 != sha:
                raise CohortError(f"{archives[0].name}: {member} has sha256 {item.sha256}, expected {sha}")
            out.append(item)
    return out


def cohort_id(model_id: str, audio: Sequence[CohortAudio], params: dict) -> str:
    h = hashlib.sha256(json.dumps({"model": model_id, "params": params,
                                   "audio": sorted(a.sha256 for a in audio)}, sort_keys=True).encode())
    return h.hexdigest()[:16]


_MULAW = AudioFormat(Encoding.MULAW, 8000)


def build(pipeline: VoicePipeline, model_id: str, audio: Iterable[CohortAudio], description: str = "") -> Cohort:
    """Embed every clip as recorded and through the telephone simulation; clips the pipeline
    refuses (too little speech) are left out."""
    audio = list(audio)
    prepared: dict[str, list] = {f: [] for f in FAMILIES}
    used = []
    for item in audio:
        try:
            wide = pipeline.prepare_samples(item.samples, item.sample_rate)
            tel = pipeline.prepare(telephone.encode(item.samples, item.sample_rate), _MULAW)
        except AudioError:
            continue
        prepared["wideband"].append(wide)
        prepared["telephone"].append(tel)
        used.append(item)
    if len(used) < 2:
        raise CohortError(f"only {len(used)} of {len(audio)} cohort clips hold enough speech")
    embeddings = {f: pipeline.embed(p) for f, p in prepared.items()}
    params = {"families": list(FAMILIES), "telephone": "300-3400 Hz, 8 kHz mu-law", "version": FORMAT_VERSION}
    desc = description or f"{len(used)} clips"
    return Cohort(cohort_id(model_id, used, params), model_id, embeddings, desc)
