"""Per-client token buckets (kiosk.rate_limit): in this process's memory, or in Redis shared by the
gateway's replicas. One request takes a token from each of its buckets (the source address's and,
when known, the kiosk device's) only if every one of them holds one; else it is refused with the
seconds until the emptiest bucket holds a token again."""

from __future__ import annotations

import ipaddress
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from services.kiosk.config import RateLimitConfig
from services.kiosk.metrics import RATE_LIMIT_STORE_ERRORS


def address_key(host: str, ipv6_prefix_length: int) -> str:
    """The client an address stands for: an IPv4 address itself (also written IPv4-mapped in IPv6),
    an IPv6 address its network of ``ipv6_prefix_length`` bits (a host holds a whole /64 or more,
    and would pick a fresh address for each bucket); anything else (no address) as given."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, ipv6_prefix_length), strict=False))
    return str(address)


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    retry_after_s: float = 0.0  # until the refusing bucket holds a token again
    refused_by: int = -1  # the index (in the keys taken) of the bucket that refused


class MemoryBuckets:
    """At most ``max_clients`` buckets; the least recently used is dropped first (it comes back
    full: an eviction errs towards letting a client in)."""

    def __init__(self, capacity: int, refill_per_s: float, max_clients: int) -> None:
        self.capacity, self.rate, self.max_clients = capacity, refill_per_s, max_clients
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, at)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, keys: Sequence[str], now: float) -> Verdict:
        with self._lock:
            levels = []
            for key in keys:
                tokens, at = self._buckets.get(key, (float(self.capacity), now))
                levels.append(min(float(self.capacity), tokens + max(0.0, now - at) * self.rate))
            verdict = _verdict(levels, self.rate)
            for key, tokens in zip(keys, levels, strict=True):
                self._buckets[key] = (tokens - 1 if verdict.allowed else tokens, now)
                self._buckets.move_to_end(key)
            while len(self._buckets) > self.max_clients:
                self._buckets.popitem(last=False)
            return verdict


def _verdict(levels: Sequence[float], rate: float) -> Verdict:
    for i, tokens in enumerate(levels):
        if tokens < 1:
            return Verdict(False, (1 - tokens) / rate, i)
    return Verdict(True)


# KEYS: the buckets; ARGV: capacity, refill rate, now. Returns {allowed, refused index (0-based, -1),
# retry seconds as a string}. Each bucket expires once it would be full again.
_TAKE = """
local capacity, rate, now = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local levels = {}
local refused, wait = -1, 0
for i, key in ipairs(KEYS) do
  local v = redis.call('HMGET', key, 'tokens', 'at')
  local tokens, at = tonumber(v[1]), tonumber(v[2])
  if tokens == nil then tokens, at = capacity, now end
  if now > at then tokens = math.min(capacity, tokens + (now - at) * rate) end
  levels[i] = tokens
  if refused < 0 and tokens < 1 then refused, wait = i - 1, (1 - tokens) / rate end
end
local ttl = math.ceil(capacity / rate) + 1
for i, key in ipairs(KEYS) do
  local tokens = levels[i]
  if refused < 0 then tokens = tokens - 1 end
  redis.call('HSET', key, 'tokens', tostring(tokens), 'at', tostring(now))
  redis.call('EXPIRE', key, ttl)
end
return {refused < 0 and 1 or 0, refused, tostring(wait)}
"""


class RedisBuckets:
    def __init__(self, url: str, capacity: int, refill_per_s: float, prefix: str) -> None:
        import redis

        self.client = redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
        self.capacity, self.rate, self.prefix = capacity, refill_per_s, prefix
        self._take = self.client.register_script(_TAKE)

    def take(self, keys: Sequence[str], now: float) -> Verdict:
        allowed, refused, wait = self._take(keys=[f"{self.prefix}:{k}" for k in keys],
                                            args=[self.capacity, repr(self.rate), repr(now)])
        return Verdict(bool(allowed), float(wait), int(refused))


class RateLimitStoreError(ValueError):
    """kiosk.rate_limit.store cannot be used; the message says what to change."""


class RateLimiter:
    """The buckets kiosk.rate_limit configures, read with ``clock`` (seconds)."""

    def __init__(self, cfg: RateLimitConfig, clock: Callable[[], float] = time.time) -> None:
        self.cfg, self.clock = cfg, clock
        self.memory = MemoryBuckets(cfg.capacity, cfg.refill_per_s, cfg.max_clients)
        self.shared: RedisBuckets | None = None
        if cfg.store.startswith(("redis://", "rediss://", "unix://")):
            import redis

            self.shared = RedisBuckets(cfg.store, cfg.capacity, cfg.refill_per_s, cfg.key_prefix)
            try:
                self.shared.client.ping()
            except redis.RedisError as exc:
                raise RateLimitStoreError(f"kiosk.rate_limit.store: Redis cannot be reached ({type(exc).__name__}); "
                                          "start it there, or set the store to 'memory'") from None
        elif cfg.store != "memory":
            raise RateLimitStoreError(f"kiosk.rate_limit.store {cfg.store!r}: expected 'memory' or a redis:// URL")

    def take(self, keys: Sequence[str]) -> Verdict:
        now = self.clock()
        if self.shared is not None:
            import redis

            try:
                return self.shared.take(keys, now)
            except redis.RedisError:
                RATE_LIMIT_STORE_ERRORS.inc()
        return self.memory.take(keys, now)


def retry_after(seconds: float) -> str:
    """The Retry-After header's whole seconds, never 0 (a client must wait at least until then)."""
    return str(max(1, math.ceil(seconds)))
