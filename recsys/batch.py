"""Batch top-k recommendations for every user with Ray Data, to Parquet or MySQL (idempotent).

Each actor holds the index, features (as of the end of the data) and the ranker,
and turns a batch of user ids into rows (user_id, rank, item_id, score, model_version).
On the user's own data (``input.path``) the rows carry the user's ids (text).
Parquet output replaces the ``recommendations`` folder; MySQL output upserts on
(user_id, rank) and deletes ranks beyond k, so re-runs never duplicate rows.
"""
from __future__ import annotations

import time

import numpy as np
import pyarrow as pa

from pipelines.io import (
    checked_table_name,
    mysql_connect,
    read_parquet,
    read_table,
    sql_table,
    upsert_mysql,
    write_dataset,
)
from pipelines.template import Run, StepResult

from . import config as C
from .common import DataShape, data_shape
from .score import Recommender

KEY = ("user_id", "rank")


class BatchRecommender:
    """Ray Data stage: user ids -> k rows each, best first."""

    def __init__(self, run_dir: str, retrieval_cfg: dict, k: int, own_ids: bool = False):
        self.rec = Recommender(run_dir, C.RetrievalConfig(**retrieval_cfg), features="serve")
        self.k = k
        # the user's data: rows carry the user's own ids (``key`` of the users/items tables)
        self.keys = {kind: read_table(f"{run_dir}/{kind}s", columns=["key"]).column("key").to_numpy(
            zero_copy_only=False) for kind in ("user", "item")} if own_ids else None

    def __call__(self, batch: dict) -> dict:
        users = np.asarray(batch["user_id"], dtype=np.int64)
        ids, scores = self.rec.recommend(users, self.k)
        k = ids.shape[1]
        keep = np.isfinite(scores).ravel()  # a user with fewer than k unseen items gets fewer rows
        user_col, item_col = np.repeat(users, k)[keep], ids.ravel().astype(np.int64)[keep]
        if self.keys is not None:
            user_col, item_col = self.keys["user"][user_col], self.keys["item"][item_col]
        return {"user_id": user_col, "rank": np.tile(np.arange(k, dtype=np.int64), len(users))[keep],
                "item_id": item_col, "score": scores.ravel().astype(np.float64)[keep],
                "model_version": np.full(int(keep.sum()), self.rec.ranker.version, dtype=object)}


class MySQLWriter:
    """Ray Data stage: upsert a batch of recommendation rows; returns how many were written."""

    def __init__(self, url: str, table: str):
        self.url, self.table = url, table

    def __call__(self, batch: dict) -> dict:
        n = upsert_mysql(self.url, self.table, pa.table(batch), list(KEY))
        return {"written": np.array([n])}


def build(cfg: C.RecsysConfig, out: str, shape: DataShape | None = None):
    """Lazy Ray Dataset of recommendation rows for every user."""
    import ray

    b = cfg.batch
    shape = shape or data_shape(cfg, out)
    users = ray.data.from_arrow(pa.table({"user_id": np.arange(shape.num_users, dtype=np.int64)}),
                                override_num_blocks=max(1, b.max_actors * 2))
    return users.map_batches(
        BatchRecommender, fn_constructor_kwargs={"run_dir": out, "retrieval_cfg": cfg.retrieval.model_dump(),
                                                 "k": b.k, "own_ids": shape.own_ids},
        batch_size=b.batch_size, num_cpus=b.num_cpus, num_gpus=b.num_gpus or None,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=b.max_actors))


def run(cfg: C.RecsysConfig, run: Run) -> StepResult:
    """Write top-k for every user (Parquet or MySQL); users/s in the metrics."""
    import ray

    out, b = run.dir, cfg.batch
    table = checked_table_name(b.mysql_table, "batch.mysql_table") if b.output == "mysql" else None
    shape = data_shape(cfg, out)
    rows = build(cfg, out, shape)
    t0 = time.perf_counter()
    if b.output == "parquet":
        target = write_dataset(rows, f"{out}/recommendations")
        written = read_parquet(target).count()
    else:
        counts = rows.map_batches(MySQLWriter, fn_constructor_kwargs={"url": b.mysql_url, "table": table},
                                  batch_size=5000, compute=ray.data.ActorPoolStrategy(min_size=1, max_size=1))
        written = int(sum(r["written"] for r in counts.take_all()))
        conn = mysql_connect(b.mysql_url)
        try:
            with conn.cursor() as cur:
                cur.execute(f"DELETE FROM {sql_table(table)} WHERE `rank` >= %s", (b.k,))
            conn.commit()
        finally:
            conn.close()
        target = f"{b.mysql_url.rsplit('@', 1)[-1]}#{table}"
    seconds = time.perf_counter() - t0
    metrics = {"users": shape.num_users, "recommendation_rows": written, "batch_seconds": seconds,
               "batch_users_per_s": shape.num_users / seconds}
    return StepResult({"recommendations": target}, metrics, rows=written)


if __name__ == "__main__":
    from .template import TEMPLATE

    TEMPLATE.step_alias("batch")
