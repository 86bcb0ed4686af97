"""Replay cache: robust fingerprints of accepted captures, and the stores that keep them.

Fingerprint: the capture is band-limited to the telephone band and taken to 8 kHz (a wideband
capture and its G.711 re-encoding look alike), then a 32-band log-mel spectrogram at a 16 ms hop;
each band is normalised over time (removes the channel's equaliser: loudspeaker, microphone,
codec) and each frame loses its mean over the bands (removes loudness, so the speech/pause rhythm
alone does not match). Two captures are compared by the best normalised cross-correlation over
time offsets with at least 2 s of overlap: a recording replayed through a loudspeaker and a room
and captured again keeps its spectral-shape trajectory; a new utterance does not.

Spectral-peak landmark hashes (Shazam-style) were measured first and dropped: a small room's
reverberation moves the harmonic peaks of speech, and only 1-10 % of the hashes survived a
simulated loudspeaker and room (0.2-0.8 % between different captures), against 55-85 % of
correlation here (at most 46 % between different captures of the fixtures); figures in
bench/RESULTS.md.

Fingerprints are quantised to int8 and stored sealed (the runtime's envelope encryption, bound to
tenant and subject), since a spectral envelope is derived from the voice capture. Stores
(``voice.replay_store``): a table of the storage (the default: replicas share it), Redis, or one
process's memory.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Callable, Protocol

import numpy as np
import soxr
from numpy.typing import NDArray
from scipy.signal import butter, fftconvolve, sosfiltfilt

from services.common.crypto.errors import UnknownKeyError
from services.common.crypto.envelope import FIELD_COUNT_AT, HEADER_MAX, KEY_ID_TAIL, TAG_BYTES
from services.common.crypto.rotation import SealedTable, sealed_key_id

from .config import voice_config
from .metrics import REPLAY_UNREADABLE

if TYPE_CHECKING:
    from services.common.runtime import Runtime
    from services.common.storage import Storage

log = logging.getLogger("biogate.voice.replay")

RATE = 8000
N_FFT = 256  # 32 ms at 8 kHz
HOP = 128  # 16 ms
N_BANDS = 32
BAND_HZ = (300.0, 3400.0)
MIN_OVERLAP_FRAMES = 125  # 2 s
SCALE = 32.0  # int8 quantisation of the z-scored values
VERSION = 1
# The manifest entry whose calibration record holds the threshold (bench/voice_replay_calibration.py),
# the record's channel (every capture is fingerprinted in the telephone band) and the score it is for.
MODEL_ID = "replay-envelope-v1"
CHANNEL = "telephone-band"
SCORE = f"envelope_xcorr_v{VERSION}"


@lru_cache(maxsize=1)
def _mel() -> NDArray[np.float64]:
    import librosa

    return librosa.filters.mel(sr=RATE, n_fft=N_FFT, n_mels=N_BANDS, fmin=BAND_HZ[0], fmax=BAND_HZ[1])


@dataclass(frozen=True)
class Fingerprint:
    values: NDArray[np.int8]  # [N_BANDS, frames]

    @property
    def frames(self) -> int:
        return self.values.shape[1]

    def to_bytes(self) -> bytes:
        return bytes([VERSION, N_BANDS]) + np.ascontiguousarray(self.values, np.int8).tobytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> Fingerprint:
        if len(data) < 2 or data[0] != VERSION or data[1] != N_BANDS:
            raise ValueError("not a replay fingerprint of this version")
        v = np.frombuffer(data, np.int8, offset=2)
        return cls(v.reshape(N_BANDS, -1))


def fingerprint(samples16k: NDArray[np.float32]) -> Fingerprint:
    x = soxr.resample(np.asarray(samples16k, dtype=np.float32), 16000, RATE, quality="HQ").astype(np.float64)
    if len(x) < N_FFT + HOP:
        return Fingerprint(np.zeros((N_BANDS, 0), np.int8))
    x = sosfiltfilt(butter(4, BAND_HZ, btype="bandpass", fs=RATE, output="sos"), x)
    frames = np.lib.stride_tricks.sliding_window_view(x, N_FFT)[::HOP] * np.hanning(N_FFT)
    power = np.abs(np.fft.rfft(frames, axis=1)).T ** 2  # [bins, frames]
    m = np.log(_mel() @ power + 1e-6)
    m = (m - m.mean(axis=1, keepdims=True)) / (m.std(axis=1, keepdims=True) + 1e-6)
    m = m - m.mean(axis=0, keepdims=True)
    return Fingerprint(np.clip(np.round(m * SCALE), -127, 127).astype(np.int8))


def similarity(a: Fingerprint, b: Fingerprint) -> float:
    """Best normalised cross-correlation of the two fingerprints over offsets with >= 2 s overlap
    (or the whole of the shorter one)."""
    ta, tb = a.frames, b.frames
    if not ta or not tb:
        return 0.0
    fa = a.values.astype(np.float32) / SCALE
    fb = b.values.astype(np.float32) / SCALE
    num = fftconvolve(fa, fb[:, ::-1], mode="full", axes=1).sum(axis=0)
    lags = np.arange(-(tb - 1), ta)
    overlap = np.minimum(ta, lags + tb) - np.maximum(0, lags)
    ok = overlap >= min(MIN_OVERLAP_FRAMES, ta, tb)
    # Each frame has zero mean and about unit variance per band after normalisation.
    scale = np.sqrt(np.mean(fa**2) * np.mean(fb**2)) * N_BANDS
    return float(np.max(num[ok] / (overlap[ok] * scale)))


# ---------------------------------------------------------------------------------------------
# Stores: opaque (sealed) records per (tenant, pseudonymised subject)


class ReplayStore(Protocol):
    def recent(self, tenant: str, pseudonym: str) -> list[bytes]: ...

    def add(self, tenant: str, pseudonym: str, record: bytes) -> None: ...

    def erase(self, tenant: str, pseudonym: str) -> int: ...


class MemoryReplayStore:
    """One process's store (tests, single-instance deployments)."""

    def __init__(self, retention_s: float, max_per_subject: int, clock: Callable[[], float] = time.time) -> None:
        self.retention_s, self.max_per_subject, self.clock = retention_s, max_per_subject, clock
        self._items: dict[tuple[str, str], list[tuple[float, bytes]]] = defaultdict(list)
        self._lock = threading.Lock()

    def recent(self, tenant: str, pseudonym: str) -> list[bytes]:
        cutoff = self.clock() - self.retention_s
        with self._lock:
            items = [(t, b) for t, b in self._items.get((tenant, pseudonym), []) if t >= cutoff]
            if items:
                self._items[(tenant, pseudonym)] = items
            else:
                self._items.pop((tenant, pseudonym), None)
        return [b for _, b in items]

    def add(self, tenant: str, pseudonym: str, record: bytes) -> None:
        with self._lock:
            items = self._items[(tenant, pseudonym)]
            items.append((self.clock(), record))
            del items[: max(0, len(items) - self.max_per_subject)]

    def erase(self, tenant: str, pseudonym: str) -> int:
        with self._lock:
            return len(self._items.pop((tenant, pseudonym), []))


@dataclass(frozen=True)
class RedisSealed:
    """One retained fingerprint of a Redis store, as rotation re-wraps it."""

    key: bytes
    member: bytes  # random id + envelope
    envelope: bytes
    resume: int  # the SCAN cursor after the page it was found in (_SCAN_DONE: the last page)


_SCAN_DONE = -1
# Rotation's compare-and-swap on one member: the new member is added (same score: same place in the
# retention window and the cap) before the old one goes, so the set is never empty and keeps its expiry.
_SWAP_MEMBER = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score then return 0 end
redis.call('ZADD', KEYS[1], score, ARGV[2])
redis.call('ZREM', KEYS[1], ARGV[1])
return 1
"""


# Each retained member's first bytes up to the end of its envelope's header, and its size: what
# counting them per key needs (envelope.header_key_id), not the whole ~20 KB fingerprint.
# ARGV: the retention cutoff, the field count's position (1-based, in the member), the bytes of a
# field tag, those after the key id, and the most to return of a member.
_HEADERS = """
local at, tag, tail, most = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local out = {}
for _, key in ipairs(KEYS) do
  for _, m in ipairs(redis.call('ZRANGEBYSCORE', key, ARGV[1], '+inf')) do
    local len = most
    local n = string.byte(m, at)
    if n then
      local k = string.byte(m, at + 1 + n * tag)
      if k then len = math.min(most, at + 1 + n * tag + k + tail) end
    end
    out[#out + 1] = string.sub(m, 1, len)
    out[#out + 1] = #m
  end
end
return out
"""


class RedisReplayStore:
    """A sorted set per subject (score: time accepted), trimmed to the retention window and the
    cap, with a key expiry of the retention: replicas share it, and nothing outlives the window.

    Key rotation walks the sets under the store's prefix (SCAN) and re-wraps each member by a
    compare-and-swap in one Lua script (:meth:`sealed_table`); retirement counts them (:meth:`key_usage`)."""

    PREFIX = "biogate:voice:replay"
    _ID = 16  # bytes of random id before each record: identical records stay distinct members

    def __init__(self, url: str, retention_s: float, max_per_subject: int,
                 clock: Callable[[], float] = time.time, prefix: str = PREFIX) -> None:
        import redis

        self.client = redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
        self._swap_member = self.client.register_script(_SWAP_MEMBER)
        self._headers = self.client.register_script(_HEADERS)
        self.retention_s, self.max_per_subject, self.clock, self.prefix = retention_s, max_per_subject, clock, prefix

    def key(self, tenant: str, pseudonym: str) -> str:
        return f"{self.prefix}:{tenant}:{pseudonym}"

    def ping(self) -> None:
        self.client.ping()

    def recent(self, tenant: str, pseudonym: str) -> list[bytes]:
        key = self.key(tenant, pseudonym)
        cutoff = self.clock() - self.retention_s
        pipe = self.client.pipeline()
        pipe.zremrangebyscore(key, "-inf", f"({cutoff}")
        pipe.zrangebyscore(key, cutoff, "+inf")
        _, members = pipe.execute()
        return [m[self._ID :] for m in members]

    def add(self, tenant: str, pseudonym: str, record: bytes) -> None:
        key = self.key(tenant, pseudonym)
        pipe = self.client.pipeline()
        pipe.zadd(key, {uuid.uuid4().bytes + record: self.clock()})
        pipe.zremrangebyrank(key, 0, -self.max_per_subject - 1)
        pipe.expire(key, int(self.retention_s) + 1)
        pipe.execute()

    def erase(self, tenant: str, pseudonym: str) -> int:
        key = self.key(tenant, pseudonym)
        pipe = self.client.pipeline()
        pipe.zcard(key)
        pipe.delete(key)
        count, _ = pipe.execute()
        return int(count)

    def _scan(self, cursor: int, count: int) -> tuple[int, list[bytes]]:
        """One SCAN page of the store's sets: (the next cursor, 0 at the end; their keys)."""
        cursor, found = self.client.scan(cursor, match=_glob_escape(self.prefix) + ":*", count=count)
        return int(cursor), [k if isinstance(k, bytes) else k.encode() for k in found]

    def _retained(self, cursor: int, count: int) -> tuple[int, list[tuple[bytes, bytes]]]:
        """One SCAN page: (the next cursor, (set, member) of each fingerprint still in the retention window)."""
        cursor, keys = self._scan(cursor, count)
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.zrangebyscore(key, self.clock() - self.retention_s, "+inf")
        return cursor, [(key, member) for key, members in zip(keys, pipe.execute(), strict=True) for member in members]

    def key_usage(self, batch: int = 200) -> Counter[str]:
        """Retained fingerprints per key id they are sealed under (``keys retire`` counts them, inside its
        database transaction): from each member's header, sliced in Redis."""
        counts: Counter[str] = Counter()
        args = [self.clock() - self.retention_s, self._ID + FIELD_COUNT_AT + 1, TAG_BYTES, KEY_ID_TAIL,
                self._ID + HEADER_MAX]
        # Redis copies each member into the script whole (~35 us for 20 KB) and serves no one else meanwhile:
        # ~200 members a call keep that under ~10 ms.
        per_call = max(1, 200 // self.max_per_subject)
        cursor = 0
        while True:
            cursor, keys = self._scan(cursor, batch)
            for i in range(0, len(keys), per_call):
                out = self._headers(keys=keys[i : i + per_call], args=args)
                counts.update(sealed_key_id(head[self._ID :], int(size) - self._ID)
                              for head, size in zip(out[::2], out[1::2], strict=True))
            if not cursor:
                return counts

    def _for_rewrap(self, exclude_key_id: str, batch: int, after: int | None) -> list[RedisSealed]:
        if after == _SCAN_DONE:
            return []
        cursor = after or 0
        while True:  # pages of about ``batch`` fingerprints (each set holds up to the cap)
            cursor, found = self._retained(cursor, max(1, batch // self.max_per_subject))
            todo = [RedisSealed(key, member, member[self._ID :], cursor or _SCAN_DONE) for key, member in found
                    if sealed_key_id(member[self._ID :]) != exclude_key_id]
            if todo or not cursor:
                return todo

    def _swap(self, rec: RedisSealed, envelope: bytes) -> bool:
        return bool(self._swap_member(keys=[rec.key], args=[rec.member, rec.member[: self._ID] + envelope]))

    def sealed_table(self) -> SealedTable:
        """The fingerprints as ``keys rotate`` and ``keys rewrap`` re-wrap them."""
        return SealedTable("voice replay fingerprint", self._for_rewrap, lambda rec: rec.resume, self._swap,
                           name=lambda rec: f"{rec.key.decode(errors='replace')} #{rec.member[: self._ID].hex()}")


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


class DatabaseReplayStore:
    """A table of the service's storage (SQLite or PostgreSQL): replicas share it through the
    database they already share, with no Redis. Same retention and cap as the Redis store."""

    def __init__(self, storage: Storage, retention_s: float, max_per_subject: int,
                 clock: Callable[[], float] = time.time) -> None:
        from .storage import attach

        self.repo = attach(storage)
        self.retention_s, self.max_per_subject, self.clock = retention_s, max_per_subject, clock

    def recent(self, tenant: str, pseudonym: str) -> list[bytes]:
        return self.repo.recent(tenant, pseudonym, self.clock() - self.retention_s)

    def add(self, tenant: str, pseudonym: str, record: bytes) -> None:
        now = self.clock()
        self.repo.add(tenant, pseudonym, record, now, self.max_per_subject, now - self.retention_s)

    def erase(self, tenant: str, pseudonym: str) -> int:
        return self.repo.erase(tenant, pseudonym)

    def key_usage(self) -> Counter[str]:
        """Retained fingerprints per key id they are sealed under (``keys retire`` counts them)."""
        return self.repo.count_by_key(self.clock() - self.retention_s)

    def sealed_table(self) -> SealedTable:
        """The fingerprints as ``keys rotate`` and ``keys rewrap`` re-wrap them."""
        return SealedTable("voice replay fingerprint", self.repo.iter_for_rewrap, lambda row: row.id,
                           self.repo.replace_record)


class ReplayStoreError(ValueError):
    """voice.replay_store names a store that cannot be used; the message says what to change."""


def _without_password(url: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def open_store(spec: str, retention_s: float, max_per_subject: int,
               prefix: str = RedisReplayStore.PREFIX, storage: Storage | None = None) -> ReplayStore:
    """The store ``voice.replay_store`` names. Raises ReplayStoreError, naming the setting, for an
    unknown value or an unreachable Redis, so that the service refuses to start."""
    if spec == "memory":
        return MemoryReplayStore(retention_s, max_per_subject)
    if spec == "database":
        if storage is None:
            raise ReplayStoreError("voice.replay_store 'database' needs the service's storage")
        return DatabaseReplayStore(storage, retention_s, max_per_subject)
    if spec.startswith(("redis://", "rediss://", "unix://")):
        import redis

        store = RedisReplayStore(spec, retention_s, max_per_subject, prefix=prefix)
        try:
            store.ping()
        except redis.RedisError as exc:
            raise ReplayStoreError(
                f"voice.replay_store {_without_password(spec)}: Redis cannot be reached ({exc}). Start Redis "
                "there, or set voice.replay_store to 'database' (a table of the storage, shared by replicas) "
                "or 'memory' (one process only)") from None
        return store
    raise ReplayStoreError(f"voice.replay_store {spec!r}: expected 'database', 'memory' or a redis:// URL")


def open_cache(rt: Runtime) -> ReplayCache:
    """The replay cache of a voice service process (``rt``: its Runtime)."""
    cfg = voice_config(rt.settings)
    store = open_store(cfg.replay_store, cfg.replay_retention_s, cfg.replay_max_per_subject,
                       cfg.replay_key_prefix, storage=rt.storage)
    return ReplayCache(store, rt.crypto.seal, rt.crypto.open, rt.pseudonymize)


@dataclass(frozen=True)
class ReplayBinding:
    """Associated data of a sealed fingerprint (duck-typed like the crypto's TemplateBinding)."""

    tenant_id: str
    subject_id: str

    def fields(self) -> dict[str, str]:
        return {"purpose": "voice-replay-fingerprint", "tenant": self.tenant_id, "subject": self.subject_id}


class ReplayCache:
    """Checks a capture against a subject's retained captures, and retains accepted ones."""

    def __init__(self, store: ReplayStore, seal: Callable[[ReplayBinding, bytes], bytes],
                 open_: Callable[[ReplayBinding, bytes], bytes], pseudonymize: Callable[[str, str], str]) -> None:
        self.store = store
        self._seal, self._open, self._pseudonymize = seal, open_, pseudonymize

    def best_match(self, tenant: str, subject: str, fp: Fingerprint) -> float:
        """The highest similarity of ``fp`` to the subject's retained captures (0.0 when none).

        A record sealed under a key the keyring no longer holds is left out as if expired: `keys
        retire` refuses while the database or Redis store holds any, but cannot see a process's
        memory store (or a capture stored after it counted), and one such record must not fail every
        verification of the subject until the retention ends. Any other envelope that does not open
        (altered, bound to another subject) still fails the call."""
        binding = ReplayBinding(tenant, subject)
        best = 0.0
        for record in self.store.recent(tenant, self._pseudonymize(tenant, subject)):
            try:
                opened = self._open(binding, record)
            except UnknownKeyError as exc:
                REPLAY_UNREADABLE.labels("key_retired").inc()
                log.warning("a retained replay fingerprint is sealed under key %s, which the keyring no longer "
                            "holds (retired): left out of the replay check as expired", exc.key_id)
                continue
            best = max(best, similarity(fp, Fingerprint.from_bytes(opened)))
        return best

    def remember(self, tenant: str, subject: str, fp: Fingerprint) -> None:
        if fp.frames:
            self.store.add(tenant, self._pseudonymize(tenant, subject),
                           self._seal(ReplayBinding(tenant, subject), fp.to_bytes()))

    def erase(self, tenant: str, subject: str) -> int:
        return self.store.erase(tenant, self._pseudonymize(tenant, subject))
