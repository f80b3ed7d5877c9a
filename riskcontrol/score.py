"""Batch scoring with Ray Data: transactions (the run's, or yours: ``--input``) -> features -> scores.

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

from pipelines.config import redact
from pipelines.input import read_input, split_rejects
from pipelines.io import (
    checked_table_name,
    every_cpu_to_work,
    read_parquet,
    reject_ratio_failure,
    rejects_table,
    upsert_mysql,
    write_dataset,
    write_table,
)
from pipelines.shuffle import value_counts
from pipelines.template import Run, StepResult

from .config import FeatureConfig, RiskConfig, RiskInputConfig, ScoreConfig
from .features import build_features
from .inputs import TRANSACTIONS
from .train import feature_matrix, load_model

SCORE_COLUMNS = ["transaction_id", "event_time", "card_id", "merchant_id", "amount", "probability",
                 "risk_tier", "reason_1", "reason_2", "reason_3", "model_version"]


def tiers(prob: np.ndarray, high: float, medium: float) -> np.ndarray:
    """'high' at or above the alert threshold, 'medium' above ``medium``, else 'low'."""
    return np.where(prob >= high, "high", np.where(prob >= medium, "medium", "low"))


def arrow_matrix(table: pa.Table, names: list[str]) -> np.ndarray:
    """The named columns of an Arrow table as one float matrix (nulls as NaN), without pandas."""
    import pyarrow.compute as pc

    out = np.empty((table.num_rows, len(names)))
    for j, name in enumerate(names):
        out[:, j] = pc.cast(table.column(name), pa.float64()).to_numpy(zero_copy_only=False)
    return out


class Scorer:
    """A Ray Data actor: loads the model once, scores Arrow batches of feature rows."""

    def __init__(self, model_dir: str, high: float | None = None, medium: float | None = None):
        self.booster, self.meta = load_model(model_dir)
        self.features = self.meta["features"]
        self.high = high if high is not None else float(self.meta.get("alert_threshold", 0.5))
        self.medium = medium if medium is not None else self.high / 5

    def score_frame(self, feats: pd.DataFrame) -> dict:
        """Probability, tier and reasons for a frame of feature rows."""
        return self.score_matrix(feature_matrix(feats, self.features))

    def score_arrays(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(probability, reasons)`` for a float matrix in ``self.features`` order; ``reasons`` is an
        ``(n, 3)`` array of feature names.

        Reason codes (TreeSHAP contributions, the costly part) are computed for
        the rows at or above the medium tier, the ones an analyst looks at;
        low-risk rows get empty reasons.
        """
        prob = self.booster.predict(X)
        reasons = np.full((len(prob), 3), "", dtype=object)
        explain = np.flatnonzero(prob >= self.medium)
        if len(explain):
            contrib = self.booster.predict(X[explain], pred_contrib=True)[:, :-1]
            order = np.argsort(-contrib, axis=1, kind="stable")[:, :3]
            reasons[explain] = np.asarray(self.features, dtype=object)[order]
        return prob, reasons

    def score_matrix(self, X: np.ndarray) -> dict:
        """Probability, tier and reasons (a list of 3 names per row) for a float matrix."""
        prob, reasons = self.score_arrays(X)
        return {"probability": prob, "risk_tier": tiers(prob, self.high, self.medium), "reasons": reasons.tolist()}

    def __call__(self, batch: pa.Table) -> pa.Table:
        prob, reasons = self.score_arrays(arrow_matrix(batch, self.features))
        columns = {name: batch.column(name) for name in SCORE_COLUMNS[:5]}
        columns.update(probability=pa.array(prob), risk_tier=pa.array(tiers(prob, self.high, self.medium)))
        for i in range(3):
            columns[f"reason_{i + 1}"] = pa.array(reasons[:, i], type=pa.string())
        columns["model_version"] = pa.array(np.full(len(prob), self.meta["version"], dtype=object), type=pa.string())
        return pa.table(columns)


# feature rows are ~340 bytes: 8 MiB blocks are ~25k rows, a few seconds of one scorer's time
SCORE_BLOCK_MB = 8


def score_dataset(features, model_dir: str, cfg: ScoreConfig):
    """Lazy scores of a features Dataset, on a bounded pool of ``Scorer`` actors, every CPU to the work and
    blocks of at most ``SCORE_BLOCK_MB`` (:func:`pipelines.io.every_cpu_to_work`: 128 MiB blocks of 0.5M
    rows were 2 blocks of 82k and 417k rows, and one actor scored 83% of them; 2 cores: 0.45 -> 0.61
    of a bare pyarrow + LightGBM loop at 0.5M rows, 0.86 at 2M)."""
    import ray

    return every_cpu_to_work(features, SCORE_BLOCK_MB).map_batches(
        Scorer, batch_format="pyarrow", batch_size=cfg.batch_size, num_cpus=cfg.num_cpus,
        fn_constructor_kwargs={"model_dir": model_dir, "high": cfg.high_threshold,
                               "medium": cfg.medium_threshold},
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=cfg.max_actors))


def build_scores(transactions, model_dir: str, cfg: ScoreConfig, fcfg: FeatureConfig):
    """Lazy ``(scores, rejects)`` Datasets from transactions (features computed on the way, streamed into
    the ``Scorer`` actors so that a lost node does not leave them waiting for lost partitions)."""
    features, rejects = build_features(transactions, fcfg.num_cpus, fcfg.blocks, streaming=True)
    return score_dataset(features, model_dir, cfg), rejects


def _upsert_batch(batch: pa.Table, url: str, table: str) -> pa.Table:
    n = upsert_mysql(url, table, batch, ["transaction_id"])
    return pa.table({"written": [n]})


def input_dataset(cfg: RiskInputConfig):
    """Transactions to score from ``input.path`` (a file, folder, ``oss://`` prefix or MySQL table, mapped
    by ``input.columns``): lazy ``(good rows, rejects records)``."""
    if not cfg.path:
        raise ValueError("input.path: no transactions to score (give --input or score the run's features)")
    return split_rejects(read_input(cfg, TRANSACTIONS, id_columns=["transaction_id"]), stage="input transactions")


def scores_features_of_run(cfg: RiskConfig, run: Run) -> bool:
    """Whether the score step scores the run's ``features``: no ``input.path``, or the run's features
    were made from it (the data step ingested it), so they need not be computed again."""
    if not cfg.input.path:
        return True
    return "features" in run.outputs and run.outputs.get("transactions_source") == redact(cfg.input.path)


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
    return {"outputs": outputs, "rows": scores.count(), "tiers": value_counts(scores, "risk_tier")}


def run_score(transactions, model_dir: str, cfg: ScoreConfig, out_dir: str, fcfg: FeatureConfig,
              rejects_name: str = "rejects", input_rejects=None, max_input_reject_ratio: float = 1.0) -> dict:
    """Features + scores of transactions; writes ``scores`` and ``rejects_name`` (the features' rejects
    after ``input_rejects``, a Dataset of rejects records from reading the input); outputs and counts."""
    _output_table(cfg)  # a bad table name fails before any scoring
    scores, rejects = build_scores(transactions.materialize(), model_dir, cfg, fcfg)
    print(f"scoring with model {model_dir}", file=sys.stderr, flush=True)
    res = write_scores(scores, cfg, out_dir)
    frames = [d.to_pandas() for d in (input_rejects, rejects) if d is not None and d.count()]
    bad = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["id", "stage", "reason"])
    where = f"{out_dir}/{rejects_name}"
    res["outputs"][rejects_name] = write_table(rejects_table(bad.to_dict("records")), where)
    res["rejects"] = len(bad)
    unreadable = int((bad["stage"] != "features").sum())
    res["failure"] = reject_ratio_failure(
        unreadable, res["rows"] + len(bad), max_input_reject_ratio, "input rows", "input.max_reject_ratio", where,
    ) or reject_ratio_failure(len(bad) - unreadable, res["rows"] + len(bad) - unreadable, fcfg.max_reject_ratio,
                              "transactions", "features.max_reject_ratio", where)
    return res


def run(cfg: RiskConfig, run: Run) -> StepResult:
    """The score step: ``scores`` with tiers and reasons, by ``score.model_dir`` or the run's ``model``.

    Input: the run's own ``features`` (already validated by the features step), or ``input.path``
    (``--input``) when the run's features were not made from it (read, mapped and validated here,
    features computed here, bad rows to ``score_rejects``).
    """
    model_dir = cfg.score.model_dir or run.input("model")
    load_model(model_dir)  # a missing or broken model fails before any scoring
    if not scores_features_of_run(cfg, run):
        good, bad = input_dataset(cfg.input)
        res = run_score(good, model_dir, cfg.score, run.dir, cfg.features, rejects_name="score_rejects",
                        input_rejects=bad, max_input_reject_ratio=cfg.input.max_reject_ratio)
    else:
        res = write_scores(score_dataset(read_parquet(run.input("features")), model_dir, cfg.score),
                           cfg.score, run.dir)
        res["rejects"] = 0
    return StepResult(res["outputs"], {"scored_rows": res["rows"], "tiers": res["tiers"]}, rows=res["rows"],
                      rejects=res["rejects"], failure=res.get("failure"))


if __name__ == "__main__":
    from .template import TEMPLATE

    TEMPLATE.step_alias("score")
