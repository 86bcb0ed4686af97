"""The kiosk gateway's configuration (the ``kiosk`` section of the one settings tree)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from services.common.config import CommonSettings, Section


class KioskConfig(Section):
    """A gateway runs on (or beside) one kiosk: it calls the MFA as that kiosk's registered terminal
    (a principal with ``terminal: {channel: kiosk}``), and its browser authenticates to it with a key."""

    host: str = "127.0.0.1"  # the kiosk's own browser: loopback
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


class KioskSettings(CommonSettings):
    kiosk: KioskConfig = KioskConfig()
