"""The voice service's configuration sections (the ``voice`` section of the one settings tree,
services/settings.py), and the part of the tree the voice service reads."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field

from services.common.config import CommonSettings, Section, VerifyLimit

ChannelFamily = Literal["wideband", "telephone"]  # a template's channel family


class VoiceTenantPolicy(Section):
    """Per-tenant overrides of the voice service's defaults (unset: the service-wide value)."""

    target_fmr: float | None = Field(None, gt=0, lt=1)  # must be a calibrated operating point
    synthetic_speech_check: bool = True  # False: no AASIST layer for this tenant (replay and digits stay)
    # None: the service's require_challenge. False: a Verify without a digit challenge is decided
    # text-independently (evaluation tenants; a replayed recording is then only met by the replay cache).
    require_challenge: bool | None = None
    verify_limit: VerifyLimit | None = None  # None: the service's


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
    antispoof_window_s_by_channel: dict[ChannelFamily, Annotated[float, Field(ge=1.0, le=4.04)]] = {
        "telephone": 4.04}
    # Channel families whose clips have digital silence (runs >= 20 ms within one PCM-16 step of zero)
    # cut out before the AASIST window is placed; the score is then "...-zerocut", which needs a record
    # fitted with the cut (bench/voice_antispoof_refit.py; bench/RESULTS.md, "AASIST refitted with the cut").
    # Telephone: its refit passed the ship rule (check APCER 57/240 vs 70/240); wideband's did not.
    antispoof_cut_digital_silence: tuple[ChannelFamily, ...] = ("telephone",)
    antispoof_batch_max: int = Field(1, ge=1, le=64)  # AASIST windows per pass: ~170 MB each on CPU; raise on a GPU
    antispoof_target_apcer: float = Field(0.05, gt=0, lt=1)  # a calibrated operating point (RESULTS.md)
    target_fmr: float = Field(1e-3, gt=0, lt=1)  # a calibrated operating point
    # Per template channel family, instead of target_fmr (a tenant's own target_fmr overrides both).
    # Telephone: FMR 1e-2; at 1e-3 the speaker check alone refused 6.7 % of the fixtures' genuine
    # pairs. The MFA weighs the response's LLR against each action's evidence requirement, which
    # the match flag does not change (bench/RESULTS.md, Voice accuracy).
    target_fmr_by_channel: dict[ChannelFamily, Annotated[float, Field(gt=0, lt=1)]] = {
        "telephone": 1e-2}
    # Calibration channel of the manifest for each template channel family.
    calibration_channels: dict[ChannelFamily, str] = {"wideband": "wideband", "telephone": "telephony-8k"}
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
    # Each retained capture is one comparison: a fresh capture is refused as a replay with probability
    # up to replay_max_per_subject x the point's false-replay rate (20 x 5e-4 = 1 %; 20 x the held-out
    # 9.1e-4 = 1.8 %). The old fixed cut 0.55 took 0.27-0.46 % of pairs of one person's different digit
    # answers for replays: with 100 retained, an estimated ~30 % of a regular caller's answers
    # (bench/RESULTS.md, "Replay cache calibrated").
    replay_max_per_subject: int = Field(20, ge=1)
    replay: str = "replay-envelope-v1"  # the manifest entry whose calibration gives the cache's threshold
    # The cache's operating point: the rate at which one comparison of two different captures is taken
    # for a replay; its threshold comes from the entry's calibration record (telephone-band channel).
    replay_target_fmr: float = Field(5e-4, gt=0, lt=1)
    batch_max: int = Field(32, ge=1, le=256)
    batch_wait_ms: float = Field(2.0, ge=0, le=50)
    max_pad_ratio: float = Field(0.0, ge=0)  # > 0 pads unequal clips into one ECAPA batch (GPU)
    # GPU paths (issue 13), each also run on the CPU device by tests/voice/test_gpu_paths.py. None:
    # on where the model runs on CUDA, off on the CPU (the CPU defaults keep the calibrated scores).
    ecapa_device_features: bool | None = None  # Fbank of a batch in one pass on ECAPA's device (ecapa.py)
    ecapa_io_binding: bool | None = None  # onnxruntime IO binding for ECAPA, device tensors read in place
    # ECAPA batches padded to a grid of frame counts (ratio max_pad_ratio): few shapes on CUDA, but a
    # clip alone is padded too (cosine 0.9915 for a 1.2 s clip, 12 %): off until an EER run with it.
    ecapa_frame_buckets: bool = False
    # AASIST under bf16 autocast: max |log-odds change| 0.085 on fixture windows (bench/RESULTS.md);
    # not chosen on CUDA by itself, since the shipped thresholds are float32 calibrations.
    antispoof_dtype: Literal["float32", "bfloat16"] = "float32"
    # torch.compile of AASIST (1.3x eager on an H200, ../shared/docs/GPU.md), one compilation per
    # window length and batch bucket at warm-up: about 4 min for one shape on this CPU, unmeasured
    # through the service on a GPU, so not chosen by itself. "eager" traces without compiling.
    antispoof_compile: bool = False
    antispoof_compile_backend: Literal["inductor", "eager"] = "inductor"
    # Batches padded to powers of two up to antispoof_batch_max, so that with the fixed windows no
    # new shape is met after warm-up; None: on CUDA, and wherever AASIST is compiled.
    antispoof_pad_batches: bool | None = None
    # "auto": ECAPA and AASIST micro-batched where they run on an accelerator; on the CPU each request
    # runs them on its own thread (services.common.batching.Inline): as many model runs as admitted
    # calls (admission.concurrency = cores), batch 1 whatever the concurrency, no hand-offs between
    # threads (bench/RESULTS.md, issue 13, voice on the CPU).
    micro_batching: Literal["auto", "on", "off"] = "auto"
    # ECAPA and AASIST runs at a time where they run inline (micro_batching "auto" on the CPU), on as
    # many threads of their own: each run holds ~170 MB (AASIST) while it lasts, and each thread that
    # ran one keeps its own share, so admitted calls beyond it wait for a run to end (metric
    # biogate_model_runs_waiting). None: one per call the process admits, at most INLINE_MODEL_RUNS_MAX
    # (see inline_model_runs()). More cores per process than that: run more processes (server.workers).
    max_inline_model_runs: int | None = Field(None, ge=1, le=256)
    inference_workers: int = Field(2, ge=1, le=64)  # micro-batchers per batched model (where micro-batched)
    # Digit recognisers: CTranslate2 workers sharing one copy of Whisper's weights, on the CPU wherever
    # ECAPA and AASIST run, ~50 MB of working memory each. Fewer than the calls a process admits at a
    # time, and admitted calls queue for one (~200 ms of CPU each). None: one per admitted call, at
    # most DIGIT_RECOGNISERS_MAX (see digit_recognisers()).
    digit_recognisers: int | None = Field(None, ge=1, le=64)
    intra_op_threads: int = Field(1, ge=0)  # per model call (torch and ONNX Runtime); 0: their default
    calibration_check_s: float = Field(1.0, ge=0)  # how often the manifest's mtime is looked at
    verify_limit: VerifyLimit = VerifyLimit()  # per subject; a tenant's own overrides it
    tenants: dict[str, VoiceTenantPolicy] = {}


class VoiceSettings(CommonSettings):
    """The settings tree as the voice service reads it."""

    voice: VoiceConfig = VoiceConfig()


def voice_config(settings: CommonSettings) -> VoiceConfig:
    """The voice section of a process's settings tree (the defaults where the tree has none)."""
    return settings.voice if isinstance(settings, VoiceSettings) else VoiceConfig()


# The default's cap: one process on 16 cores would admit 16 calls, and 16 recognisers would take the
# voice process from ~1.7 GB to ~2.4 GB (bench/RESULTS.md, "Voice digit recognisers: count and
# memory"); 4 add ~100 MB to the 2-CPU pod's 2. At ~200 of a challenge Verify's ~930 ms of CPU, 16
# busy calls keep ~3.4 recognising on average: with many more slots, set it explicitly (~50 MB each).
DIGIT_RECOGNISERS_MAX = 4


def digit_recognisers(settings: CommonSettings) -> int:
    """voice.digit_recognisers, or (None) as many as a voice process admits calls at a time, at most
    DIGIT_RECOGNISERS_MAX."""
    own = voice_config(settings).digit_recognisers
    if own is not None:
        return own
    server = settings.server
    return min(DIGIT_RECOGNISERS_MAX, server.admission.slots_per_process(server.processes("voice")))


# The default's cap, for memory: one process with 16 admitted calls ran 16 AASIST windows at once and
# peaked at 4.0 GB; with the runs on 4 threads of their own its 16 calls peaked at 1.6-1.8 GB (digit
# challenges included), on 2 at 1.4 GB (bench/RESULTS.md, "Voice memory against admitted calls";
# limit 2 GB per process).
INLINE_MODEL_RUNS_MAX = 4


def inline_model_runs(settings: CommonSettings) -> int:
    """voice.max_inline_model_runs, or (None) as many as a voice process admits calls at a time, at
    most INLINE_MODEL_RUNS_MAX."""
    own = voice_config(settings).max_inline_model_runs
    if own is not None:
        return own
    server = settings.server
    return min(INLINE_MODEL_RUNS_MAX, server.admission.slots_per_process(server.processes("voice")))
