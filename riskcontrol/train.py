"""Distributed LightGBM with Ray Train (truly data-parallel), or in-process for comparison.

``LightGBMTrainer`` runs :func:`train_loop_per_worker` on ``num_workers`` workers;
each reads its own share of the features' Parquet row groups (the training window) and
the whole validation window straight from storage, the time filter pushed into the read
(no Ray Data hop, nothing materialised on the driver, which reads only the time and label
columns to place the split), and the workers form one LightGBM network
(``get_network_params()``, ``tree_learner=data_parallel``) so every worker's rows count.
Every worker needs the same validation rows: early stopping must stop them together. The checkpoint is
a folder: ``model.txt`` + ``model.json`` (feature list, metadata, the number of
training rows the model saw). ``--set train.num_workers=0`` trains in-process.
"""
from __future__ import annotations

import os
import posixpath
import tempfile
import time
from itertools import pairwise

import numpy as np
import pandas as pd

from pipelines import training
from pipelines.io import (
    exists,
    filesystem_for,
    join,
    read_bytes,
    read_json,
    train_storage,
    upload_dir,
    write_bytes,
    write_json,
)
from pipelines.template import Run, StepResult

from .config import RiskConfig, TrainConfig
from .features import CATEGORICAL_FEATURES, FEATURE_COLUMNS

LABEL = "is_fraud"


def split_times(lo, hi, cfg: TrainConfig) -> tuple[pd.Timestamp, pd.Timestamp]:
    """The two cut times of the time-based split: train < t1 <= validation < t2 <= test."""
    lo, hi = _utc(lo), _utc(hi)
    # whole microseconds: Parquet timestamps are in us, so a cut in ns would fall differently on the driver
    # (pandas, ns) and in the workers' pushed-down filter (us)
    return ((lo + (hi - lo) * cfg.train_frac).floor("us"),
            (lo + (hi - lo) * (cfg.train_frac + cfg.valid_frac)).floor("us"))


def _utc(value) -> pd.Timestamp:
    t = pd.Timestamp(value)
    return t.tz_localize("UTC") if t.tzinfo is None else t.tz_convert("UTC")


def slice_frame(df: pd.DataFrame, start=None, end=None) -> pd.DataFrame:
    """Rows with ``start <= event_time < end`` (either bound may be None)."""
    t = pd.to_datetime(df["event_time"], utc=True)
    mask = pd.Series(True, index=df.index)
    if start is not None:
        mask &= t >= start
    if end is not None:
        mask &= t < end
    return df[mask]


def lgb_params(cfg: TrainConfig, pos_weight: float, num_threads: int) -> dict:
    """LightGBM parameters from config (binary objective, imbalance weight, PR-AUC metric)."""
    return {
        "objective": "binary", "metric": ["average_precision", "auc"], "learning_rate": cfg.learning_rate,
        "num_leaves": cfg.num_leaves, "min_data_in_leaf": cfg.min_data_in_leaf,
        "feature_fraction": cfg.feature_fraction, "scale_pos_weight": pos_weight,
        "num_threads": num_threads, "verbose": -1, "deterministic": True, "seed": 7,
    }


def positive_weight(cfg: TrainConfig, labels) -> float:
    """``scale_pos_weight``: from config, or sqrt(negatives / positives) for "auto"."""
    if cfg.scale_pos_weight != "auto":
        return float(cfg.scale_pos_weight)
    y = np.asarray(labels)
    pos = max(int(y.sum()), 1)
    return float(np.sqrt((len(y) - pos) / pos))


def feature_matrix(df: pd.DataFrame, names=FEATURE_COLUMNS) -> np.ndarray:
    """The feature columns as a float matrix (NaN for missing), whatever the frame's dtypes."""
    return df[list(names)].to_numpy(dtype=np.float64, na_value=np.nan)


def fit_booster(train_df: pd.DataFrame, valid_df: pd.DataFrame, params: dict, cfg: TrainConfig):
    """Train one booster with early stopping on the validation slice (in-process or as a worker)."""
    import lightgbm as lgb

    common = {"feature_name": FEATURE_COLUMNS, "categorical_feature": CATEGORICAL_FEATURES}
    train_set = lgb.Dataset(feature_matrix(train_df), label=train_df[LABEL].to_numpy(dtype=float),
                            free_raw_data=False, **common)
    valid_set = lgb.Dataset(feature_matrix(valid_df), label=valid_df[LABEL].to_numpy(dtype=float),
                            reference=train_set, **common)
    return lgb.train(params, train_set, num_boost_round=cfg.num_boost_round, valid_sets=[valid_set],
                     valid_names=["valid"],
                     callbacks=[lgb.early_stopping(cfg.early_stopping_rounds, first_metric_only=True,
                                                   verbose=False)])


def rows_seen(booster) -> int:
    """Training rows the model was fit on: the first tree's root count (global under data_parallel)."""
    return int(booster.dump_model(num_iteration=1)["tree_info"][0]["tree_structure"]["internal_count"])


def save_model(booster, uri: str, meta: dict) -> str:
    """The checkpoint folder (local path or ``oss://``): ``model.txt`` plus ``model.json`` (features +
    metadata); returns ``uri``."""
    meta = {"features": FEATURE_COLUMNS, "categorical": CATEGORICAL_FEATURES,
            "best_iteration": int(booster.best_iteration or booster.current_iteration()),
            "rows_seen": rows_seen(booster), **meta}
    text = booster.model_to_string(num_iteration=booster.best_iteration or None)
    write_bytes(join(uri, "model.txt"), text.encode())
    write_json(join(uri, "model.json"), meta)
    return uri


def load_model(uri: str):
    """(booster, metadata) from a checkpoint folder (local path or ``oss://``), read where this runs."""
    import lightgbm as lgb

    uri = str(uri)
    if not exists(join(uri, "model.txt")):
        raise FileNotFoundError(f"no model at {uri} (expected model.txt and model.json)")
    meta = read_json(join(uri, "model.json"))
    return lgb.Booster(model_str=read_bytes(join(uri, "model.txt")).decode()), meta


def row_groups(features_path: str) -> list:
    """The features' Parquet row groups (fragments), in a stable order: the units workers share out."""
    import pyarrow.dataset as pads

    fs, path = filesystem_for(features_path)
    dataset = pads.dataset(path, format="parquet", filesystem=fs)
    fragments = sorted(dataset.get_fragments(), key=lambda f: f.path)
    return [group for fragment in fragments for group in fragment.split_by_row_group()]


def read_window(fragments: list, columns: list[str], start=None, end=None) -> pd.DataFrame:
    """Rows with ``start <= event_time < end`` of these row groups, the filter pushed into the Parquet
    read (a row group outside the window is skipped from its statistics)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if not fragments:
        return pd.DataFrame(columns=columns)
    kind = fragments[0].physical_schema.field("event_time").type
    tz = getattr(kind, "tz", None)

    def at(t):  # the bound in the column's own type (naive timestamps stay naive)
        t = pd.Timestamp(t)
        return pa.scalar(t.tz_convert(tz) if tz else t.tz_convert("UTC").tz_localize(None), type=kind)

    where = pc.scalar(True)
    if start is not None:
        where &= pc.field("event_time") >= at(start)
    if end is not None:
        where &= pc.field("event_time") < at(end)
    tables = [f.to_table(columns=columns, filter=where) for f in fragments]
    return pa.concat_tables(tables).to_pandas(ignore_metadata=True)


def my_share(items: list, rank: int, world: int) -> list:
    """Round-robin share of ``items`` for worker ``rank`` of ``world``."""
    return items[rank::world]


def train_loop_per_worker(config: dict) -> None:
    """One Ray Train worker: reads its own share of the training row groups and the whole validation
    window straight from Parquet (no Ray Data hop), then joins the LightGBM network."""
    import ray.train
    from ray.train.lightgbm import get_network_params

    cfg = TrainConfig(**config["train"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    started = time.perf_counter()
    groups = row_groups(config["features"])
    if config["by_groups"]:
        train_df = read_window(my_share(groups, rank, world), config["columns"], end=config["t1"])
    else:  # some worker's share of the row groups has no training rows: share the rows instead
        train_df = read_window(groups, config["columns"], end=config["t1"]).iloc[rank::world]
    valid_df = read_window(groups, config["columns"], start=config["t1"], end=config["t2"])
    read_s = time.perf_counter() - started
    network = get_network_params()
    params = {**lgb_params(cfg, config["pos_weight"], max(1, int(cfg.num_cpus))),
              **network, "tree_learner": "data_parallel"}
    booster = fit_booster(train_df, valid_df, params, cfg)
    seconds = {"read_s": round(read_s, 2), "fit_s": round(time.perf_counter() - started - read_s, 2)}
    metrics = {"rows_worker": len(train_df), "best_iteration": int(booster.best_iteration), "rows_seen": rows_seen(booster),
               "valid_average_precision": float(booster.best_score["valid"]["average_precision"])}
    # rank 0 saves the model (identical on every worker) with its own shard size as evidence
    if rank == 0:
        with tempfile.TemporaryDirectory() as tmp:
            save_model(booster, tmp, {"trainer": "ray", "num_workers": world,
                                      "rows_worker_0": len(train_df), **seconds, **config["meta"]})
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    else:
        ray.train.report(metrics)


def train_ray(features_path: str, t1, t2, cfg: TrainConfig, pos_weight: float, out_dir: str, meta: dict,
              by_groups: bool = True) -> dict:
    """Fit with ``LightGBMTrainer`` on ``cfg.num_workers`` workers, each reading its share of
    ``features_path`` (rows before ``t1``) and the validation window ``[t1, t2)`` itself; the model lands
    in ``out_dir`` (local path or ``oss://``). Ray Train's storage: ``train.storage_path``, else
    ``ray_train`` beside ``out_dir``."""
    import ray.train
    from ray.train.lightgbm import LightGBMTrainer

    parent = posixpath.dirname(str(out_dir).rstrip("/"))
    storage, storage_fs = train_storage(cfg.storage_path or join(parent, "ray_train"))
    trainer = LightGBMTrainer(
        train_loop_per_worker,
        train_loop_config={"train": cfg.model_dump(), "pos_weight": pos_weight, "meta": meta,
                           "features": features_path, "t1": str(t1), "t2": str(t2), "by_groups": by_groups,
                           "columns": ["event_time", LABEL] + FEATURE_COLUMNS},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.num_workers,
                                               resources_per_worker={"CPU": cfg.num_cpus}),
        run_config=ray.train.RunConfig(name=f"riskcontrol-{posixpath.basename(parent)}-{int(time.time())}",
                                       storage_path=storage, storage_filesystem=storage_fs),
    )
    result = training.fit(trainer)
    with tempfile.TemporaryDirectory() as tmp:  # checkpoint storage -> the model folder
        upload_dir(result.checkpoint.to_directory(tmp), out_dir)
    return read_json(join(out_dir, "model.json"))


def train_inprocess(train_df: pd.DataFrame, valid_df: pd.DataFrame, cfg: TrainConfig, pos_weight: float,
                    out_dir: str, meta: dict) -> dict:
    """Fit in this process with the same function and parameters (``num_workers: 0``)."""
    params = lgb_params(cfg, pos_weight, max(1, os.cpu_count() or 1))
    started = time.perf_counter()
    booster = fit_booster(train_df, valid_df, params, cfg)
    meta = {**meta, "fit_s": round(time.perf_counter() - started, 2)}
    save_model(booster, out_dir, {"trainer": "inprocess", "num_workers": 0, **meta})
    return read_json(join(out_dir, "model.json"))


def read_features(path: str, columns=None) -> pd.DataFrame:
    """The features Parquet folder as one DataFrame (driver side)."""
    from pipelines.io import read_table

    return read_table(path, columns=columns).to_pandas(ignore_metadata=True)


def label_counts(features_path: str, tcfg: TrainConfig) -> dict:
    """The time split and what training needs to know before it starts, from two columns only
    (``event_time``, the label) read on the driver: cut times, training labels, validation positives,
    and whether every worker's round-robin share of the row groups holds training rows (``by_groups``;
    else the workers share the rows)."""
    import pyarrow as pa

    groups = row_groups(features_path)
    tables = [g.to_table(columns=["event_time", LABEL]) for g in groups]
    if not tables:
        raise ValueError(f"train: no feature rows in {features_path}")
    table = pa.concat_tables(tables)
    times = pd.to_datetime(table.column("event_time").to_pandas(), utc=True)
    labels = table.column(LABEL).to_pandas()
    t1, t2 = split_times(times.min(), times.max(), tcfg)
    valid = (times >= t1) & (times < t2)
    sizes = np.cumsum([0] + [t.num_rows for t in tables])
    train_per_group = [int((times.iloc[a:b] < t1).sum()) for a, b in pairwise(sizes)]
    world = max(1, tcfg.num_workers)
    by_groups = all(sum(my_share(train_per_group, rank, world)) > 0 for rank in range(world))
    return {"t1": t1, "t2": t2, "train_labels": labels[times < t1], "valid_positives": int(labels[valid].sum()),
            "by_groups": by_groups, "groups": groups}


def run_training(cfg: RiskConfig, features_path: str, out_dir: str, num_workers: int | None = None,
                 name: str = "model") -> dict:
    """Time-split the features, train (Ray Train, or in-process with 0 workers); the model's metadata."""
    tcfg = cfg.train if num_workers is None else cfg.train.model_copy(update={"num_workers": num_workers})
    cols = ["transaction_id", "event_time", LABEL] + FEATURE_COLUMNS
    model_dir = f"{out_dir}/{name}"
    split = label_counts(features_path, tcfg)
    t1, t2, labels = split["t1"], split["t2"], split["train_labels"]
    if len(labels) and labels.isna().all():
        raise ValueError("train: the transactions have no labels: give is_fraud in input.path "
                         "(--set input.columns.is_fraud=YOURS) or input.labels_path; to score them with a "
                         "trained model: python -m riskcontrol score --model DIR --input ...")
    if labels.sum() == 0 or split["valid_positives"] == 0:
        raise ValueError("the training or validation slice has no fraud: generate more rows")
    pos_weight = positive_weight(tcfg, labels)
    meta = {"version": f"{name}-{time.strftime('%Y%m%d%H%M%S')}", "train_end": str(t1),
            "valid_end": str(t2), "train_rows": len(labels), "pos_weight": pos_weight}
    if tcfg.num_workers == 0:
        groups = split["groups"]  # listed once, by label_counts
        started = time.perf_counter()
        train_df, valid_df = read_window(groups, cols, end=t1), read_window(groups, cols, t1, t2)
        meta["read_s"] = round(time.perf_counter() - started, 2)
        return train_inprocess(train_df, valid_df, tcfg, pos_weight, model_dir, meta)
    return train_ray(features_path, t1, t2, tcfg, pos_weight, model_dir, meta, split["by_groups"])


def run(cfg: RiskConfig, run: Run) -> StepResult:
    """The train step: ``model`` from the run's ``features`` (Ray Train, ``train.num_workers``); with
    ``train.compare_inprocess`` also ``model_inprocess``, the same training in one process."""
    meta = run_training(cfg, run.input("features"), run.dir, name="model")
    outputs = {"model": run.path("model")}
    if cfg.train.compare_inprocess and cfg.train.num_workers > 0:
        run_training(cfg, run.input("features"), run.dir, num_workers=0, name="model_inprocess")
        outputs["model_inprocess"] = run.path("model_inprocess")
    metrics = {k: meta[k] for k in ("rows_seen", "train_rows", "num_workers", "best_iteration")}
    return StepResult(outputs, metrics)


if __name__ == "__main__":
    from .template import TEMPLATE

    TEMPLATE.step_alias("train")
