"""The evaluate step's report without Ray: a small in-process model on local data, its JSON and PNGs."""
import json

import pytest

from riskcontrol import evaluate as E
from riskcontrol.config import EvalConfig, TrainConfig
from riskcontrol.features import FEATURE_COLUMNS

from .riskcontrol_helpers import small_model

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """(run folder, report) of ``evaluate`` on a 30-round model (a few seconds)."""
    out = tmp_path_factory.mktemp("rc-eval")
    small_model(out, train={"num_boost_round": 30}, rows=8000, cards=100, merchants=40, days=10)
    test = E.test_slice(str(out / "features"), TrainConfig())
    return out, E.evaluate(str(out / "model"), test, EvalConfig(), str(out))


def test_every_plot_is_a_png(evaluated):
    out, _ = evaluated
    for name in E.PLOTS:
        assert (out / f"{name}.png").read_bytes()[:8] == PNG, name


def test_numbers_behind_the_plots(evaluated):
    out, report = evaluated
    assert json.loads((out / "evaluation.json").read_text()) == report
    importance = report["feature_importance"]
    assert list(importance) == sorted(importance, key=importance.get, reverse=True)
    assert set(importance) == set(FEATURE_COLUMNS) and len(importance) > E.TOP_FEATURES
    assert next(iter(importance.values())) > 0 and sum(importance.values()) == pytest.approx(1.0)
    assert report["score_median"]["fraud"] > report["score_median"]["legit"]  # scores separate the labels
