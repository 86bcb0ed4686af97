import itertools

import numpy as np
import pytest

from services.voice import g711, telephone
from services.voice.ingest import AudioError, AudioFormat, Encoding, ErrorCode
from services.voice.pipeline import VoicePipeline
from voice_audio import read, tone, wav_bytes

MULAW = AudioFormat(Encoding.MULAW, 8000)


def chunks(data: bytes, size: int):
    return (data[i : i + size] for i in range(0, len(data), size))


@pytest.fixture(scope="module")
def speech(voice_dir):
    return read(voice_dir / "libri_3005" / "3005-163389-0000.wav")  # 8.4 s, 7 s of net speech


def test_analyse_a_wav_fixture(pipeline, speech):
    s = pipeline.analyse(wav_bytes(speech, 16000))
    assert s.embedding.shape == (192,) and np.linalg.norm(s.embedding) == pytest.approx(1.0, abs=1e-5)
    assert s.channel == "wideband" and 6.0 < s.net_speech_s < 8.4
    assert s.prepared.quality.issues == ()


def test_mulaw_stream_in_20ms_chunks_equals_the_unary_call(pipeline, speech):
    codes = telephone.encode(speech)
    unary = pipeline.analyse(codes, MULAW)
    stream = pipeline.stream(MULAW)
    for c in chunks(codes, 160):  # 20 ms of 8 kHz mu-law
        stream.feed(c)
    streamed = stream.sample()
    assert unary.channel == streamed.channel == "telephone"
    assert streamed.net_speech_s == unary.net_speech_s
    assert np.array_equal(streamed.embedding, unary.embedding)


def test_stream_is_ready_once_enough_speech_arrived(pipeline, speech):
    codes = telephone.encode(speech)
    stream = pipeline.stream(MULAW)
    sent = 0
    for c in chunks(codes, 400):  # 50 ms
        sent += len(c)
        if stream.feed(c):
            break
    assert stream.ready and stream.net_speech_s >= pipeline.config.stream_target_net_speech_s
    assert sent < len(codes)  # decided before the end of the audio
    early = stream.sample()
    # the decision rests on exactly the audio received: the unary call on that prefix agrees
    prefix = pipeline.analyse(codes[:sent], MULAW)
    assert np.array_equal(early.embedding, prefix.embedding)
    assert float(early.embedding @ pipeline.analyse(codes, MULAW).embedding) > 0.9


def test_linear16_stream_with_odd_chunk_sizes(pipeline, speech):
    raw = (speech * 32767).astype("<i2").tobytes()
    fmt = AudioFormat(Encoding.LINEAR16, 16000)
    stream = pipeline.stream(fmt)
    for c in chunks(raw, 1001):
        stream.feed(c)
    assert np.array_equal(stream.sample().embedding, pipeline.analyse(raw, fmt).embedding)


def test_two_hours_streamed_is_cut_at_the_limit(pipeline):
    noise = np.random.default_rng(0).normal(0, 300, 800).astype(np.int16)  # 100 ms, no speech
    chunk = g711.ulaw_encode(noise).tobytes()
    stream = pipeline.stream(MULAW)
    with pytest.raises(AudioError) as info:
        for c in itertools.repeat(chunk, 2 * 3600 * 10):  # 2 hours, generated lazily
            stream.feed(c)
    assert info.value.code is ErrorCode.TOO_LONG
    assert stream.duration_s <= pipeline.config.max_duration_s


def test_too_little_speech_reports_the_measured_seconds(pipeline, speech):
    x = np.concatenate([speech[16000:16000 + 12000], np.zeros(32000, np.float32)])  # 0.75 s said
    with pytest.raises(AudioError) as info:
        pipeline.analyse(wav_bytes(x, 16000))
    err = info.value
    assert err.code is ErrorCode.LOW_NET_SPEECH and err.status == "FAILED_PRECONDITION"
    assert 0.2 < float(err.details["net_speech_s"]) < pipeline.config.min_net_speech_verify_s
    assert f"{err.details['net_speech_s']:.2f} s" in err.message


def test_short_enrolment_utterances_add_up(pipeline, speech):
    """An enrolment utterance needs the verify minimum only; the enrolment needs its total over the
    utterances (services/voice/enrolment.py): several short ones pass where one alone does not."""
    from services.voice.config import VoiceConfig
    from services.voice.enrolment import EnrolmentRefused, check_total_speech

    cfg = VoiceConfig()
    assert cfg.min_net_speech_enroll_s == pipeline.config.min_net_speech_enroll_s == cfg.min_net_speech_verify_s
    parts = [pipeline.prepare(wav_bytes(speech[int(a * 16000):int((a + 1.9) * 16000)], 16000), purpose="enroll")
             for a in (0.0, 2.0, 4.0, 6.0)]
    assert all(cfg.min_net_speech_enroll_s <= p.net_speech_s < cfg.min_total_net_speech_enroll_s for p in parts)
    with pytest.raises(EnrolmentRefused) as info:
        check_total_speech(parts[:1], cfg)
    assert info.value.code == "LOW_NET_SPEECH" and info.value.metadata["min_net_speech_s"] == "4"
    assert sum(p.net_speech_s for p in parts) >= cfg.min_total_net_speech_enroll_s
    check_total_speech(parts, cfg)
    with pytest.raises(AudioError) as err:  # under the per-utterance minimum: refused as it is prepared
        pipeline.prepare(wav_bytes(np.concatenate([speech[16000:16000 + 9000], np.zeros(16000, np.float32)]), 16000),
                         purpose="enroll")
    assert err.value.code is ErrorCode.LOW_NET_SPEECH


@pytest.mark.parametrize("case,code", [("tone", ErrorCode.NO_SPEECH), ("dtmf", ErrorCode.NO_SPEECH),
                                       ("silence", ErrorCode.SILENCE), ("empty", ErrorCode.EMPTY_AUDIO)])
def test_non_speech_streams(pipeline, case, code):
    signal = {"tone": tone([440], 3.0, 8000), "silence": np.zeros(24000, np.float32),
              "dtmf": np.concatenate([tone([852, 1477], 0.2, 8000), np.zeros(800, np.float32)] * 10),
              "empty": np.zeros(0, np.float32)}[case]
    stream = pipeline.stream(MULAW)
    for c in chunks(g711.ulaw_encode(np.round(signal * 32767)).tobytes(), 160):
        assert not stream.feed(c)
    with pytest.raises(AudioError) as info:
        stream.finish()
    assert info.value.code is code


def test_batched_embedding_matches_single(pipeline, speech, voice_dir):
    other = read(voice_dir / "speechbrain_spk1" / "spk1_snt1.wav")
    prepared = [pipeline.prepare(wav_bytes(x, 16000)) for x in (speech, other, speech[:48000])]
    batch = pipeline.embed(prepared)
    for row, p in zip(batch, prepared, strict=True):
        assert np.allclose(row, pipeline.embed([p])[0], atol=1e-5)


def test_speechbrain_backend_gives_the_same_scores(voice_models, pipeline, speech, tmp_path):
    from services.voice.ecapa import EcapaSpeechBrain

    torch_pipe = VoicePipeline(pipeline.config, vad=pipeline.vad,
                               embedder=EcapaSpeechBrain(voice_models.ecapa_dir, savedir=tmp_path))
    data = wav_bytes(speech[:48000], 16000)
    assert float(torch_pipe.analyse(data).embedding @ pipeline.analyse(data).embedding) > 0.99999
