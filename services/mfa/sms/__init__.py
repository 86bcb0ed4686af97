"""SMS gateways: a development sink and a generic HTTP API adapter."""

from __future__ import annotations

from services.mfa.config import MfaSettings

from .base import SmsError, SmsGateway
from .dev import DevSmsSink
from .http import HttpSmsGateway


def outbox_path(settings: MfaSettings):
    return settings.mfa.sms.outbox_file or settings.data_dir / "sms-outbox.jsonl"


def open_gateway(settings: MfaSettings) -> SmsGateway:
    cfg = settings.mfa.sms
    if cfg.gateway == "http":
        return HttpSmsGateway(cfg.http_url, cfg.http_token, cfg.sender, cfg.timeout_s, cfg.retries, cfg.backoff_s)
    return DevSmsSink(outbox_path(settings))


__all__ = ["DevSmsSink", "HttpSmsGateway", "SmsError", "SmsGateway", "open_gateway", "outbox_path"]
