"""deploy/biogate.example.yaml shows every setting of the typed tree (services/settings.py) a
bank's operations team sets or must know of, or the setting is in NOT_SHOWN below with the reason
it is left out. A setting added to the tree and to neither fails here, so the example cannot fall
behind the code again (audit.key_check_s, audit.anchor_max_age_s, storage.migration_lock_*_s and
keys.pkcs11.reconnect_interval_s / health_check_s once did)."""

from __future__ import annotations

import yaml

from services.common.config import PROJECT_ROOT
from tests.deploy.config_paths import given, settings

EXAMPLE = PROJECT_ROOT / "deploy" / "biogate.example.yaml"

# Left out of the example on purpose, each group with its reason. A setting is named here by its
# full path: a new one in the same section still has to be placed.
NOT_SHOWN: dict[str, str] = {
    # the embedded defaults' file keys and SQLite: the example keeps every key in the HSM and the
    # data in PostgreSQL
    "storage.sqlite_synchronous keys.keyring_file keys.kms audit.signing_key_file mfa.signing_keys_file":
        "file-backend or SQLite only",
    # secrets come from the environment (the file's header), never the YAML
    "mfa.sms.http_token mfa.push.fcm_access_token mfa.reviews.webhook.secret mfa.reviews.webhook.secrets "
    "kiosk.mfa_token kiosk.client_key_sha256 "
    "clients.face.token clients.voice.token": "secrets: from the environment",
    # the development gateways' sinks and a test double's address
    "mfa.sms.outbox_file mfa.push.outbox_file mfa.push.fcm_base_url": "development or test only",
    # where the image keeps what it ships; a deployment does not move them
    "models.manifest models.cache_dir models.downloads_dir mfa.default_policy mfa.policy_dir":
        "paths inside the image or under data_dir",
    # derived from other settings, or internal to the server, documented beside them in
    # services/common/config.py
    "server.face.workers server.voice.workers server.mfa.workers server.max_workers server.gc_freeze_after_warm_up "
    "server.admission.concurrency server.admission.ewma_alpha keys.pkcs11.label_prefix":
        "derived or internal: the defaults fit (comments beside server.workers and admission in the example)",
    # the kiosk gateway's section: deploy/k8s/base/biogate.yaml configures it (README, "Kiosk")
    "kiosk.host kiosk.allowed_hosts kiosk.port kiosk.tenant kiosk.mfa_target kiosk.ca_file kiosk.cert_file kiosk.key_file "
    "kiosk.deadline_s kiosk.max_image_bytes kiosk.metrics_port kiosk.metrics_host kiosk.forwarded_allow_ips "
    "kiosk.rate_limit.enabled kiosk.rate_limit.store kiosk.rate_limit.capacity kiosk.rate_limit.refill_per_s "
    "kiosk.rate_limit.device_header kiosk.rate_limit.max_clients kiosk.rate_limit.key_prefix "
    "kiosk.rate_limit.ipv6_prefix_length kiosk.http.max_connections_per_ip "
    "kiosk.http.head_timeout_s kiosk.http.body_timeout_s kiosk.http.keep_alive_s kiosk.http.linger_s "
    "kiosk.http.max_connections kiosk.http.max_frames": "the kiosk gateway: deploy/k8s/base/biogate.yaml",
    # models, operating points and their tuning: calibrated or measured (bench/RESULTS.md), each
    # documented in services/face/config.py and services/voice/config.py; changed only with an
    # evaluation (README, "Measuring accuracy and speed")
    "face.detector face.embedder face.liveness face.calibration_channel face.target_fmr face.liveness_target_apcer "
    "face.liveness_box face.second_face_ratio face.rival_min_sharpness_ratio face.max_images face.identify_max_k "
    "face.batch_max face.batch_wait_ms face.micro_batching face.detector_canvas face.jpeg_decoder "
    "face.intra_op_threads face.opencv_threads face.calibration_check_s face.gallery_check_s "
    "face.gallery_full_check_s face.challenge.moves face.challenge.min_frames face.challenge.max_frames "
    "face.challenge.turn_deg face.challenge.tilt_deg face.challenge.neutral_deg face.challenge.min_frame_gap_ms "
    "face.challenge.max_frame_gap_ms face.challenge.min_move_ms face.challenge.identity_min_cosine "
    "voice.embedder voice.vad voice.antispoof voice.digits voice.antispoof_window_s "
    "voice.antispoof_window_s_by_channel voice.antispoof_cut_digital_silence voice.antispoof_batch_max "
    "voice.antispoof_target_apcer voice.target_fmr voice.target_fmr_by_channel voice.calibration_channels "
    "voice.score_normalisation voice.cohort_file voice.snorm_top_k voice.min_utterances voice.max_utterances "
    "voice.min_net_speech_enroll_s voice.min_total_net_speech_enroll_s voice.min_net_speech_verify_s "
    "voice.stream_target_net_speech_s voice.max_duration_s voice.max_embed_s voice.max_batch_audio_s "
    "voice.challenge_digits voice.challenge_max_digit_errors voice.replay_key_prefix voice.replay_max_per_subject "
    "voice.replay voice.replay_target_fmr voice.batch_max voice.batch_wait_ms voice.max_pad_ratio "
    "voice.ecapa_device_features voice.ecapa_io_binding voice.ecapa_frame_buckets voice.antispoof_dtype "
    "voice.antispoof_compile voice.antispoof_compile_backend voice.antispoof_pad_batches voice.micro_batching "
    "voice.inference_workers voice.intra_op_threads voice.calibration_check_s":
        "models, operating points and their tuning: calibrated or measured defaults",
}


def not_shown() -> dict[str, str]:
    return {path: reason for paths, reason in NOT_SHOWN.items() for path in paths.split()}


def test_the_example_shows_every_setting_or_says_why_not():
    shown = set(given(yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))))
    missing = [s for s in settings() if s not in shown and s not in not_shown()]
    assert not missing, (f"settings neither in {EXAMPLE.name} nor in NOT_SHOWN: {missing}; add each to the example "
                         "(with a comment where its meaning is not plain), or to NOT_SHOWN with the reason")


def test_every_setting_left_out_exists_and_is_not_also_shown():
    every = set(settings())
    shown = set(given(yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))))
    assert sorted(set(not_shown()) - every) == []  # a renamed or removed setting leaves the list too
    assert sorted(set(not_shown()) & shown) == []

