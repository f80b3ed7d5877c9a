"""Evaluation on the later time slice: model vs a rules baseline, JSON plus PNGs (PR, ROC, calibration,
scores by label, feature importance) for the run's report."""
from __future__ import annotations

import numpy as np
import pandas as pd

from pipelines import metrics as M
from pipelines.io import join, read_json, write_json
from pipelines.report import plot_bars, plot_hist, plot_lines
from pipelines.template import Run, StepResult

from .config import EvalConfig, RiskConfig
from .features import FEATURE_COLUMNS
from .train import LABEL, feature_matrix, load_model, read_features, slice_frame, split_times

PLOTS = ("pr_curve", "roc_curve", "calibration", "score_distribution", "feature_importance")  # <name>.png
TOP_FEATURES = 15


def rules_score(df: pd.DataFrame) -> np.ndarray:
    """The rules baseline a fraud team starts with: amount and velocity thresholds, summed as points."""
    points = (
        2.0 * (df["amount"] > 1000)
        + 1.0 * (df["amount_to_mean"].fillna(1) > 5)
        + 1.5 * (df["card_cnt_1h"] >= 3)
        + 1.0 * (df["card_cnt_24h"] >= 8)
        + 1.0 * (df["card_small_cnt_1h"] >= 2)
    )
    return points.to_numpy(dtype=float)


def classification_report(y, score, cfg: EvalConfig) -> dict:
    """AUPRC, ROC AUC, recall at ``max_fpr``, precision at the alert budget and its threshold."""
    budget = max(1, round(len(y) * cfg.alert_budget))
    precision, threshold = M.precision_at_budget(y, score, budget)
    return {"auprc": M.average_precision(y, score), "roc_auc": M.roc_auc(y, score),
            "recall_at_1pct_fpr": M.recall_at_fpr(y, score, cfg.max_fpr),
            "precision_at_budget": precision, "alert_threshold": threshold, "alert_budget": budget}


def test_slice(features_path: str, train_cfg) -> pd.DataFrame:
    """The later time slice (after training and validation) that every model is judged on."""
    frame = read_features(features_path, ["transaction_id", "event_time", LABEL] + FEATURE_COLUMNS)
    _, t2 = split_times(frame["event_time"].min(), frame["event_time"].max(), train_cfg)
    return slice_frame(frame, t2, None)


def evaluate(model_dir: str, test: pd.DataFrame, cfg: EvalConfig, out_dir: str,
             extra_models: dict | None = None) -> dict:
    """Score ``test`` with the model (and any ``extra_models``), compare with rules, write
    ``evaluation.json`` and the :data:`PLOTS` PNGs."""
    y = test[LABEL].to_numpy()
    booster, meta = load_model(model_dir)
    scores = {"model": booster.predict(feature_matrix(test, meta["features"])), "rules": rules_score(test)}
    for name, path in (extra_models or {}).items():
        other, ometa = load_model(path)
        scores[name] = other.predict(feature_matrix(test, ometa["features"]))
    prob, importance = scores["model"], gain_importance(booster)
    report = {"model_version": meta["version"], "test_rows": len(y), "test_fraud": int(y.sum()),
              **{name: classification_report(y, s, cfg) for name, s in scores.items()},
              "score_median": {"fraud": float(np.median(prob[y == 1])), "legit": float(np.median(prob[y == 0]))},
              "feature_importance": importance}
    write_json(join(out_dir, "evaluation.json"), report)
    png = {name: join(out_dir, f"{name}.png") for name in PLOTS}
    plot_lines(png["pr_curve"], {k: _pr(y, s) for k, s in scores.items()}, "recall", "precision",
               "Precision-recall, later time slice")
    plot_lines(png["roc_curve"], {k: M.roc_curve(y, s)[:2] for k, s in scores.items()}, "false positive rate",
               "true positive rate", "ROC, later time slice", diagonal=True)
    pred, obs = M.calibration_curve(y, prob, bins=10)
    plot_lines(png["calibration"], {"model": (pred, obs)}, "mean predicted probability",
               "observed fraud rate", "Calibration", diagonal=True)
    plot_hist(png["score_distribution"], {"legit": prob[y == 0], "fraud": prob[y == 1]}, "model score",
              "Model scores by label", log_y=True)
    plot_bars(png["feature_importance"], dict(list(importance.items())[:TOP_FEATURES]), "share of total gain",
              f"Feature importance (gain, top {TOP_FEATURES})", horizontal=True)
    return report


def gain_importance(booster) -> dict[str, float]:
    """Each feature's share of the model's total split gain, largest first."""
    gain = booster.feature_importance(importance_type="gain")
    share = gain / max(float(gain.sum()), 1e-12)
    return {name: float(v) for v, name in sorted(zip(share, booster.feature_name()), reverse=True)}


def _pr(y, score):
    precision, recall, _ = M.pr_curve(y, score)
    return recall, precision


def headline(report: dict) -> dict:
    """The summary metrics every run prints."""
    out = {"auprc": report["model"]["auprc"], "auprc_rules": report["rules"]["auprc"],
           "roc_auc": report["model"]["roc_auc"], "recall_at_1pct_fpr": report["model"]["recall_at_1pct_fpr"],
           "precision_at_budget": report["model"]["precision_at_budget"],
           "alert_threshold": report["model"]["alert_threshold"]}
    if "inprocess" in report:
        out["auprc_inprocess"] = report["inprocess"]["auprc"]
    return out


def remember_threshold(model_dir: str, threshold: float) -> None:
    """Store the alert-budget threshold with the model (batch and online tiers read it)."""
    uri = join(model_dir, "model.json")
    meta = read_json(uri)
    meta["alert_threshold"] = float(threshold)
    write_json(uri, meta)


def run(cfg: RiskConfig, run: Run) -> StepResult:
    """The evaluate step: the run's ``model`` (and ``model_inprocess``) vs rules on the later time
    slice of ``features``; saves the alert threshold with the model for scoring."""
    extra = {"inprocess": run.outputs["model_inprocess"]} if "model_inprocess" in run.outputs else {}
    model_dir = run.input("model")
    report = evaluate(model_dir, test_slice(run.input("features"), cfg.train), cfg.eval, run.dir, extra)
    remember_threshold(model_dir, report["model"]["alert_threshold"])
    outputs = {"evaluation": run.path("evaluation.json"), **{name: run.path(f"{name}.png") for name in PLOTS}}
    return StepResult(outputs, {"test_rows": report["test_rows"], **headline(report)})


if __name__ == "__main__":
    from .template import TEMPLATE

    TEMPLATE.step_alias("evaluate")
