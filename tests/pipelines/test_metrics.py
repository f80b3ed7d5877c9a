import numpy as np
import pytest

from pipelines import metrics as M


def test_auc_and_ap_known_values():
    y = [0, 0, 1, 1]
    s = [0.1, 0.4, 0.35, 0.8]
    assert M.roc_auc(y, s) == pytest.approx(0.75)
    # ranks: 0.8(+) P=1 R=.5; 0.4(-); 0.35(+) P=2/3 R=1 -> AP = .5*1 + .5*2/3
    assert M.average_precision(y, s) == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert M.roc_auc([1, 1], [0.2, 0.3]) != M.roc_auc([1, 1], [0.2, 0.3])  # NaN with one class


def test_random_scores_give_base_rate_ap_and_half_auc():
    rng = np.random.default_rng(0)
    y = rng.random(20000) < 0.1
    s = rng.random(20000)
    assert M.roc_auc(y, s) == pytest.approx(0.5, abs=0.02)
    assert M.average_precision(y, s) == pytest.approx(0.1, abs=0.02)


def test_recall_at_fpr_and_budget():
    y = np.array([1, 1, 0, 1, 0, 0, 0, 0, 0, 0])
    s = np.arange(10, 0, -1)
    assert M.recall_at_fpr(y, s, 0.0) == pytest.approx(2 / 3)
    assert M.precision_at_budget(y, s, 4) == (0.75, 7.0)


def test_ndcg_and_recall_at_k():
    assert M.ndcg_at_k(["a", "b", "c"], {"a"}, 10) == 1.0
    assert M.ndcg_at_k(["b", "a"], {"a"}, 10) == pytest.approx(1 / np.log2(3))
    assert M.ndcg_at_k(["x"], {"a"}, 10) == 0.0
    assert M.recall_at_k(["a", "b", "c"], {"a", "z"}, 2) == 0.5


def test_calibration_curve_bins():
    pred, obs = M.calibration_curve([0, 1, 1, 0], [0.05, 0.95, 0.9, 0.15], bins=10)
    assert list(obs) == [0.0, 0.0, 1.0]
    assert len(pred) == len(obs) and all(0 <= x <= 1 for x in pred)
