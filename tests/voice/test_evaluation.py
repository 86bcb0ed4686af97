import pytest

from services.common.config import PROJECT_ROOT
from services.settings import load_config
from services.common.evaluation.runner import run_verification
from services.common.evaluation.scorers import Failure, ScorerOptions
from services.common.evaluation.trials import read_trials
from services.voice.evaluation import VoiceVerificationScorer, make_verification_scorer, parse_channel


def test_channel_names():
    assert parse_channel(None) == (False, None)
    assert parse_channel("telephony-8k-3s") == (True, 3.0)
    with pytest.raises(ValueError):
        parse_channel("mobile-selfie")


def test_factory_builds_from_settings(voice_models, tmp_path):
    settings = load_config(None, data_dir=str(tmp_path), models={"cache_dir": str(PROJECT_ROOT / "var" / "models")})
    # Scores only (--scores-only): the pipeline's scoring; deciding scorers run the service's engine
    # (tests/voice/test_eval_parity.py).
    scorer = make_verification_scorer(ScorerOptions(settings=settings, channel="telephony-8k", decide=False))
    assert isinstance(scorer, VoiceVerificationScorer) and scorer.telephone_channel


@pytest.mark.parametrize("channel", ["wideband-3s", "telephony-8k-3s"])
def test_genuine_trials_outscore_impostors(pipeline, fixtures_dir, channel):
    trials = read_trials(fixtures_dir / "trials_voice.csv", fixtures_dir)
    picked = [t for t in trials if t.enroll_identity == "libri_1688"][:3]
    picked += [t for t in trials if not t.target and t.enroll_identity == "libri_1688"][:3]
    telephone_channel, crop = parse_channel(channel)
    run = run_verification(VoiceVerificationScorer(pipeline, telephone_channel, crop), picked)
    assert run.genuine_failures == run.impostor_failures == 0
    assert len(run.genuine) == len(run.impostor) == 3
    assert run.genuine.min() > run.impostor.max()


def test_refused_audio_is_a_failure_not_an_exception(pipeline, tmp_path):
    import numpy as np
    import soundfile as sf

    path = tmp_path / "silence.wav"
    sf.write(path, np.zeros(32000, np.float32), 16000)
    assert VoiceVerificationScorer(pipeline).embedding(path) == Failure("silence")


def test_narrowband_pad_channel_band_limits_and_has_no_service_record(voice_models, fixtures_dir, tmp_path):
    """narrowband-16k (bench/voice_antispoof_eval.py): the fixture band-limited to 4 kHz in its 16 kHz
    clip, scored on the telephone window; deciding on it is refused (its record failed the held-out
    check and is not in the manifest)."""
    import numpy as np
    import soundfile as sf

    from services.common.modality.calibration import NotCalibrated
    from services.voice.telephone import narrowband
    from services.voice.evaluation import make_pad_scorer

    path = sorted((fixtures_dir / "voice" / "verification").glob("*/*.wav"))[0]
    x, rate = sf.read(path, dtype="float32")
    y = narrowband(x, rate)
    spectrum = np.abs(np.fft.rfft(y)) ** 2
    high = np.fft.rfftfreq(len(y), 1.0 / rate) > 4200
    assert len(y) == len(x) and spectrum[high].sum() < 1e-6 * spectrum.sum()
    settings = load_config(None, data_dir=str(tmp_path), models={"cache_dir": str(PROJECT_ROOT / "var" / "models")})
    scorer = make_pad_scorer(ScorerOptions(settings=settings, channel="narrowband-16k", decide=False))
    # The telephone window and, as on the telephone channel, digital silence cut before it.
    assert scorer.narrowband and scorer.score_name == "bonafide_log_odds@speech4.04s-zerocut"
    assert isinstance(scorer.score(path), float)
    with pytest.raises(NotCalibrated):
        make_pad_scorer(ScorerOptions(settings=settings, channel="narrowband-16k", decide=True))
