"""Two-tower retrieval: train with Ray Train (in-batch negatives), embed with Ray Data, index.

Positive pairs are clicks (user -> item) and search queries (user or anonymous +
query tokens -> item) before t1. Item and user embeddings are computed by Ray
Data batch inference into ``item_embeddings`` / ``user_embeddings``; ``recsys.index.VectorIndex``
searches them (faiss: exact up to ``retrieval.exact_max_items`` items, IVF beyond).
"""
from __future__ import annotations

import time

import numpy as np
import pyarrow as pa

from pipelines.io import read_table, write_dataset
from pipelines.template import Run, StepResult

from . import config as C
from .common import DataShape, data_shape, generated_shape
from .models import TwoTower, in_batch_softmax_loss, load_model, save_model, tokenize
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

MODEL_FILE = "models/retriever.pt"


def model_kwargs(cfg: C.RecsysConfig, items: pa.Table, shape: DataShape | None = None) -> dict:
    r = cfg.retrieval
    shape = shape or generated_shape(cfg)
    return {"num_users": shape.num_users, "num_items": items.num_rows,
            "num_categories": shape.num_categories,
            "item_category": items.column("category").to_numpy().astype(np.int64),
            "item_tokens": tokenize(items.column("title").to_pylist(), r.vocab_buckets, r.max_tokens),
            "vocab_buckets": r.vocab_buckets, "embed_dim": r.embed_dim, "hidden": r.hidden}


def training_pairs(cfg: C.RecsysConfig, clicks: pa.Table, queries: pa.Table, until_ts: int) -> dict:
    """Positive (user_index, tokens, item_id) pairs before ``until_ts``; user_index 0 = anonymous."""
    r = cfg.retrieval
    rng = np.random.default_rng(cfg.data.seed)
    c_keep = clicks.column("ts").to_numpy() < until_ts
    q_keep = queries.column("ts").to_numpy() < until_ts
    c_user = clicks.column("user_id").to_numpy()[c_keep] + 1
    q_user = queries.column("user_id").to_numpy()[q_keep] + 1
    q_user = np.where(rng.random(len(q_user)) < r.anonymous_rate, 0, q_user)
    q_tokens = tokenize(np.asarray(queries.column("query").to_pylist(), dtype=object)[q_keep],
                        r.vocab_buckets, r.max_tokens)
    return {
        "user_index": np.concatenate([c_user, q_user]).astype(np.int64),
        "tokens": np.concatenate([np.zeros((len(c_user), r.max_tokens), np.int64), q_tokens]),
        "item_id": np.concatenate([clicks.column("item_id").to_numpy()[c_keep],
                                   queries.column("item_id").to_numpy()[q_keep]]).astype(np.int64),
    }


def train_loop(config: dict) -> None:
    """Ray Train worker loop: in-batch sampled softmax with logQ correction, checkpoint per epoch."""
    import ray.train
    import ray.train.torch
    import torch

    torch.manual_seed(config["seed"])
    dev = ray.train.torch.get_device()
    model = ray.train.torch.prepare_model(TwoTower(**config["model_kwargs"]))
    opt = torch.optim.Adam(model.parameters(), lr=config["lr"])
    start, history = restore(model, opt)
    data = cache_shard("train")
    n, bs = len(data["item_id"]), config["batch_size"]
    log_q = torch.as_tensor(config["log_q"], dtype=torch.float32, device=dev) if config["log_q"] else None
    rank = ray.train.get_context().get_world_rank()
    for epoch in range(start, config["epochs"]):
        order = np.random.default_rng([config["seed"], epoch, rank]).permutation(n)
        model.train()
        total, t0 = 0.0, time.perf_counter()
        steps = batches_per_epoch(n, bs)
        for b in range(steps):
            idx = order[b * bs:(b + 1) * bs]
            user = torch.as_tensor(data["user_index"][idx], device=dev)
            toks = torch.as_tensor(data["tokens"][idx], device=dev)
            items = torch.as_tensor(data["item_id"][idx], device=dev)
            q, v = model(user, toks, items)
            loss = in_batch_softmax_loss(q, v, items, config["temperature"],
                                         log_q[items] if log_q is not None else None)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item()
        report_epoch(model, opt, epoch, {"loss": total / steps, "samples": steps * bs,
                                         "seconds": time.perf_counter() - t0}, history)


class Encoder:
    """Ray Data stage: ids -> unit embeddings from the retriever (``kind``: item or user)."""

    def __init__(self, model_uri: str, kind: str):
        import torch

        from .models import device

        self.torch, self.dev, self.kind = torch, device(), kind
        self.model = load_model(TwoTower, model_uri)[0].to(self.dev)

    def __call__(self, batch: dict) -> dict:
        key = f"{self.kind}_id"
        ids = self.torch.as_tensor(np.asarray(batch[key], dtype=np.int64), device=self.dev)
        with self.torch.no_grad():
            if self.kind == "item":
                vec = self.model.item_vec(ids)
            else:
                empty = self.torch.zeros((len(ids), self.model.item_tokens.shape[1]), dtype=self.torch.long,
                                         device=self.dev)
                vec = self.model.query_vec(ids + 1, empty)
        return {key: np.asarray(batch[key], dtype=np.int64), "embedding": vec.cpu().numpy()}


def embed(ids_table: pa.Table, model_uri: str, kind: str, r: C.RetrievalConfig):
    """Lazy Ray Dataset of (``<kind>_id``, embedding) by batch inference on an actor pool."""
    import ray

    return ray.data.from_arrow(ids_table).map_batches(
        Encoder, fn_constructor_kwargs={"model_uri": model_uri, "kind": kind}, batch_size=r.embed_batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=r.max_actors), num_cpus=r.num_cpus,
        num_gpus=r.num_gpus or None)


def run(cfg: C.RecsysConfig, run: Run) -> StepResult:
    """Train the retriever and embed every item and user."""
    out = run.dir
    import ray

    r = cfg.retrieval
    shape = data_shape(cfg, out)
    t1 = shape.t1
    items = read_table(f"{out}/items")
    pairs = training_pairs(cfg, read_table(f"{out}/clicks"), read_table(f"{out}/queries"), t1)
    counts = np.bincount(pairs["item_id"], minlength=items.num_rows) + 1.0
    log_q = np.log(counts / counts.sum()).tolist() if r.logq_correction else None
    kwargs = model_kwargs(cfg, items, shape)
    loop_cfg = {"model_kwargs": kwargs, "seed": cfg.data.seed, "lr": r.lr, "epochs": r.epochs,
                "batch_size": r.batch_size, "temperature": r.temperature, "log_q": log_q}
    from ray.data.extensions import ArrowTensorArray

    ds = ray.data.from_arrow(pa.table({"user_index": pairs["user_index"], "item_id": pairs["item_id"],
                                       "tokens": ArrowTensorArray.from_numpy(pairs["tokens"])}))
    name = run_name("retriever", r.model_dump(), cfg.data.model_dump(), shape.as_dict(), len(pairs["item_id"]),
                    param_shapes(TwoTower(**kwargs)))
    t0 = time.perf_counter()
    result = fit(train_loop, loop_cfg, {"train": ds}, r, f"{out}/train", name)
    train_s = time.perf_counter() - t0
    state = load_state(result.checkpoint)
    model = TwoTower(**kwargs)
    model.load_state_dict(state["model"])
    model_uri = save_model(model, kwargs, f"{out}/{MODEL_FILE}", epoch=state["epoch"])
    item_ids = pa.table({"item_id": items.column("item_id")})
    user_ids = pa.table({"user_id": np.arange(shape.num_users, dtype=np.int64)})
    outputs = {"retriever": model_uri,
               "item_embeddings": write_dataset(embed(item_ids, model_uri, "item", r), f"{out}/item_embeddings"),
               "user_embeddings": write_dataset(embed(user_ids, model_uri, "user", r), f"{out}/user_embeddings"),
               **history_outputs(out, "retriever", state.get("history", []))}
    metrics = {"train_pairs": len(pairs["item_id"]), "retriever_loss": state["metrics"].get("loss"),
               "retriever_epochs": state["epoch"] + 1, "retriever_train_s": train_s}
    return StepResult(outputs, metrics, rows=len(item_ids) + len(user_ids))


if __name__ == "__main__":
    from .template import TEMPLATE

    TEMPLATE.step_alias("retrieval")
