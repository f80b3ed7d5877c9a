"""Ranking and classification metrics in plain NumPy (no scikit-learn dependency)."""
from __future__ import annotations

import numpy as np


def _scores_labels(y_true, y_score):
    y = np.asarray(y_true, dtype=np.float64).ravel()
    s = np.asarray(y_score, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in length: {y.shape} vs {s.shape}")
    return y, s


def roc_auc(y_true, y_score) -> float:
    """Area under the ROC curve (ties get average rank). NaN when one class is missing."""
    y, s = _scores_labels(y_true, y_score)
    pos, neg = y.sum(), len(y) - y.sum()
    if pos == 0 or neg == 0:
        return float("nan")
    from scipy.stats import rankdata

    ranks = rankdata(s)
    return float((ranks[y == 1].sum() - pos * (pos + 1) / 2) / (pos * neg))


def pr_curve(y_true, y_score):
    """(precision, recall, thresholds) at every distinct score, highest threshold first."""
    y, s = _scores_labels(y_true, y_score)
    order = np.argsort(-s, kind="mergesort")
    y, s = y[order], s[order]
    distinct = np.where(np.diff(s))[0]
    idx = np.r_[distinct, len(y) - 1]
    tp = np.cumsum(y)[idx]
    fp = (idx + 1) - tp
    precision = tp / np.maximum(tp + fp, 1)
    recall = tp / max(y.sum(), 1)
    return precision, recall, s[idx]


def roc_curve(y_true, y_score):
    """(fpr, tpr, thresholds), highest threshold first."""
    y, s = _scores_labels(y_true, y_score)
    order = np.argsort(-s, kind="mergesort")
    y, s = y[order], s[order]
    idx = np.r_[np.where(np.diff(s))[0], len(y) - 1]
    tp = np.cumsum(y)[idx]
    fp = (idx + 1) - tp
    return fp / max(len(y) - y.sum(), 1), tp / max(y.sum(), 1), s[idx]


def average_precision(y_true, y_score) -> float:
    """AUPRC as average precision: sum over thresholds of (R_n - R_{n-1}) * P_n."""
    precision, recall, _ = pr_curve(y_true, y_score)
    if recall[-1] == 0:
        return float("nan")
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def recall_at_fpr(y_true, y_score, max_fpr: float = 0.01) -> float:
    """Highest recall reachable with a false-positive rate <= ``max_fpr``."""
    fpr, tpr, _ = roc_curve(y_true, y_score)
    ok = fpr <= max_fpr
    return float(tpr[ok].max()) if ok.any() else 0.0


def precision_at_budget(y_true, y_score, budget: int) -> tuple[float, float]:
    """(precision among the top ``budget`` scores, the score threshold that selects them)."""
    y, s = _scores_labels(y_true, y_score)
    budget = max(1, min(int(budget), len(y)))
    top = np.argsort(-s, kind="mergesort")[:budget]
    return float(y[top].mean()), float(s[top].min())


def dcg_at_k(relevance_in_rank_order, k: int) -> float:
    rel = np.asarray(relevance_in_rank_order, dtype=np.float64)[:k]
    return float(np.sum((2 ** rel - 1) / np.log2(np.arange(2, len(rel) + 2))))


def ndcg_at_k(ranked_items, relevant: dict | set, k: int = 10) -> float:
    """NDCG@k of one ranked list; ``relevant`` is a set (gain 1) or item -> gain."""
    gains = relevant if isinstance(relevant, dict) else {i: 1.0 for i in relevant}
    if not gains:
        return float("nan")
    actual = dcg_at_k([gains.get(i, 0.0) for i in list(ranked_items)[:k]], k)
    ideal = dcg_at_k(sorted(gains.values(), reverse=True), k)
    return actual / ideal if ideal > 0 else 0.0


def recall_at_k(ranked_items, relevant: set, k: int = 50) -> float:
    """Share of ``relevant`` items found in the top k."""
    if not relevant:
        return float("nan")
    return len(set(list(ranked_items)[:k]) & set(relevant)) / len(relevant)


def calibration_curve(y_true, y_prob, bins: int = 10):
    """(mean predicted, observed rate) per probability bin with at least one row."""
    y, p = _scores_labels(y_true, y_prob)
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
    pred, obs = [], []
    for b in range(bins):
        m = which == b
        if m.any():
            pred.append(float(p[m].mean()))
            obs.append(float(y[m].mean()))
    return np.array(pred), np.array(obs)
