"""Push gateways for confirmations: a development sink and Firebase Cloud Messaging (HTTP v1)."""

from __future__ import annotations

from services.mfa.config import MfaSettings

from .base import PushError, PushGateway
from .dev import DevPushSink
from .fcm import FcmPushGateway, service_account_tokens


def outbox_path(settings: MfaSettings):
    return settings.mfa.push.outbox_file or settings.data_dir / "push-outbox.jsonl"


def open_push_gateway(settings: MfaSettings) -> PushGateway:
    cfg = settings.mfa.push
    if cfg.gateway == "fcm":
        token = (service_account_tokens(cfg.fcm_service_account_file, cfg.timeout_s)
                 if cfg.fcm_service_account_file else cfg.fcm_access_token)
        return FcmPushGateway(cfg.fcm_project, token, cfg.fcm_base_url, cfg.timeout_s, cfg.retries, cfg.backoff_s)
    return DevPushSink(outbox_path(settings))


__all__ = ["DevPushSink", "FcmPushGateway", "PushError", "PushGateway", "open_push_gateway", "outbox_path",
           "service_account_tokens"]
