"""DeepFM ranker on Ray Train: N DDP workers, a checkpoint every epoch, resume after failures.

Writes point-in-time feature snapshots (``features/ranker`` as of t1, ``features/eval``
as of t2, ``features/serve`` as of the end) and, with Ray Data, one training row per
user active in [t1, t2): the retriever's top candidates with features and labels (clicked
in the window). The ranker learns to re-order those lists (listwise softmax loss) with
``FailureConfig(max_failures)``: a worker error restarts the group from the last
checkpoint; re-running the step with the same inputs resumes the stored run.
``ranker.fail_after_epoch`` injects a failure after that epoch's checkpoint (tests);
``train(hold_after_epoch=...)`` parks the workers there so a test can SIGKILL one.
"""
from __future__ import annotations

import time

import numpy as np
import pyarrow as pa

from pipelines.io import join, read_table, rejects_table, write_bytes, write_table
from pipelines.metrics import ndcg_at_k, roc_auc
from pipelines.progress import progress
from pipelines.template import Run, StepResult

from . import config as C
from .common import DataShape, data_shape
from .features import (
    PRICE_BUCKETS,
    CandidateExamples,
    RankerExamples,
    clicked_by_user,
    snapshot,
    validate_impressions,
)
from .index import index_options
from .models import DENSE_FEATURES, DeepFM, listwise_loss, save_model
from .training import (
    batches_per_epoch,
    cache_shard,
    fit,
    history_outputs,
    load_state,
    param_shapes,
    report_epoch,
    restore,
    run_name,
)

MODEL_FILE = "models/ranker.pt"
SNAPSHOTS = ("ranker", "eval", "serve")


def model_kwargs(cfg: C.RecsysConfig, num_items: int, num_categories: int | None = None) -> dict:
    k = cfg.ranker
    cats = num_categories or cfg.data.num_categories
    return {"field_sizes": [cats + 1, num_items, cats, PRICE_BUCKETS],
            "num_dense": len(DENSE_FEATURES), "embed_dim": k.embed_dim, "hidden": list(k.hidden)}


class InjectedFailure(RuntimeError):
    """Raised by the train loop when ``ranker.fail_after_epoch`` asks for it."""


def hold_until_killed(pid_dir: str, timeout_s: float = 600.0) -> None:
    """Testing hook: write this Train worker's pid to ``<pid_dir>/rank-<r>.pid`` and block until a test
    kills the process (SIGKILL); raise if nobody does within ``timeout_s``.

    ``pid_dir`` is a URI the test can read (``oss://...`` on a cluster: a worker's local disk is its own).
    """
    import os

    import ray.train

    rank = ray.train.get_context().get_world_rank()
    write_bytes(join(pid_dir, f"rank-{rank}.pid"), str(os.getpid()).encode())  # one PUT: appears whole
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        time.sleep(0.2)
    raise InjectedFailure(f"worker {os.getpid()} held for a kill that never came ({timeout_s:.0f}s)")


def _logits(model, data: dict, idx, dev):
    import torch

    return model(torch.as_tensor(data["sparse"][idx], device=dev), torch.as_tensor(data["dense"][idx], device=dev))


def validation_metrics(model, val: dict, dev, k: int = 10) -> dict:
    """Pointwise AUC and NDCG@k within the candidate lists of the validation users."""
    import torch

    with torch.no_grad():
        logits = _logits(model, val, slice(None), dev).cpu().numpy()
    labels = val["label"]
    ndcg = [ndcg_at_k(np.argsort(-row), set(np.flatnonzero(lab)), k) for row, lab in zip(logits, labels)]
    return {"val_auc": roc_auc(labels.ravel(), logits.ravel()), "val_ndcg10": float(np.mean(ndcg)),
            "val_ndcg10_retrieval": float(np.mean([
                ndcg_at_k(np.argsort(-d[:, 0]), set(np.flatnonzero(lab)), k)
                for d, lab in zip(val["dense"], labels)]))}


def train_epoch(model, opt, data: dict, order: np.ndarray, batch_size: int, dev) -> tuple[float, int]:
    """One pass over ``data`` in ``order`` (full batches); returns (mean loss, (user, item) pairs seen)."""
    import torch

    steps, total = batches_per_epoch(len(order), batch_size), 0.0
    for b in range(steps):
        idx = order[b * batch_size:(b + 1) * batch_size]
        loss = listwise_loss(_logits(model, data, idx, dev), torch.as_tensor(data["label"][idx], device=dev))
        opt.zero_grad()
        loss.backward()
        opt.step()
        total += loss.item()
    return total / steps, steps * batch_size * data["label"].shape[1]


def train_loop(config: dict) -> None:
    """Ray Train worker loop: listwise loss over each user's candidates, checkpoint per epoch."""
    import ray.train
    import ray.train.torch
    import torch

    torch.manual_seed(config["seed"])
    dev = ray.train.torch.get_device()
    model = ray.train.torch.prepare_model(DeepFM(**config["model_kwargs"]))
    opt = torch.optim.Adam(model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])
    start, history = restore(model, opt)
    rank = ray.train.get_context().get_world_rank()
    train = cache_shard("train")
    val = cache_shard("val") if rank == 0 else None
    n, bs = len(train["label"]), config["batch_size"]
    for epoch in range(start, config["epochs"]):
        model.train()
        order = np.random.default_rng([config["seed"], epoch, rank]).permutation(n)
        t0 = time.perf_counter()
        loss, samples = train_epoch(model, opt, train, order, bs, dev)
        metrics = {"loss": loss, "samples": samples, "seconds": time.perf_counter() - t0, "start_epoch": start}
        if val is not None:
            model.eval()
            metrics.update(validation_metrics(model.module if hasattr(model, "module") else model, val, dev))
        report_epoch(model, opt, epoch, metrics, history)
        if config.get("fail_after_epoch") == epoch and start == 0:
            raise InjectedFailure(f"injected failure after epoch {epoch} (ranker.fail_after_epoch)")
        if config.get("hold_after_epoch") == epoch and start == 0:
            hold_until_killed(config["hold_dir"])


def write_snapshots(cfg: C.RecsysConfig, out: str, shape: DataShape | None = None) -> tuple[pa.Table, int]:
    """Validate impressions, write the three feature snapshots and rejects; (valid impressions, rejects)."""
    shape = shape or data_shape(cfg, out)
    items = read_table(f"{out}/items")
    impressions, bad = validate_impressions(read_table(f"{out}/impressions"), shape.num_users, items.num_rows)
    write_table(rejects_table(bad), f"{out}/rejects")
    for name, until in progress(list(zip(SNAPSHOTS, shape.bounds)), "snapshots", unit="snapshots"):
        users_t, items_t = snapshot(impressions, items, shape.num_users, shape.num_categories, until,
                                    seen=shape.exclude_seen)
        write_table(users_t, f"{out}/features/{name}/users")
        write_table(items_t, f"{out}/features/{name}/items")
    return impressions, len(bad)


def time_slice(impressions: pa.Table, lo: int, hi: int) -> pa.Table:
    """Impressions with lo <= ts < hi."""
    ts = impressions.column("ts").to_numpy()
    return impressions.filter(pa.array((ts >= lo) & (ts < hi)))


def _stage(stage, data: pa.Table, kwargs: dict, batch_size: int):
    import ray

    return ray.data.from_arrow(data).map_batches(
        stage, fn_constructor_kwargs=kwargs, batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=1))


def impression_examples(part: pa.Table, out: str, snapshot_name: str, val_fraction: float = 0.0):
    """Lazy Ray Dataset of ranker rows for the impressions in ``part``, features as of a snapshot."""
    return _stage(RankerExamples, part, {"features_dir": f"{out}/features/{snapshot_name}",
                                         "embeddings_dir": out, "val_fraction": val_fraction}, 4096)


def candidate_examples(users: pa.Table, out: str, snapshot_name: str, r: C.RetrievalConfig, val_fraction: float):
    """Lazy Ray Dataset of ranker rows: each user's retrieved candidates, labelled by later clicks."""
    return _stage(CandidateExamples, users, {"features_dir": f"{out}/features/{snapshot_name}",
                                             "embeddings_dir": out, "candidates": r.candidates,
                                             "index": index_options(r), "val_fraction": val_fraction}, 256)


def train(cfg: C.RecsysConfig, out: str, impressions: pa.Table, storage_path: str | None = None,
          hold_after_epoch: tuple[int, str] | None = None):
    """Build examples in [t1, t2), fit the ranker; returns (Train Result, model kwargs, seconds).

    ``storage_path`` (a local path or ``oss://``/``s3://`` URI) holds the Train run; default
    ``ranker.storage_path``, else ``<out>/train``.
    ``hold_after_epoch=(epoch, pid_dir)`` (tests) makes every worker of the first attempt stop after
    that epoch's checkpoint, write its pid under the URI ``pid_dir`` and wait to be killed
    (:func:`hold_until_killed`).
    """
    from ray.data.expressions import col

    k = cfg.ranker
    shape = data_shape(cfg, out)
    t1, t2 = shape.t1, shape.t2
    rows = candidate_examples(clicked_by_user(impressions, t1, t2), out, "ranker", cfg.retrieval,
                              k.val_fraction).materialize()
    train_ds = rows.filter(expr=col("is_val") == False).drop_columns(["is_val"])
    val_ds = rows.filter(expr=col("is_val") == True).drop_columns(["is_val"])
    kwargs = model_kwargs(cfg, read_table(f"{out}/items").num_rows, shape.num_categories)
    loop_cfg = {"model_kwargs": kwargs, "seed": cfg.data.seed, "lr": k.lr, "weight_decay": k.weight_decay,
                "epochs": k.epochs, "batch_size": k.batch_size, "fail_after_epoch": k.fail_after_epoch}
    if hold_after_epoch is not None:
        loop_cfg.update(hold_after_epoch=hold_after_epoch[0], hold_dir=hold_after_epoch[1])
    stable = k.model_dump(exclude={"fail_after_epoch", "max_failures", "storage_path"})
    name = run_name("ranker", stable, cfg.data.model_dump(), shape.as_dict(), cfg.retrieval.candidates, rows.count(),
                    param_shapes(DeepFM(**kwargs)))
    t0 = time.perf_counter()
    result = fit(train_loop, loop_cfg, {"train": train_ds, "val": val_ds}, k,
                 storage_path or k.storage_path or f"{out}/train", name, max_failures=k.max_failures,
                 unsplit=("val",))
    return result, kwargs, time.perf_counter() - t0


def run(cfg: C.RecsysConfig, run: Run) -> StepResult:
    """Snapshots + ranker training; saves ``models/ranker.pt``."""
    out = run.dir
    impressions, n_rejects = write_snapshots(cfg, out)
    result, kwargs, train_s = train(cfg, out, impressions)
    state = load_state(result.checkpoint)
    model = DeepFM(**kwargs)
    model.load_state_dict(state["model"])
    version = f"{out.rstrip('/').rsplit('/', 1)[-1]}-e{state['epoch']}"
    uri = save_model(model, kwargs, f"{out}/{MODEL_FILE}", epoch=state["epoch"], version=version,
                     metrics=state["metrics"])
    m = state["metrics"]
    metrics = {"ranker_rows": impressions.num_rows, "model_version": version, "ranker_val_auc": m.get("val_auc"),
               "ranker_val_ndcg10": m.get("val_ndcg10"), "retrieval_val_ndcg10": m.get("val_ndcg10_retrieval"),
               "ranker_epochs": state["epoch"] + 1,
               "ranker_samples_per_s": cfg.ranker.num_workers * m["samples"] / max(m["seconds"], 1e-9),
               "ranker_start_epoch": m.get("start_epoch"), "ranker_train_s": train_s}
    outputs = {"ranker": uri, "rejects": f"{out}/rejects",
               **{f"features_{s}": f"{out}/features/{s}" for s in SNAPSHOTS},
               **history_outputs(out, "ranker", state.get("history", []))}
    return StepResult(outputs, metrics, rows=impressions.num_rows, rejects=n_rejects)


if __name__ == "__main__":
    from .template import TEMPLATE

    TEMPLATE.step_alias("ranking")
