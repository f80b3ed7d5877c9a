"""End to end on configs/local.yaml on the shared test cluster: quality bars, batch, resume after a killed worker."""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest

from pipelines.template import Run, read_manifest
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
    assert (recs.model_version == s["metrics"]["model_version"]).all()
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
        result = batch.run(cfg, Run(str(out), read_manifest(str(out))))
        assert result.metrics["recommendation_rows"] == cfg.data.num_users * k
    conn = mysql_connect(mysql_url)
    with conn.cursor() as cur:
        cur.execute(f"SELECT COUNT(*), COUNT(DISTINCT user_id), MAX(`rank`) FROM {table}")
        rows, users, max_rank = cur.fetchone()
    conn.close()
    assert (rows, users, max_rank) == (cfg.data.num_users * 3, cfg.data.num_users, 2)


def _wait_for(predicate, timeout: float, what: str, stop: threading.Event | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if stop is not None and stop.is_set():
            raise AssertionError(f"gave up waiting for {what}: training ended first")
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _registered_checkpoint(storage: Path) -> str | None:
    """The checkpoint Train's controller has registered (its snapshot in storage), if any."""
    for snap in storage.glob("*/checkpoint_manager_snapshot.json"):
        try:
            latest = json.loads(snap.read_text()).get("latest_checkpoint_result")
        except (OSError, ValueError):  # being written
            continue
        if latest:
            return latest["checkpoint_dir_name"]
    return None


def test_ranker_worker_process_killed_after_first_checkpoint_resumes_to_same_metrics(e2e, tmp_path):
    """SIGKILL a real Ray Train worker process once the epoch-0 checkpoint is registered: FailureConfig
    restarts the worker group, which resumes at epoch 1 and finishes with the metrics of a clean run."""
    from ray.util.state import get_actor, list_actors

    out, s = e2e
    cfg = C.load(overrides=["ranker.max_failures=1"])
    impressions, _ = ranking.validate_impressions(ranking.read_table(f"{out}/impressions"), cfg.data.num_users,
                                                  cfg.data.num_items)
    storage, pids = tmp_path / "train", tmp_path / "pids"
    pids.mkdir()
    done, seen = threading.Event(), {}

    def kill_a_worker_after_the_checkpoint():
        try:
            # every worker of the first attempt parks after epoch 0's report and writes its pid
            files = _wait_for(lambda: sorted(pids.glob("rank-*.pid")) if len(list(pids.glob("rank-*.pid")))
                              == cfg.ranker.num_workers else None, 600, "the workers to park after epoch 0", done)
            seen["checkpoint"] = _wait_for(lambda: _registered_checkpoint(storage), 120,
                                           "the controller to register the epoch-0 checkpoint", done)
            victim = int(files[-1].read_text())  # the highest rank: not the one that wrote the checkpoint
            workers = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
                                  detail=True)
            by_pid = {a["pid"]: a["actor_id"] for a in workers}
            assert victim in by_pid, (victim, workers)  # the pid is a live Train worker actor's process
            seen["actor_id"] = by_pid[victim]
            os.kill(victim, signal.SIGKILL)
            seen["killed"] = victim
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
            seen["error"] = e

    killer = threading.Thread(target=kill_a_worker_after_the_checkpoint, daemon=True)
    killer.start()
    try:
        result, _, _ = ranking.train(cfg, str(out), impressions, storage_path=str(storage),
                                     hold_after_epoch=(0, str(pids)))
    finally:
        done.set()
        killer.join(timeout=60)
    if "error" in seen:
        raise seen["error"]
    assert seen.get("killed"), seen
    assert seen["checkpoint"].startswith("checkpoint_"), seen
    assert not _alive(seen["killed"])  # the process is gone...
    assert get_actor(seen["actor_id"]).state == "DEAD"  # ...and Ray saw its worker die
    m = result.metrics
    assert m["start_epoch"] == 1  # the restarted worker group continued from the epoch-0 checkpoint
    assert m["epoch"] == cfg.ranker.epochs - 1
    assert m["val_auc"] == pytest.approx(s["metrics"]["ranker_val_auc"], abs=0.03)
    assert m["val_ndcg10"] == pytest.approx(s["metrics"]["ranker_val_ndcg10"], abs=0.03)
