"""Distributed LightGBM with Ray Train (truly data-parallel), or in-process for comparison.

``LightGBMTrainer`` runs :func:`train_loop_per_worker` on ``num_workers`` workers;
each gets a shard of the training slice and the whole validation slice, and the
workers form one LightGBM network (``get_network_params()``,
``tree_learner=data_parallel``) so every worker's rows count. The checkpoint is
a folder: ``model.txt`` + ``model.json`` (feature list, metadata, the number of
training rows the model saw). ``--set train.num_workers=0`` trains in-process.
"""
from __future__ import annotations

import os
import posixpath
import tempfile
import time

import numpy as np
import pandas as pd

from pipelines.io import (
    exists,
    join,
    read_bytes,
    read_json,
    read_parquet,
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
    return lo + (hi - lo) * cfg.train_frac, lo + (hi - lo) * (cfg.train_frac + cfg.valid_frac)


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


def train_loop_per_worker(config: dict) -> None:
    """One Ray Train worker: its shard of the training slice, the whole validation slice."""
    import ray.train
    from ray.train.lightgbm import get_network_params

    cfg = TrainConfig(**config["train"])
    train_df = ray.train.get_dataset_shard("train").materialize().to_pandas()
    valid_df = ray.train.get_dataset_shard("validation").materialize().to_pandas()
    network = get_network_params()
    params = {**lgb_params(cfg, config["pos_weight"], max(1, int(cfg.num_cpus))),
              **network, "tree_learner": "data_parallel"}
    booster = fit_booster(train_df, valid_df, params, cfg)
    ctx = ray.train.get_context()
    metrics = {"rows_worker": len(train_df), "best_iteration": int(booster.best_iteration), "rows_seen": rows_seen(booster),
               "valid_average_precision": float(booster.best_score["valid"]["average_precision"])}
    # rank 0 saves the model (identical on every worker) with its own shard size as evidence
    if ctx.get_world_rank() == 0:
        with tempfile.TemporaryDirectory() as tmp:
            save_model(booster, tmp, {"trainer": "ray", "num_workers": ctx.get_world_size(),
                                      "rows_worker_0": len(train_df), **config["meta"]})
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    else:
        ray.train.report(metrics)


def train_ray(train_ds, valid_ds, cfg: TrainConfig, pos_weight: float, out_dir: str, meta: dict) -> dict:
    """Fit with ``LightGBMTrainer`` on ``cfg.num_workers`` workers; the model lands in ``out_dir``
    (local path or ``oss://``). Ray Train's storage: ``train.storage_path``, else ``ray_train`` beside
    ``out_dir``."""
    import ray.train
    from ray.train.lightgbm import LightGBMTrainer

    parent = posixpath.dirname(str(out_dir).rstrip("/"))
    storage, storage_fs = train_storage(cfg.storage_path or join(parent, "ray_train"))
    trainer = LightGBMTrainer(
        train_loop_per_worker,
        train_loop_config={"train": cfg.model_dump(), "pos_weight": pos_weight, "meta": meta},
        datasets={"train": train_ds, "validation": valid_ds},
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.num_workers,
                                               resources_per_worker={"CPU": cfg.num_cpus}),
        run_config=ray.train.RunConfig(name=f"riskcontrol-{posixpath.basename(parent)}-{int(time.time())}",
                                       storage_path=storage, storage_filesystem=storage_fs),
    )
    result = trainer.fit()
    with tempfile.TemporaryDirectory() as tmp:  # checkpoint storage -> the model folder
        upload_dir(result.checkpoint.to_directory(tmp), out_dir)
    return read_json(join(out_dir, "model.json"))


def train_inprocess(train_df: pd.DataFrame, valid_df: pd.DataFrame, cfg: TrainConfig, pos_weight: float,
                    out_dir: str, meta: dict) -> dict:
    """Fit in this process with the same function and parameters (``num_workers: 0``)."""
    params = lgb_params(cfg, pos_weight, max(1, os.cpu_count() or 1))
    booster = fit_booster(train_df, valid_df, params, cfg)
    save_model(booster, out_dir, {"trainer": "inprocess", "num_workers": 0, **meta})
    return read_json(join(out_dir, "model.json"))


def read_features(path: str, columns=None) -> pd.DataFrame:
    """The features Parquet folder as one DataFrame (driver side)."""
    from pipelines.io import read_table

    return read_table(path, columns=columns).to_pandas(ignore_metadata=True)


def run_training(cfg: RiskConfig, features_path: str, out_dir: str, num_workers: int | None = None,
                 name: str = "model") -> dict:
    """Time-split the features, train (Ray Train, or in-process with 0 workers); the model's metadata."""
    tcfg = cfg.train if num_workers is None else cfg.train.model_copy(update={"num_workers": num_workers})
    cols = ["transaction_id", "event_time", LABEL] + FEATURE_COLUMNS
    model_dir = f"{out_dir}/{name}"
    if tcfg.num_workers == 0:
        frame = read_features(features_path, cols)
        t1, t2 = split_times(frame["event_time"].min(), frame["event_time"].max(), tcfg)
        train_df, valid_df = slice_frame(frame, None, t1), slice_frame(frame, t1, t2)
        labels, n_valid_pos = train_df[LABEL], int(valid_df[LABEL].sum())
    else:
        ds = read_parquet(features_path, columns=cols)
        t1, t2 = split_times(ds.min("event_time"), ds.max("event_time"), tcfg)
        train_ds = ds.map_batches(slice_frame, fn_kwargs={"start": None, "end": t1},
                                  batch_format="pandas").materialize()
        valid_ds = ds.map_batches(slice_frame, fn_kwargs={"start": t1, "end": t2},
                                  batch_format="pandas").materialize()
        labels = train_ds.select_columns([LABEL]).to_pandas()[LABEL]
        n_valid_pos = int(valid_ds.sum(LABEL) or 0)
    if len(labels) and labels.isna().all():
        raise ValueError("train: the transactions have no labels: give is_fraud in input.path "
                         "(--set input.columns.is_fraud=YOURS) or input.labels_path; to score them with a "
                         "trained model: python -m riskcontrol score --model DIR --input ...")
    if labels.sum() == 0 or n_valid_pos == 0:
        raise ValueError("the training or validation slice has no fraud: generate more rows")
    pos_weight = positive_weight(tcfg, labels)
    meta = {"version": f"{name}-{time.strftime('%Y%m%d%H%M%S')}", "train_end": str(t1),
            "valid_end": str(t2), "train_rows": len(labels), "pos_weight": pos_weight}
    if tcfg.num_workers == 0:
        return train_inprocess(train_df, valid_df, tcfg, pos_weight, model_dir, meta)
    return train_ray(train_ds, valid_ds, tcfg, pos_weight, model_dir, meta)


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
