"""End to end on configs/local.yaml on the shared test cluster (isolated worker disks, run folder on the OSS
stand-in): outputs read back from the object store, quality bars, batch, resume after a killed worker."""
from __future__ import annotations

import math
import os
import signal
import threading
import time

import numpy as np
import psutil
import pytest

from pipelines.io import exists, list_files, read_bytes, read_json, read_table
from pipelines.template import Run, read_manifest
from recsys import batch, ranking
from recsys import config as C
from recsys.models import DeepFM, TwoTower, load_model


@pytest.fixture
def e2e(recsys_run):
    return recsys_run


def test_end_to_end_meets_quality_bars(e2e):
    _, s, _ = e2e
    m = s["metrics"]
    assert s["steps"] == ["data", "retrieval", "ranking", "evaluate", "batch"]
    for key in ("ndcg10_ranker", "ndcg10_retrieval", "ndcg10_popularity", "recall50_retrieval", "auc_ranker"):
        assert isinstance(m[key], float), key
    assert m["ndcg10_ranker"] >= 1.3 * m["ndcg10_popularity"], m
    assert m["ndcg10_ranker"] > m["ndcg10_retrieval"], m
    assert m["recall50_retrieval"] > m["recall50_popularity"], m
    assert m["auc_ranker"] > 0.5
    assert s["rejects"] == 0
    assert read_json(s["outputs"]["eval_metrics"])["ndcg10_ranker"] == m["ndcg10_ranker"]


PNG = b"\x89PNG\r\n\x1a\n"


def test_report_plots_and_loss_histories_are_in_the_run_folder(e2e):
    """The per-run report's PNGs (metric bars, both training curves) are outputs in the object store, and
    the loss history behind each curve has one finite value per configured epoch."""
    out, s, _ = e2e
    m, cfg = s["metrics"], C.load()
    plots = ("plot_ndcg", "plot_recall", "plot_auc", "plot_retriever_loss", "plot_ranker_loss")
    assert set(plots) <= {k for k in s["outputs"] if k.startswith("plot_")}, s["outputs"]
    for name in plots:
        uri = s["outputs"][name]
        assert uri.startswith(out + "/") and uri.endswith(".png"), (name, uri)
        assert read_bytes(uri)[:8] == PNG, name
    for model, epochs in (("retriever", cfg.retrieval.epochs), ("ranker", cfg.ranker.epochs)):
        history = read_json(s["outputs"][f"{model}_history"])
        assert [h["epoch"] for h in history] == list(range(epochs)), (model, history)
        assert all(isinstance(h["loss"], float) and math.isfinite(h["loss"]) for h in history), (model, history)
    retriever, ranker = (read_json(s["outputs"][f"{k}_history"]) for k in ("retriever", "ranker"))
    assert retriever[-1]["loss"] == m["retriever_loss"]  # the curve ends at the saved model's epoch
    assert ranker[-1]["val_auc"] == m["ranker_val_auc"]
    assert retriever[-1]["loss"] < retriever[0]["loss"]  # the two-tower model learns over 5 epochs


def test_end_to_end_outputs_are_in_the_object_store_only(e2e):
    """Every output is an oss:// URI the driver reads back (the workers' disks are their own), and the
    driver's local run-folder root gained nothing."""
    out, s, local_added = e2e
    m, cfg = s["metrics"], C.load()
    assert s["run_dir"] == out and out.startswith("oss://")
    assert exists(f"{out}/summary.json") and exists(f"{out}/run.json")
    assert all(uri.startswith(out + "/") for uri in s["outputs"].values()), s["outputs"]
    rows = {"users": cfg.data.num_users, "items": cfg.data.num_items, "impressions": m["impressions"],
            "clicks": m["clicks"], "queries": m["queries"], "item_embeddings": cfg.data.num_items,
            "user_embeddings": cfg.data.num_users, "recommendations": cfg.data.num_users * cfg.batch.k,
            "rejects": 0, "eval_users": m["test_users"]}
    for name, n in rows.items():
        assert read_table(s["outputs"][name]).num_rows == n, name
    for snap in ("ranker", "eval", "serve"):
        assert read_table(s["outputs"][f"features_{snap}"] + "/users").num_rows == cfg.data.num_users, snap
    ranker, blob = load_model(DeepFM, s["outputs"]["ranker"])
    assert isinstance(ranker, DeepFM) and blob["version"] == m["model_version"]
    retriever, _ = load_model(TwoTower, s["outputs"]["retriever"])
    assert retriever.item_emb.num_embeddings == cfg.data.num_items
    assert list_files(f"{out}/train"), "no Train checkpoints in the run folder"
    assert not local_added, local_added


def test_batch_recommendations_cover_every_user_once(e2e):
    out, s, _ = e2e
    cfg = C.load()
    recs = read_table(f"{out}/recommendations").to_pandas()
    assert len(recs) == cfg.data.num_users * cfg.batch.k
    assert recs.groupby("user_id")["rank"].nunique().eq(cfg.batch.k).all()
    assert not recs.duplicated(["user_id", "item_id"]).any()
    assert (recs.model_version == s["metrics"]["model_version"]).all()
    first = recs.sort_values(["user_id", "rank"]).groupby("user_id").score.apply(lambda x: x.is_monotonic_decreasing)
    assert first.all()


def test_ivf_index_is_built_once_per_actor_and_recommends_like_exact(e2e, monkeypatch):
    """The batch stage over the run's embeddings with IVF forced (``exact_max_items=0``): one index per
    actor, however many batches it serves, and top-10 lists that keep >= 80% of exact search's items."""
    from recsys import index

    out, _, _ = e2e
    r = C.load().retrieval
    builds, build = [], index.VectorIndex.__init__
    monkeypatch.setattr(index.VectorIndex, "__init__", lambda self, *a, **kw: builds.append(build(self, *a, **kw)))
    ivf = batch.BatchRecommender(out, r.model_copy(update={"exact_max_items": 0}).model_dump(), k=10)
    exact = batch.BatchRecommender(out, r.model_dump(), k=10)
    assert (ivf.rec.retriever.index.kind, exact.rec.retriever.index.kind) == ("ivf", "exact")
    users = [np.arange(lo, lo + 100) for lo in (0, 100, 200)]
    got = [ivf({"user_id": u}) for u in users]
    want = [exact({"user_id": u}) for u in users]
    assert len(builds) == 2
    overlap = [len(set(a) & set(b)) / 10 for g, w in zip(got, want)
               for a, b in zip(g["item_id"].reshape(-1, 10), w["item_id"].reshape(-1, 10))]
    assert np.mean(overlap) >= 0.8, np.mean(overlap)


def test_batch_to_mysql_is_idempotent(e2e, mysql_url):
    from pipelines.io import mysql_connect

    out, _, _ = e2e
    table = "recsys_test_recommendations"
    conn = mysql_connect(mysql_url)
    with conn.cursor() as cur:
        cur.execute(f"DROP TABLE IF EXISTS {table}")
    conn.close()
    for k in (4, 3, 3):
        cfg = C.load(overrides=["batch.output=mysql", f"batch.mysql_url={mysql_url}", f"batch.mysql_table={table}",
                                f"batch.k={k}"])
        result = batch.run(cfg, Run(out, read_manifest(out)))
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


def _pid_files(pids: str, workers: int) -> list[str] | None:
    """The ``rank-*.pid`` files under ``pids`` once every worker wrote one (sorted by rank)."""
    files = [f for f in list_files(pids) if f.rsplit("/", 1)[-1].startswith("rank-") and f.endswith(".pid")]
    return files if len(files) == workers else None


def _registered_checkpoint(storage: str) -> str | None:
    """The checkpoint Train's controller has registered (its snapshot in storage), if any."""
    for snap in list_files(storage):
        if not snap.endswith("/checkpoint_manager_snapshot.json"):
            continue
        try:
            latest = read_json(snap).get("latest_checkpoint_result")
        except (OSError, ValueError):  # being written
            continue
        if latest:
            return latest["checkpoint_dir_name"]
    return None


def test_ranker_worker_process_killed_after_first_checkpoint_resumes_to_same_metrics(e2e, adbray_run_dir):
    """SIGKILL a real Ray Train worker process once the epoch-0 checkpoint is registered: FailureConfig
    restarts the worker group, which resumes at epoch 1 and finishes with the metrics of a clean run.
    Checkpoints and the parked workers' pids go to the object store (a worker's disk is its own; pids
    are machine-wide on the local cluster)."""
    from ray.util.state import get_actor, list_actors

    out, s, _ = e2e
    cfg = C.load(overrides=["ranker.max_failures=1"])
    impressions, _ = ranking.validate_impressions(ranking.read_table(f"{out}/impressions"), cfg.data.num_users,
                                                  cfg.data.num_items)
    storage, pids = f"{adbray_run_dir}/train", f"{adbray_run_dir}/pids"
    done, seen = threading.Event(), {}

    def kill_a_worker_after_the_checkpoint():
        try:
            # every worker of the first attempt parks after epoch 0's report and writes its pid
            files = _wait_for(lambda: _pid_files(pids, cfg.ranker.num_workers), 600,
                              "the workers to park after epoch 0", done)
            seen["checkpoint"] = _wait_for(lambda: _registered_checkpoint(storage), 120,
                                           "the controller to register the epoch-0 checkpoint", done)
            victim = int(read_bytes(files[-1]))  # the highest rank: not the one that wrote the checkpoint
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
        result, _, _ = ranking.train(cfg, out, impressions, storage_path=storage, hold_after_epoch=(0, pids))
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
    history = ranking.load_state(result.checkpoint)["history"]  # kept across the restart: one per epoch
    assert [(h["epoch"], h["start_epoch"]) for h in history] == [(0, 0), *((e, 1) for e in range(1, cfg.ranker.epochs))]
    assert m["val_auc"] == pytest.approx(s["metrics"]["ranker_val_auc"], abs=0.03)
    assert m["val_ndcg10"] == pytest.approx(s["metrics"]["ranker_val_ndcg10"], abs=0.03)
