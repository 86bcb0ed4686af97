"""The kiosk gateway's configuration (the ``kiosk`` section of the one settings tree)."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path

from pydantic import Field, field_validator

from services.common.config import CommonSettings, Section


_HOST = re.compile(r"(?:\[(?P<ipv6>[0-9A-Fa-f:.]+)\]|(?P<name>[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9.])?))(?::[0-9]{1,5})?")


def host_name(host: str) -> str | None:
    """The host a Host header (or a URL's authority without user) names, as kiosk.allowed_hosts
    holds it: lower case, without port or trailing dot, an IPv6 address compressed and without its
    brackets; None when it is not a host name or address."""
    found = _HOST.fullmatch(host)
    if found is None:
        return None
    if found["ipv6"] is not None:
        try:
            return str(ipaddress.IPv6Address(found["ipv6"]))
        except ValueError:
            return None
    return found["name"].lower().rstrip(".")


class RateLimitConfig(Section):
    """A token bucket per client in front of every request (before the kiosk's key is checked): each
    request takes one token from the bucket of its source address and, with ``device_header`` set,
    from the bucket of the kiosk device that header names; a client whose bucket is empty is answered
    429 with Retry-After. Buckets hold at most ``capacity`` tokens (the burst) and refill at
    ``refill_per_s``. Not measured settings: the defaults allow a burst of 20 calls (a login is 5 to
    8) and 30 a minute after it, per kiosk."""

    enabled: bool = True
    # "memory": this process's buckets (at most max_clients, the least recently used dropped first);
    # "redis://host:port/db" (or rediss://): shared by the gateway's replicas, each bucket expiring
    # once it would be full again. A configured Redis that cannot be reached stops the gateway at
    # start; one failing later is counted and the request is charged to this process's buckets.
    store: str = "memory"
    capacity: int = Field(20, ge=1)
    refill_per_s: float = Field(0.5, gt=0)
    # A header naming the kiosk device, set by a proxy in front of the gateway that authenticates
    # the device (for example from its client certificate); "" = none. Never a header the page sets:
    # whoever holds the kiosk key could name another kiosk's bucket.
    device_header: str = ""
    max_clients: int = Field(10_000, ge=1)
    key_prefix: str = "biogate:kiosk:ratelimit"
    # An IPv6 client's address bucket is its network of this many leading bits, not its one address:
    # a home line or a server holds a /64 (often a /56 or /48) and would have a fresh bucket for each
    # address it picks. IPv4 clients (an IPv4-mapped IPv6 address included) have one per address.
    ipv6_prefix_length: int = Field(64, ge=32, le=128)


class HttpLimitsConfig(Section):
    """How long and how many connections the gateway holds (services/kiosk/http.py)."""

    # A request's head (request line and headers) must arrive whole within head_timeout_s of the
    # connection or of its first byte, its body within body_timeout_s of the head; else 408 and the
    # connection is closed (slow senders: slowloris).
    head_timeout_s: float = Field(10.0, gt=0)
    body_timeout_s: float = Field(30.0, gt=0)
    # An idle keep-alive connection is closed after this long.
    keep_alive_s: float = Field(5.0, gt=0)
    # After an answer that closes the connection while the request's body is still coming (413,
    # 429), the gateway stops sending and reads and drops what still arrives for up to linger_s
    # before it closes: closing with unread bytes would reset the connection, and the reset can
    # destroy the answer before the client reads it (lingering close).
    linger_s: float = Field(5.0, gt=0)
    # Connections held at once; one more is answered 503 TOO_MANY_CONNECTIONS (Retry-After) and closed.
    max_connections: int = Field(64, ge=1)
    # Connections one client address holds at once (an IPv6 client: its network of
    # rate_limit.ipv6_prefix_length bits); one more is answered 503 TOO_MANY_CONNECTIONS and closed
    # at once, so one client cannot take all of max_connections. The address is the connection's
    # peer: behind a proxy (forwarded_allow_ips) it is the proxy's, and every client behind it
    # shares the cap; there set it to max_connections or more.
    max_connections_per_ip: int = Field(32, ge=1)
    # Face frames read and handled at once (about 30 MiB each at the largest; bench/RESULTS.md,
    # "Kiosk gateway limits"); one more is answered 503 FRAMES_BUSY with Retry-After. A kiosk sends
    # one at a time.
    max_frames: int = Field(8, ge=1)


class KioskConfig(Section):
    """A gateway runs on (or beside) one kiosk: it calls the MFA as that kiosk's registered terminal
    (a principal with ``terminal: {channel: kiosk}``), and its browser authenticates to it with a key."""

    host: str = "127.0.0.1"  # the kiosk's own browser: loopback
    # The names (or addresses) clients reach the gateway by, as the Host header gives them, without
    # port; a request naming another is refused 421 HOST_NOT_ALLOWED before anything reads it, so a
    # page whose own name was re-pointed at the gateway's address (DNS rebinding) cannot use it from
    # the kiosk's browser. The default: this machine's loopback names; a deployment reached by
    # other names sets them. Never '*' (refused at load). /healthz answers whatever Host names.
    allowed_hosts: list[str] = ["127.0.0.1", "localhost", "::1"]
    port: int = Field(8090, ge=0, le=65535)
    tenant: str = ""  # the bank whose customers this kiosk serves (required)
    mfa_target: str = ""  # host:port; "" = this deployment's server.mfa endpoint
    mfa_token: str = ""  # the terminal principal's bearer token; "" = the development orchestrator token
    ca_file: Path | None = None  # TLS (and mTLS with cert_file/key_file) towards the MFA
    cert_file: Path | None = None
    key_file: Path | None = None
    deadline_s: float = Field(60.0, gt=0)
    # SHA-256 (hex) of the key the kiosk's browser sends as "Authorization: Bearer <key>"; "" = a
    # key generated at start into <data_dir>/kiosk-key (development).
    client_key_sha256: str = ""
    max_image_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    # Prometheus metrics on http://metrics_host:metrics_port/ (None: none)
    metrics_port: int | None = Field(None, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"
    # Proxies (addresses or CIDRs) whose X-Forwarded-For names the client (its last entry): the
    # rate limit's address bucket is then the client's, not the proxy's. Empty: the peer address,
    # and the header is ignored (uvicorn alone would trust it from 127.0.0.1, where the kiosk's page
    # could set it). Never '*' or a /0 (refused at load): the client would name itself.
    forwarded_allow_ips: list[str] = []
    rate_limit: RateLimitConfig = RateLimitConfig()
    http: HttpLimitsConfig = HttpLimitsConfig()

    @field_validator("allowed_hosts")
    @classmethod
    def _named_hosts(cls, entries: list[str]) -> list[str]:
        if not entries:
            raise ValueError("kiosk.allowed_hosts: no host name, so every request would be refused; name the "
                             "hosts clients reach the gateway by (kiosk.bank-a.internal)")
        names = []
        for entry in entries:
            if entry.strip() == "*":
                raise ValueError("kiosk.allowed_hosts: '*' answers every name, a page of any domain re-pointed "
                                 "at the gateway's address too (DNS rebinding); name the hosts clients use")
            bare = entry.strip().removeprefix("[").removesuffix("]")
            try:
                names.append(str(ipaddress.ip_address(bare)))
                continue
            except ValueError:
                pass
            name = host_name(entry.strip())
            if name is None or ":" in entry:
                raise ValueError(f"kiosk.allowed_hosts: {entry!r} is not a host name or address; name it as a "
                                 "URL does, without scheme or port (kiosk.bank-a.internal)")
            names.append(name)
        return names

    @field_validator("forwarded_allow_ips")
    @classmethod
    def _named_proxies(cls, entries: list[str]) -> list[str]:
        """Addresses or CIDRs, none covering every address: uvicorn then takes the leftmost
        X-Forwarded-For entry (the client's own writing) and any client picks its own bucket."""
        for entry in entries:
            try:
                net = ipaddress.ip_network(entry.strip(), strict=False)
            except ValueError:
                raise ValueError(f"kiosk.forwarded_allow_ips: {entry!r} is not an address or CIDR; name the "
                                 "proxies' addresses (10.244.0.0/16), never '*'") from None
            if net.prefixlen == 0:
                raise ValueError(f"kiosk.forwarded_allow_ips: {entry!r} trusts every address, so any client could "
                                 "name itself in X-Forwarded-For; name the proxies' addresses")
        return entries


class KioskSettings(CommonSettings):
    kiosk: KioskConfig = KioskConfig()
