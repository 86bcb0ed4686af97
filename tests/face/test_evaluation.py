"""The face scorers of `biogate eval`, run over the whole verification and PAD fixture lists."""

import pytest

from services.common.evaluation import metrics as m
from services.common.evaluation.runner import run_pad, run_verification
from services.common.evaluation.scorers import ScorerOptions
from services.common.evaluation.trials import read_pad, read_trials
from services.face.evaluation import make_pad_scorer, make_verification_scorer

pytestmark = pytest.mark.eval  # evaluation-grade: a whole fixture list through the models


@pytest.fixture(scope="module")
def options(model_store, face_models):
    return ScorerOptions(settings=model_store.settings)


def test_default_configuration_on_the_verification_trials(options, fixtures_dir):
    trials = read_trials(fixtures_dir / "trials_face.csv", fixtures_dir)
    run = run_verification(make_verification_scorer(options), trials)
    assert run.fte.failures == 0 and run.fta.failures == 0  # every image enrolled, tight crops included
    assert run.genuine.size == 100 and run.impostor.size == 157
    assert m.eer(run.genuine, run.impostor).eer <= 0.01


def test_pad_scorer_on_the_pad_list(options, fixtures_dir):
    samples = read_pad(fixtures_dir / "pad_face.csv", fixtures_dir)
    run = run_pad(make_pad_scorer(options), samples)
    assert run.bpnrr.failures == 0
    assert m.pad_eer(run.bonafide, run.attacks).eer <= 0.08
