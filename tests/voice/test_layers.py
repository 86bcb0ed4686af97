"""The service's building blocks: s-norm, cohort files, replay fingerprints and stores, the AASIST
window; and, per channel, genuine fixture speech through every layer of the
service and espeak-ng speech in voices the calibration did not see. The digit recogniser:
test_digits.py."""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from services.common.api.v1 import common_pb2, voice_pb2
from services.voice import attacks, replay, telephone
from services.voice.antispoof import speech_window
from services.voice.cohort import Cohort, CohortError, SNorm
from voice_audio import read, wav_bytes


def unit(v):
    v = np.asarray(v, np.float32)
    return v / np.linalg.norm(v)


def test_snorm_by_hand():
    cohort = np.stack([unit([1, 0, 0]), unit([0, 1, 0]), unit([0, 0, 1]), unit([1, 1, 0])])
    e, p = unit([1, 0, 0]), unit([0, 1, 0])
    s = SNorm(cohort, top_k=2)
    ce = np.sort(cohort @ e)[-2:]  # [0.707, 1]
    cp = np.sort(cohort @ p)[-2:]
    expected = 0.5 * ((0.0 - ce.mean()) / ce.std() + (0.0 - cp.mean()) / cp.std())
    assert s.normalise(0.0, e, p)[0] == pytest.approx(expected, rel=1e-5)
    assert SNorm(cohort, top_k=50).top_k == 4
    with pytest.raises(CohortError):
        SNorm(cohort[:1])


def test_cohort_file_round_trip_and_refusals(tmp_path):
    c = Cohort("0123456789abcdef", "ecapa-voxceleb", {"wideband": np.eye(3, dtype=np.float32)}, "test")
    back = Cohort.load(c.save(tmp_path / "c.npz"))
    assert back.cohort_id == c.cohort_id and np.array_equal(back.family("wideband"), np.eye(3))
    with pytest.raises(CohortError):
        back.family("telephone")
    (tmp_path / "bad.npz").write_bytes(b"not a cohort")
    with pytest.raises(CohortError):
        Cohort.load(tmp_path / "bad.npz")


@pytest.fixture(scope="module")
def clips(voice_dir):
    return [read(p) for p in sorted(voice_dir.glob("libri_*/*-0000.wav"))[:4]] + \
           [read(p) for p in sorted(voice_dir.glob("libri_1688/*.wav"))[1:4]]


def test_replay_fingerprint_survives_channels_and_tells_captures_apart(clips):
    x = clips[0]
    fp = replay.fingerprint(x)
    g711 = attacks.resample(telephone.decode(telephone.encode(x)), 8000, 16000)
    room = attacks.resample(telephone.decode(telephone.encode(attacks.loudspeaker_room(x, rt60_s=0.3, snr_db=20))),
                            8000, 16000)
    assert replay.similarity(replay.fingerprint(g711), fp) > 0.9
    assert replay.similarity(replay.fingerprint(room), fp) > 0.55
    # Part of the capture (the attacker's recording started late) still matches.
    assert replay.similarity(replay.fingerprint(room[len(room) // 3 :]), fp) > 0.55
    others = [replay.similarity(replay.fingerprint(y), fp) for y in clips[1:]]  # incl. the same speaker
    assert max(others) < 0.5
    assert replay.Fingerprint.from_bytes(fp.to_bytes()).values.tobytes() == fp.values.tobytes()


@pytest.fixture(params=["memory", "redis"])
def store(request):
    now = [1000.0]
    if request.param == "memory":
        yield replay.MemoryReplayStore(60, 3, clock=lambda: now[0]), now
        return
    prefix = f"biogate-test:{uuid.uuid4().hex[:10]}"
    url = request.getfixturevalue("redis_url")
    s = replay.RedisReplayStore(url, 60, 3, clock=lambda: now[0], prefix=prefix)
    yield s, now
    keys = list(s.client.scan_iter(f"{prefix}:*"))
    if keys:
        s.client.delete(*keys)


def test_store_retention_cap_and_erase(store):
    s, now = store
    for i in range(5):
        s.add("t", "ps1_a", bytes([i]) * 3)
        now[0] += 1
    assert s.recent("t", "ps1_a") == [bytes([i]) * 3 for i in (2, 3, 4)]  # capped at 3, oldest gone
    assert s.recent("t", "ps1_b") == []
    now[0] += 58.5  # records at 1002 and 1003 are now older than 60 s
    assert s.recent("t", "ps1_a") == [bytes([4]) * 3]
    assert s.erase("t", "ps1_a") == 1 and s.recent("t", "ps1_a") == []


def test_replay_cache_seals_what_it_stores(clips):
    sealed = []

    def seal(binding, data):
        sealed.append(binding.fields())
        return b"S" + data[::-1]

    cache = replay.ReplayCache(replay.MemoryReplayStore(60, 10), seal, lambda b, d: d[1:][::-1],
                               lambda t, s: f"ps1_{t}{s}")
    fp = replay.fingerprint(clips[0])
    cache.remember("t", "s", fp)
    stored = cache.store.recent("t", "ps1_ts")[0]
    assert stored != fp.to_bytes() and sealed[0]["purpose"] == "voice-replay-fingerprint"
    assert cache.best_match("t", "s", fp) == pytest.approx(1.0, abs=1e-3)
    assert cache.best_match("t", "other", fp) == 0.0


def test_speech_window_prefers_speech():
    x = np.arange(100, dtype=np.float32)
    w = speech_window(x, ((60, 90),), 20)
    assert 60 <= w[0] and w[-1] < 90
    assert len(speech_window(x[:5], (), 20)) == 20  # tiled when shorter


# The target for genuine speech through every layer, per channel; measured on all the
# fixtures' probes by bench/voice_genuine_layers.py (bench/RESULTS.md, Voice accuracy).
GENUINE_PASS_RATE = 0.95
MULAW = common_pb2.AudioFormat(encoding=common_pb2.AUDIO_ENCODING_MULAW, sample_rate_hz=8000)
CHANNELS = {"wideband": voice_pb2.VOICE_CHANNEL_WIDEBAND, "telephone": voice_pb2.VOICE_CHANNEL_TELEPHONE}


def channel_audio(x, family: str) -> common_pb2.Audio:
    if family == "telephone":
        return common_pb2.Audio(data=telephone.encode(x, 16000), format=MULAW)
    return common_pb2.Audio(data=wav_bytes(x, 16000))


def verify_as_caller(voice_service, ref, x, family: str):
    """The app sends the recording in one call; the IVR streams 20 ms mu-law chunks and is answered
    once the target net speech has arrived."""
    if family == "wideband":
        return voice_service.stub.Verify(voice_pb2.VerifyVoiceRequest(
            subject=ref, audio=channel_audio(x, family), channel=CHANNELS[family]))
    data = telephone.encode(x, 16000)
    header = voice_pb2.StreamVerifyVoiceRequest.Header(subject=ref, format=MULAW, channel=CHANNELS[family])
    return voice_service.stub.StreamVerify(iter([voice_pb2.StreamVerifyVoiceRequest(header=header)] + [
        voice_pb2.StreamVerifyVoiceRequest(chunk=data[i : i + 160]) for i in range(0, len(data), 160)] + [
        voice_pb2.StreamVerifyVoiceRequest(end=voice_pb2.StreamVerifyVoiceRequest.End(audio_bytes=len(data)))]))


def enrol_speaker(voice_service, voice_dir, name: str, family: str):
    """A new subject enrolled with the speaker's two longest recordings -> (ref, the other recordings)."""
    files = sorted((voice_dir / name).glob("*.wav"), key=lambda p: (-p.stat().st_size, p.name))
    tenant, subject = "bank-a", f"genuine-{uuid.uuid4().hex[:8]}"
    voice_service.consent(tenant, subject)
    ref = common_pb2.SubjectRef(tenant_id=tenant, subject_id=subject)
    voice_service.stub.Enroll(voice_pb2.EnrollVoiceRequest(
        subject=ref, utterances=[channel_audio(read(p), family) for p in files[:2]], channel=CHANNELS[family]))
    return ref, files[2:]


@pytest.mark.parametrize("family", list(CHANNELS))
def test_genuine_fixture_speech_passes_every_layer(voice_service, voice_dir, family):
    """Every speaker on each channel: enrol the two longest recordings, verify the next two as the
    app or the IVR would, with AASIST, the replay cache and the channel's calibrated threshold. A
    refused enrolment counts its two probes as refused."""
    from concurrent.futures import ThreadPoolExecutor

    import grpc

    from services.common.errors import details_of

    outcomes: list[bool] = []
    refusals: list[tuple] = []
    enrolled = []
    for name in sorted(p.name for p in voice_dir.iterdir() if p.is_dir()):
        try:
            enrolled.append((name, *enrol_speaker(voice_service, voice_dir, name, family)))
        except grpc.RpcError as err:
            outcomes += [False, False]
            refusals.append((name, "enrolment", details_of(err)["reason"]))

    def verify(speaker):  # a speaker's probes in order
        name, ref, probes = speaker
        return [(name, probe, verify_as_caller(voice_service, ref, read(probe), family)) for probe in probes[:2]]

    # Two speakers' probes at a time: the model calls run one thread each, so one caller leaves a
    # core idle. (The enrolments stay one at a time: two long ones at once on a loaded machine can
    # exceed the admission's estimate of the 30 s deadline.)
    with ThreadPoolExecutor(2) as pool:
        for name, probe, r in (v for vs in pool.map(verify, enrolled) for v in vs):
            outcomes.append(r.match)
            if not r.match:
                refusals.append((name, probe.name, [c.code for c in r.reasons], round(r.score, 3), round(r.threshold, 3)))
    rate = float(np.mean(outcomes))
    print(f"\ngenuine through every layer, {family}: {rate:.1%} of {len(outcomes)} accepted; refused: {refusals}")
    assert rate >= GENUINE_PASS_RATE, refusals


@pytest.mark.parametrize("family", list(CHANNELS))
def test_espeak_speech_is_refused_on_both_channels(voice_service, voice_dir, family):
    """Synthetic speech against a genuine template, as the app or the IVR sends it, at the channel's
    AASIST threshold, in sentences and voices that the calibration set does not hold. None is taken
    for the customer (the speaker check and AASIST together); AASIST alone refuses at least half: its
    records claim 24-29 % APCER on unseen espeak-ng voices (bench/RESULTS.md), not the 5 % of their
    fits, so "one of six may pass" was not a claim they support (telephone, refit with the cut: 4 of 6
    refused; the record before it: 5 of 6)."""
    ref, _ = enrol_speaker(voice_service, voice_dir, "libri_2414", family)
    texts = ("I forgot my online banking password and need to reset it before Friday.",
             "Please read me the last five transactions on my current account.",
             "I want to increase the daily limit on my debit card to two thousand.",
             "Can you confirm that my salary has arrived in my account this month?",
             "My new address is twenty one Station Road, and my postcode has changed.",
             "I would like to speak to someone about a mortgage payment holiday.")
    voices = ("en-us+m2", "en+f4", "en+m4", "en-us+klatt4", "en+Alicia", "en-us+m6")
    assert not set(voices) & set(attacks.VOICES) and not set(texts) & set(attacks.SENTENCES)
    refused, accepted = [], []
    for text, voice in zip(texts, voices, strict=True):
        r = verify_as_caller(voice_service, ref, attacks.espeak(text, voice, speed=150), family)
        refused.append(not r.match and not r.spoof_passed)
        accepted.append(r.match and r.spoof_passed)
    print(f"\nespeak-ng speech refused as synthetic, {family}: {sum(refused)} of {len(refused)}")
    assert not any(accepted)
    assert sum(refused) >= len(refused) // 2


def test_long_audio_is_embedded_in_segments(pipeline, voice_dir):
    """Over max_embed_s the clip is embedded in equal segments and the embeddings averaged
    (memory stays bounded); the result is the same speaker's embedding."""
    from dataclasses import replace

    xs = [read(p) for p in sorted((voice_dir / "libri_1688").glob("*.wav"))[:6]]
    long = np.concatenate(xs)
    assert len(long) > 25 * 16000
    prepared = pipeline.prepare_samples(long, 16000)
    short = pipeline.prepare_samples(xs[0], 16000)
    segmented = pipeline.embed([prepared, short])
    assert np.allclose(np.linalg.norm(segmented, axis=1), 1.0, atol=1e-5)
    whole_cfg = replace(pipeline.config, max_embed_s=1e6)
    from services.voice.pipeline import VoicePipeline

    whole = VoicePipeline(whole_cfg, vad=pipeline.vad, embedder=pipeline.embedder).embed([prepared])[0]
    assert float(segmented[0] @ whole) > 0.95 and float(segmented[0] @ segmented[1]) > 0.6


def test_calibration_must_be_for_the_score_the_service_computes():
    from services.common.config import PROJECT_ROOT
    from services.voice.config import VoiceConfig
    from services.common.modality.calibration import Calibrations, NotCalibrated
    from services.voice.engine import antispoof_cut, antispoof_window_s, channel_target_fmr, pad_score_name

    cal = Calibrations(PROJECT_ROOT / "models" / "manifest.yaml")
    cfg = VoiceConfig()
    for family, channel in cfg.calibration_channels.items():
        assert 0 < cal.threshold("ecapa-voxceleb", channel, channel_target_fmr(cfg, family), "cosine") < 1
        score = pad_score_name(antispoof_window_s(cfg, family), antispoof_cut(cfg, family))
        assert cal.threshold("aasist", channel, cfg.antispoof_target_apcer, score) < 0
    assert channel_target_fmr(cfg, "telephone") == 1e-2 and channel_target_fmr(cfg, "wideband") == 1e-3
    with pytest.raises(NotCalibrated, match="speech3s"):  # the telephone threshold is for the 4.04 s window
        cal.threshold("aasist", "telephony-8k", 0.05, "bonafide_log_odds@speech3s")
    with pytest.raises(NotCalibrated, match="asnorm50"):
        cal.threshold("ecapa-voxceleb", "wideband", 1e-3, "asnorm50:0123456789abcdef")
    with pytest.raises(NotCalibrated):
        cal.threshold("ecapa-voxceleb", "wideband", 0.2, "cosine")  # no such operating point
    with pytest.raises(NotCalibrated):
        cal.threshold("ecapa-voxceleb", "mobile-selfie", 1e-3)


def test_batcher_pool_batches_concurrent_requests_and_spreads_them():
    import threading
    import time as _time

    from services.voice.engine import BatcherPool

    seen = []

    def slow(items):
        seen.append((threading.current_thread().name, len(items)))
        _time.sleep(0.05)
        return [x * 2 for x in items]

    pool = BatcherPool(slow, workers=2, max_batch=8, wait_ms=20, name="t")
    try:
        out = [None] * 12
        threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, pool.submit_many([i], timeout=5)[0]))
                   for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        pool.close()
    assert out == [2 * i for i in range(12)]
    assert pool.items == 12 and pool.batches < 12  # several requests shared one call
    assert len({name for name, _ in seen}) == 2  # both workers served


def test_cpu_engine_runs_the_models_inline_with_the_scores_of_single_calls(voice_service, voice_dir):
    """On the CPU (micro_batching "auto") each request runs ECAPA and AASIST on its own thread: more
    concurrent requests than cores give bit for bit the embeddings and AASIST scores of one call at
    a time, i.e. the threads change the scheduling only (bench/RESULTS.md, issue 13, voice on the CPU)."""
    import threading

    from services.common.batching import Inline

    eng = voice_service.engine
    assert isinstance(eng.embed_batcher, Inline) and isinstance(eng.synthetic_batcher, Inline)
    files = [sorted((voice_dir / name).glob("*.wav"))[0] for name in ("libri_1688", "libri_2414", "libri_3005")]
    prepared = [eng.pipeline.prepare_samples(read(p)[: 3 * 16000], 16000) for p in files] * 2
    alone = [(eng.pipeline.embed([p])[0], eng.synthetic["wideband"].score(p)) for p in prepared]
    together: list = [None] * len(prepared)

    def request(i: int) -> None:
        together[i] = (eng.embed([prepared[i]])[0], eng.synthetic_check(prepared[i], "wideband", True).value)

    threads = [threading.Thread(target=request, args=(i,)) for i in range(len(prepared))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (e1, s1), (e2, s2) in zip(alone, together, strict=True):
        assert np.array_equal(e1, e2) and s1 == s2
