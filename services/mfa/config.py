"""The MFA service's configuration sections (the ``mfa``, ``clients`` sections of the one settings tree,
services/settings.py), and the part of the tree the MFA service reads."""

from __future__ import annotations

from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, model_validator

from services.common.config import CommonSettings, Section, loopback_host, usable_cores
from services.common.webhook_signature import MAX_SIGNATURES


class SmsConfig(Section):
    """How OTP messages leave: a development sink, or a generic HTTP SMS API."""

    gateway: Literal["dev", "http"] = "dev"
    # dev: JSON lines with the masked number and the text (codes included: development only).
    outbox_file: Path | None = None  # default <data_dir>/sms-outbox.jsonl
    http_url: str = ""  # POST {"to", "text", "sender"} as JSON
    http_token: str = ""  # sent as "Authorization: Bearer ..."; set it from the environment
    sender: str = "BioGate"
    timeout_s: float = Field(5.0, gt=0)  # each attempt in all (services/common/outbound.py)
    retries: int = Field(2, ge=0, le=5)  # after a timeout or a 5xx, with an idempotency key
    backoff_s: float = Field(0.5, ge=0)


class PushConfig(Section):
    """How push confirmations leave: a development sink, or Firebase Cloud Messaging (HTTP v1)."""

    gateway: Literal["dev", "fcm"] = "dev"
    outbox_file: Path | None = None  # dev: default <data_dir>/push-outbox.jsonl
    fcm_project: str = ""
    fcm_base_url: str = "https://fcm.googleapis.com"
    # The service account's JSON key: access tokens obtained and refreshed by google-auth. Or
    # fcm_access_token, a bearer the deployment refreshes itself (set it from the environment).
    fcm_service_account_file: Path | None = None
    fcm_access_token: str = ""
    timeout_s: float = Field(3.0, gt=0)  # the customer waits: fall back rather than hang
    retries: int = Field(1, ge=0, le=3)
    backoff_s: float = Field(0.2, ge=0)

    @model_validator(mode="after")
    def _fcm_usable(self) -> PushConfig:
        if self.gateway == "fcm" and not self.fcm_project:
            raise ValueError("mfa.push.fcm_project must be set when mfa.push.gateway is fcm")
        if self.gateway == "fcm" and not (self.fcm_service_account_file or self.fcm_access_token):
            raise ValueError("mfa.push.gateway fcm needs fcm_service_account_file (the service account's JSON key)"
                             " or fcm_access_token")
        return self


class WebAuthnConfig(Section):
    """The MFA as a WebAuthn relying party (passkeys binding devices and signing captures)."""

    rp_id: str = "localhost"  # the bank's domain the credentials are scoped to
    rp_name: str = "BioGate"
    # Origins clientDataJSON may name: https://<domain>, and android:apk-key-hash:<...> of the app.
    origins: list[str] = ["https://localhost"]
    attestation: Literal["none", "direct"] = "none"  # direct: packed/x5c attestation is requested
    require_user_verification: bool = False  # UV flag (device PIN or biometric unlock) on every use
    timeout_ms: int = Field(120_000, ge=10_000, le=600_000)


class HttpConfig(Section):
    """Standard token verification over HTTP: the decision tokens' JWKS and an OpenID-style
    discovery document, for relying parties verifying with a stock JWT library and a URL."""

    enabled: bool = True
    host: str = "127.0.0.1"  # 0.0.0.0 for relying parties on other hosts (behind the bank's TLS proxy)
    port: int = Field(8053, ge=0, le=65535)  # 0: a port the OS chooses
    # The base URL relying parties reach this endpoint at (https://mfa.bank-a.example behind a proxy);
    # "" = http://host:port. The discovery document names jwks_uri under it.
    public_url: str = ""


class WebhookTarget(Section):
    """One receiver of review events: its URL and the HMAC keys its events are signed with."""

    url: str = ""  # "" = no webhook; http(s)://
    # The active keys, newest first: each request carries one signature per key, so a receiver
    # switches to a new key at its own pace; the old one is removed once it has. From the
    # environment, as JSON: BIOGATE_MFA__REVIEWS__WEBHOOK__SECRETS='["<new>", "<old>"]'.
    secrets: list[SecretStr] | None = None
    # One key, as before rotation was possible (BIOGATE_MFA__REVIEWS__WEBHOOK__SECRET): a list of one.
    secret: SecretStr | None = None

    @model_validator(mode="after")
    def _usable(self) -> WebhookTarget:
        if self.url and not self.url.startswith(("https://", "http://")):
            raise ValueError("the webhook url must be http(s)://")
        if self.secret is not None and self.secrets is not None:
            raise ValueError("set the webhook's secrets (newest first) or its one secret, not both: "
                             "move the secret into secrets")
        if self.secrets is not None and not self.secrets:
            raise ValueError("the webhook's secrets list is empty: name the active secrets, newest first")
        if self.secrets is not None and len(self.secrets) > MAX_SIGNATURES:
            raise ValueError(f"{len(self.secrets)} webhook secrets; at most {MAX_SIGNATURES} (receivers refuse more "
                             "signatures): remove the keys every receiver has moved off")
        keys = self.active_secrets
        for i, key in enumerate(keys):
            if not key:
                raise ValueError(f"webhook secret #{i + 1} (newest first) is empty")
            if len(key) < 16:
                raise ValueError(f"webhook secret #{i + 1} (newest first) is shorter than 16 characters")
            if key in keys[:i]:
                raise ValueError(f"webhook secret #{i + 1} (newest first) repeats an earlier one")
        if self.url and not keys:
            raise ValueError("the webhook secret must be set (16 characters or more) when the url is: "
                             "secrets, newest first")
        return self

    @property
    def active_secrets(self) -> list[str]:
        """The HMAC keys requests are signed with, newest first."""
        if self.secrets is not None:
            return [key.get_secret_value() for key in self.secrets]
        if self.secret is not None and self.secret.get_secret_value():
            return [self.secret.get_secret_value()]
        return []


class ReviewWebhookConfig(WebhookTarget):
    """Where the bank hears of reviews opening and closing: HMAC-SHA256-signed POSTs from an outbox.
    ``url``/``secret`` serve every tenant not in ``tenants``; a deployment serving several banks
    gives each its own receiver there, so that no bank hears of another's reviews or decisions."""

    tenants: dict[str, WebhookTarget] = {}
    timeout_s: float = Field(5.0, gt=0, le=60)
    max_attempts: int = Field(8, ge=1, le=30)  # then the event is abandoned (an error log)
    backoff_s: float = Field(2.0, gt=0)  # before the second attempt, doubled for each one after
    backoff_max_s: float = Field(900.0, gt=0)
    keep_s: int = Field(7 * 86400, ge=3600)  # delivered and abandoned events: `biogate purge` deletes them after this

    def target(self, tenant: str) -> WebhookTarget | None:
        """The receiver of ``tenant``'s events, None when it has none."""
        own = self.tenants.get(tenant, self)
        return own if own.url else None

    @property
    def configured(self) -> bool:
        return bool(self.url) or any(t.url for t in self.tenants.values())


class ReviewsConfig(Section):
    """The human review queue: how long a case waits before it is denied as expired."""

    ttl_s: int = Field(4 * 3600, ge=60, le=30 * 86400)
    sweep_s: float = Field(30.0, gt=0)  # how often overdue reviews are expired and webhooks retried
    webhook: ReviewWebhookConfig = ReviewWebhookConfig()


class IvrStreamConfig(Section):
    """StreamVoiceFactor's limits, tighter than the server's for every client stream (server.stream_*):
    the IVR sends real-time audio, so a pause of more than a few chunks is a stalled call."""

    idle_timeout_s: float = Field(2.0, gt=0)  # the longest pause between two messages
    max_chunk_s: float = Field(0.1, gt=0, le=1.0)  # one chunk's audio (20-100 ms is usual)
    # the whole stream's audio; spoken in real time it must end within server.rpc_timeout_s (30 s)
    max_audio_s: float = Field(20.0, gt=0, le=120.0)
    # The caller's chunks go on to the voice service in blocks of this much audio: every message
    # costs CPU in gRPC and in the voice service's stream reader and conditioner, whatever its size
    # (bench/RESULTS.md). Also how long a real-time caller's chunk waits in the MFA; 0: no blocks.
    max_hold_s: float = Field(0.2, ge=0, le=1.0)


class MfaConfig(Section):
    # <tenant>.yaml policy files; a tenant without its own file gets default_policy.
    policy_dir: Path | None = None  # default <data_dir>/policies
    default_policy: Path = Path(__file__).resolve().parent / "policies" / "default.yaml"
    policy_check_s: float = Field(1.0, ge=0)  # how often a policy file's mtime is looked at
    session_ttl_s: int = Field(600, ge=30, le=3600)
    token_ttl_s: int = Field(120, ge=10, le=900)  # signed decisions are short-lived
    issuer: str = "biogate-mfa"
    signing_keys_file: Path | None = None  # default <data_dir>/keys/mfa-token-keys.json
    signing_key_max_age_s: int = Field(30 * 86400, ge=60)  # rotated automatically after this
    sms: SmsConfig = SmsConfig()
    push: PushConfig = PushConfig()
    webauthn: WebAuthnConfig = WebAuthnConfig()
    http: HttpConfig = HttpConfig()
    reviews: ReviewsConfig = ReviewsConfig()
    ivr_stream: IvrStreamConfig = IvrStreamConfig()
    # http:// to a host other than this machine's loopback would carry the SMS vendor's token, phone
    # numbers and codes, and the signed decisions of webhook bodies, in clear. A deployment whose
    # network encrypts that hop beneath (a service mesh's mTLS sidecar) says so here.
    allow_plain_http: bool = False

    @model_validator(mode="after")
    def _encrypted_off_this_host(self) -> MfaConfig:
        if self.allow_plain_http:
            return self
        hook = self.reviews.webhook
        urls = {"mfa.sms.http_url": self.sms.http_url, "mfa.push.fcm_base_url": self.push.fcm_base_url,
                "mfa.reviews.webhook.url": hook.url,
                **{f"mfa.reviews.webhook.tenants.{t}.url": w.url for t, w in hook.tenants.items()}}
        for field, url in urls.items():
            parts = urlsplit(url)
            if url and parts.scheme != "https" and not loopback_host(parts.hostname or ""):
                raise ValueError(f"{field} sends in clear to {parts.hostname!r}: use https://, or set "
                                 "mfa.allow_plain_http: true where the network encrypts that hop itself")
        return self


class ClientTarget(Section):
    """A gRPC service the MFA orchestrator calls (face, voice)."""

    target: str = ""  # host:port; "" = this deployment's server.<service> endpoint
    token: str = ""  # bearer token of a principal with the service role; "" = the development one
    ca_file: Path | None = None
    cert_file: Path | None = None  # mTLS client certificate
    key_file: Path | None = None
    deadline_s: float = Field(8.0, gt=0)
    retries: int = Field(2, ge=0, le=5)  # idempotent calls only, on UNAVAILABLE
    breaker_failures: int = Field(3, ge=1)  # consecutive failures that open the circuit
    breaker_reset_s: float = Field(15.0, gt=0)  # open this long, then one trial call
    # HTTP/2 connections to the target. The worker processes of a service on one port
    # (server.workers, SO_REUSEPORT), like the pods behind a Kubernetes Service (kube-proxy), get
    # connections, not calls, spread over them at random: one connection keeps every call on one
    # worker of one replica. 0: 4 per usable core of this machine, as a service beside it with
    # server.workers 0 runs one worker per core, and with 4 connections per worker a given worker
    # gets none at most e^-4 (2 %) of the time (both of 2 workers are reached but 1 time in 128).
    # grpc opens a connection at its first call; each costs a socket.
    connections: int = Field(0, ge=0, le=256)

    @property
    def connection_count(self) -> int:
        return self.connections or 4 * usable_cores()


class ClientsConfig(Section):
    face: ClientTarget = ClientTarget()
    voice: ClientTarget = ClientTarget(deadline_s=15.0)


class MfaSettings(CommonSettings):
    """The settings tree as the MFA service reads it."""

    mfa: MfaConfig = MfaConfig()
    clients: ClientsConfig = ClientsConfig()


def mfa_settings(settings: CommonSettings) -> MfaSettings:
    """A process's settings tree as the MFA reads it (its mfa and clients sections)."""
    if not isinstance(settings, MfaSettings):
        raise TypeError("the MFA needs a settings tree with its mfa and clients sections (services/settings.py)")
    return settings
