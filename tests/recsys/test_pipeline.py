"""End to end on configs/local.yaml on the shared test cluster: quality bars, batch, resume."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from recsys import batch, ranking
from recsys import config as C


@pytest.fixture
def e2e(recsys_run):
    return recsys_run


def test_end_to_end_meets_quality_bars(e2e):
    _, s = e2e
    m = s["metrics"]
    assert s["steps"] == ["data", "retrieval", "ranking", "evaluate", "batch"]
    for key in ("ndcg10_ranker", "ndcg10_retrieval", "ndcg10_popularity", "recall50_retrieval", "auc_ranker"):
        assert isinstance(m[key], float), key
    assert m["ndcg10_ranker"] >= 1.3 * m["ndcg10_popularity"], m
    assert m["ndcg10_ranker"] > m["ndcg10_retrieval"], m
    assert m["recall50_retrieval"] > m["recall50_popularity"], m
    assert m["auc_ranker"] > 0.5
    assert s["rejects"] == 0
    for name in ("users", "items", "impressions", "clicks", "queries", "item_embeddings", "user_embeddings",
                 "recommendations", "rejects", "eval_users"):
        assert Path(s["outputs"][name]).is_dir(), name
    assert Path(s["outputs"]["plot_ndcg10"]).stat().st_size > 0
    assert json.loads(Path(s["outputs"]["eval_metrics"]).read_text())["ndcg10_ranker"] == m["ndcg10_ranker"]


def test_batch_recommendations_cover_every_user_once(e2e):
    out, s = e2e
    cfg = C.load()
    recs = pq.read_table(out / "recommendations").to_pandas()
    assert len(recs) == cfg.data.num_users * cfg.batch.k
    assert recs.groupby("user_id")["rank"].nunique().eq(cfg.batch.k).all()
    assert not recs.duplicated(["user_id", "item_id"]).any()
    assert (recs.model_version == s["model_version"]).all()
    first = recs.sort_values(["user_id", "rank"]).groupby("user_id").score.apply(lambda x: x.is_monotonic_decreasing)
    assert first.all()


def test_batch_to_mysql_is_idempotent(e2e, mysql_url):
    from pipelines.io import mysql_connect

    out, _ = e2e
    table = "recsys_test_recommendations"
    conn = mysql_connect(mysql_url)
    with conn.cursor() as cur:
        cur.execute(f"DROP TABLE IF EXISTS {table}")
    conn.close()
    for k in (4, 3, 3):
        cfg = C.load(overrides=["batch.output=mysql", f"batch.mysql_url={mysql_url}", f"batch.mysql_table={table}",
                                f"batch.k={k}"])
        s = batch.run(cfg, str(out))
        assert s["metrics"]["recommendation_rows"] == cfg.data.num_users * k
    conn = mysql_connect(mysql_url)
    with conn.cursor() as cur:
        cur.execute(f"SELECT COUNT(*), COUNT(DISTINCT user_id), MAX(`rank`) FROM {table}")
        rows, users, max_rank = cur.fetchone()
    conn.close()
    assert (rows, users, max_rank) == (cfg.data.num_users * 3, cfg.data.num_users, 2)


def test_ranker_killed_after_first_checkpoint_resumes_to_same_metrics(e2e, tmp_path):
    out, s = e2e
    cfg = C.load(overrides=["ranker.fail_after_epoch=0", "ranker.max_failures=1"])
    impressions, _ = ranking.validate_impressions(ranking.read_table(f"{out}/impressions"), cfg.data.num_users,
                                                  cfg.data.num_items)
    result, _, _ = ranking.train(cfg, str(out), impressions, storage_path=str(tmp_path / "train"))
    m = result.metrics
    assert m["start_epoch"] == 1  # the restarted worker group continued from the epoch-0 checkpoint
    assert m["epoch"] == cfg.ranker.epochs - 1
    assert m["val_auc"] == pytest.approx(s["metrics"]["ranker_val_auc"], abs=0.03)
    assert m["val_ndcg10"] == pytest.approx(s["metrics"]["ranker_val_ndcg10"], abs=0.03)
