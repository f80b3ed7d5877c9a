"""Batch scoring with Ray Data: transactions (Parquet or MySQL) -> features -> scores.

The model is loaded once per actor (:class:`Scorer`); each score carries the
probability, a risk tier, the top-3 reason codes (LightGBM feature
contributions, for medium and high tiers) and the model version. Invalid rows go to ``rejects``. Writes
are idempotent: the ``scores`` Parquet folder is replaced as a whole, and MySQL
rows are upserted on ``transaction_id``.
"""
from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import pyarrow as pa

from pipelines.io import (
    checked_table_name,
    read_mysql,
    read_parquet,
    reject_ratio_failure,
    rejects_table,
    sql_table,
    upsert_mysql,
    write_dataset,
    write_table,
)
from pipelines.template import Run, StepResult

from .config import FeatureConfig, RiskConfig, ScoreConfig
from .data import read_transactions
from .features import build_features
from .train import feature_matrix, load_model

SCORE_COLUMNS = ["transaction_id", "event_time", "card_id", "merchant_id", "amount", "probability",
                 "risk_tier", "reason_1", "reason_2", "reason_3", "model_version"]


def tiers(prob: np.ndarray, high: float, medium: float) -> np.ndarray:
    """'high' at or above the alert threshold, 'medium' above ``medium``, else 'low'."""
    return np.where(prob >= high, "high", np.where(prob >= medium, "medium", "low"))


def top_reasons(contrib: np.ndarray, names: list[str], k: int = 3) -> list[list[str]]:
    """The ``k`` features that pushed each row's score up the most (by SHAP-style contribution)."""
    order = np.argsort(-contrib, axis=1, kind="stable")[:, :k]
    return [[names[j] for j in row] for row in order]


class Scorer:
    """A Ray Data actor: loads the model once, scores feature batches."""

    def __init__(self, model_dir: str, high: float | None = None, medium: float | None = None):
        self.booster, self.meta = load_model(model_dir)
        self.features = self.meta["features"]
        self.high = high if high is not None else float(self.meta.get("alert_threshold", 0.5))
        self.medium = medium if medium is not None else self.high / 5

    def score_frame(self, feats: pd.DataFrame) -> dict:
        """Probability, tier and reasons for a frame of feature rows."""
        return self.score_matrix(feature_matrix(feats, self.features))

    def score_matrix(self, X: np.ndarray) -> dict:
        """Probability, tier and reasons for a float matrix in ``self.features`` order.

        Reason codes (TreeSHAP contributions, the costly part) are computed for
        the rows at or above the medium tier, the ones an analyst looks at;
        low-risk rows get empty reasons.
        """
        prob = self.booster.predict(X)
        reasons = [["", "", ""] for _ in range(len(prob))]
        explain = np.flatnonzero(prob >= self.medium)
        if len(explain):
            contrib = self.booster.predict(X[explain], pred_contrib=True)[:, :-1]
            for i, r in zip(explain, top_reasons(contrib, self.features)):
                reasons[i] = r
        return {"probability": prob, "risk_tier": tiers(prob, self.high, self.medium), "reasons": reasons}

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        s = self.score_frame(batch)
        out = batch[SCORE_COLUMNS[:5]].copy()
        out["probability"] = s["probability"]
        out["risk_tier"] = s["risk_tier"]
        for i in range(3):
            out[f"reason_{i + 1}"] = [r[i] for r in s["reasons"]]
        out["model_version"] = self.meta["version"]
        return out


def score_dataset(features, model_dir: str, cfg: ScoreConfig):
    """Lazy scores of a features Dataset, on a bounded pool of ``Scorer`` actors."""
    import ray

    return features.map_batches(
        Scorer, batch_format="pandas", batch_size=cfg.batch_size, num_cpus=cfg.num_cpus,
        fn_constructor_kwargs={"model_dir": model_dir, "high": cfg.high_threshold,
                               "medium": cfg.medium_threshold},
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=cfg.max_actors))


def build_scores(transactions, model_dir: str, cfg: ScoreConfig, fcfg: FeatureConfig):
    """Lazy ``(scores, rejects)`` Datasets from transactions (features computed on the way)."""
    features, rejects = build_features(transactions, fcfg.num_cpus, fcfg.blocks)
    return score_dataset(features, model_dir, cfg), rejects


def _upsert_batch(batch: pa.Table, url: str, table: str) -> pa.Table:
    n = upsert_mysql(url, table, batch, ["transaction_id"])
    return pa.table({"written": [n]})


def input_dataset(cfg: ScoreConfig, default_path: str | None):
    """Transactions to score: a MySQL table, ``score.input``, or the given default folder."""
    if cfg.input_mysql_url:
        return read_mysql(cfg.input_mysql_url, f"SELECT * FROM {sql_table(cfg.input_table, 'score.input_table')}")
    path = cfg.input or default_path
    if not path:
        raise ValueError("score.input: no transactions to score (set score.input or score.input_mysql_url)")
    return read_transactions(path)


def _output_table(cfg: ScoreConfig) -> str | None:
    """The checked ``score.output_table`` when scores also go to MySQL, else None."""
    return checked_table_name(cfg.output_table, "score.output_table") if cfg.output_mysql_url else None


def write_scores(scores, cfg: ScoreConfig, out_dir: str) -> dict:
    """Execute a scores Dataset into ``scores`` (replaced) and the MySQL table (upsert) if configured."""
    table = _output_table(cfg)
    scores = scores.materialize()
    outputs = {"scores": write_dataset(scores, f"{out_dir}/scores")}
    if table:
        scores.map_batches(_upsert_batch, batch_format="pyarrow", batch_size=2000,
                           fn_kwargs={"url": cfg.output_mysql_url, "table": table}).materialize()
        outputs["scores_mysql"] = table
    counts = scores.groupby("risk_tier").count().to_pandas()
    by_tier = dict(zip(counts["risk_tier"], counts["count()"].astype(int)))
    return {"outputs": outputs, "rows": scores.count(), "tiers": by_tier}


def run_score(transactions, model_dir: str, cfg: ScoreConfig, out_dir: str, fcfg: FeatureConfig,
              rejects_name: str = "rejects") -> dict:
    """Features + scores of transactions; writes ``scores`` and ``rejects_name``; outputs and counts."""
    _output_table(cfg)  # a bad table name fails before any scoring
    scores, rejects = build_scores(transactions.materialize(), model_dir, cfg, fcfg)
    print(f"scoring with model {model_dir}", file=sys.stderr, flush=True)
    res = write_scores(scores, cfg, out_dir)
    bad = rejects.to_pandas() if rejects.count() else pd.DataFrame(columns=["id", "stage", "reason"])
    res["outputs"][rejects_name] = write_table(rejects_table(bad.to_dict("records")), f"{out_dir}/{rejects_name}")
    res["rejects"] = len(bad)
    res["failure"] = reject_ratio_failure(len(bad), res["rows"] + len(bad), fcfg.max_reject_ratio, "transactions",
                                          "features.max_reject_ratio", f"{out_dir}/{rejects_name}")
    return res


def run(cfg: RiskConfig, run: Run) -> StepResult:
    """The score step: ``scores`` with tiers and reasons, by ``score.model_dir`` or the run's ``model``.

    Input: ``score.input`` / ``score.input_mysql_url`` (features computed here, bad rows to
    ``score_rejects``), else the run's own ``features`` (already validated by the features step).
    """
    model_dir = cfg.score.model_dir or run.input("model")
    load_model(model_dir)  # a missing or broken model fails before any scoring
    if cfg.score.input or cfg.score.input_mysql_url:
        res = run_score(input_dataset(cfg.score, None), model_dir, cfg.score, run.dir, cfg.features,
                        rejects_name="score_rejects")
    else:
        res = write_scores(score_dataset(read_parquet(run.input("features")), model_dir, cfg.score),
                           cfg.score, run.dir)
        res["rejects"] = 0
    return StepResult(res["outputs"], {"scored_rows": res["rows"], "tiers": res["tiers"]}, rows=res["rows"],
                      rejects=res["rejects"], failure=res.get("failure"))


if __name__ == "__main__":
    from .template import TEMPLATE

    TEMPLATE.step_alias("score")
