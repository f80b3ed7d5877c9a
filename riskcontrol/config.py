"""Config models of the riskcontrol template (loaded from ``configs/*.yaml`` plus ``--set``)."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from pipelines.config import LocalRayConfig, StrictModel, load_config

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "local.yaml"
# Ray Serve's throughput-optimized mode with the HAProxy ingress; these must be in the environment of
# the Ray processes (controller, proxy, replicas): set when this template starts its own local Ray,
# `deploy.local.up(spec, env=FAST_SERVE_ENV)` for a local cluster, the cluster's env for a managed one.
FAST_SERVE_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"}


class DataConfig(StrictModel):
    """The transaction generator."""

    rows: int = Field(200_000, ge=100)
    cards: int = Field(4_000, ge=10)
    merchants: int = Field(600, ge=20)
    days: int = Field(30, ge=3)
    start_date: str = "2026-01-01"
    fraud_rate: float = Field(0.02, gt=0, lt=0.2)
    invalid_rate: float = Field(0.0005, ge=0, lt=0.5)
    label_delay_days: tuple[float, float] = (1.0, 5.0)
    seed: int = 7
    shards: int = Field(4, ge=1)
    # where transactions go: a Parquet folder in the run dir (default) or a MySQL table
    mysql_url: str | None = None
    mysql_table: str = "riskcontrol_transactions"
    num_cpus: float = Field(1, gt=0)


class FeatureConfig(StrictModel):
    """Point-in-time feature computation (Ray Data)."""

    num_cpus: float = Field(1, gt=0)
    blocks: int = Field(8, ge=1)  # hash partitions by card / merchant (each holds whole cards)
    max_reject_ratio: float = Field(0.01, ge=0, le=1)


class TrainConfig(StrictModel):
    """Distributed LightGBM (Ray Train) with a time-based split."""

    num_workers: int = Field(2, ge=0)
    num_cpus: float = Field(1, gt=0)
    train_frac: float = Field(0.6, gt=0, lt=1)
    valid_frac: float = Field(0.15, gt=0, lt=1)
    num_boost_round: int = Field(400, ge=1)
    early_stopping_rounds: int = Field(20, ge=1)
    learning_rate: float = Field(0.1, gt=0)
    num_leaves: int = Field(31, ge=2)
    min_data_in_leaf: int = Field(40, ge=1)
    feature_fraction: float = Field(0.9, gt=0, le=1)
    # imbalance: "auto" = sqrt(negatives / positives) on the training slice
    scale_pos_weight: float | Literal["auto"] = "auto"
    storage_path: str | None = None  # Ray Train storage (oss:// or a shared mount); default <run_dir>/ray_train
    compare_inprocess: bool = True   # also train in-process on the same data (auprc_inprocess)

    @model_validator(mode="after")
    def _fractions(self):
        if self.train_frac + self.valid_frac >= 1:
            raise ValueError("train_frac + valid_frac must leave a test slice (< 1)")
        return self


class EvalConfig(StrictModel):
    alert_budget: float = Field(0.01, gt=0, lt=1)  # share of transactions analysts can review
    max_fpr: float = Field(0.01, gt=0, lt=1)


class ScoreConfig(StrictModel):
    """Batch scoring with Ray Data actors (model loaded once per actor)."""

    input: str | None = None          # Parquet folder; default: the run's transactions
    input_mysql_url: str | None = None  # read transactions from MySQL instead
    input_table: str = "riskcontrol_transactions"
    model_dir: str | None = None      # default: the run's model
    output_mysql_url: str | None = None  # also upsert scores into this MySQL table
    output_table: str = "riskcontrol_scores"
    batch_size: int = Field(4096, ge=1)
    num_cpus: float = Field(1, gt=0)
    max_actors: int = Field(2, ge=1)
    high_threshold: float | None = None  # default: the alert-budget threshold from evaluation
    medium_threshold: float | None = None


class ServeConfig(StrictModel):
    """Online scoring on Ray Serve."""

    app_name: str = "riskcontrol"
    route_prefix: str = "/riskcontrol"
    model_dir: str | None = None
    store: Literal["memory", "redis"] = "memory"
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = "riskcontrol"
    num_cpus: float = Field(1, gt=0)   # per replica
    max_actors: int = Field(1, ge=1)   # replicas (the in-process store needs 1; use redis for more)
    max_batch_size: int = Field(32, ge=1)
    batch_wait_timeout_s: float = Field(0.002, ge=0)
    max_ongoing_requests: int = Field(64, ge=1)
    request_timeout_s: float = Field(5.0, gt=0)  # per request: 504 past it (/healthz: 503)
    redis_timeout_s: float = Field(2.0, gt=0)    # connect/read timeout of each Redis call
    memory_max_entries: int = Field(100_000, ge=1)  # memory store: cards and merchants each, LRU
    max_card_recent: int = Field(1000, ge=1)        # rows a card keeps from its last 7 days (features cap)
    max_merchant_events: int = Field(10_000, ge=1)  # a merchant's 24 h times and pending labels, each
    fast_serve: bool = True  # RAY_SERVE_THROUGHPUT_OPTIMIZED + HAProxy when this run starts Ray
    smoke_requests: int = Field(200, ge=0)
    block: bool = False


class RiskConfig(StrictModel):
    data: DataConfig = DataConfig()
    features: FeatureConfig = FeatureConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    score: ScoreConfig = ScoreConfig()
    serve: ServeConfig = ServeConfig()
    local_ray: LocalRayConfig = LocalRayConfig()

    @model_validator(mode="after")
    def _fast_serve_env(self):
        if self.serve.fast_serve:  # an in-process Ray's Serve processes must start with these
            self.local_ray.env = {**FAST_SERVE_ENV, **self.local_ray.env}
        return self


def load(path: str | None = None, overrides=()) -> RiskConfig:
    """The template config: ``path`` (default configs/local.yaml) plus ``--set`` overrides."""
    return load_config(RiskConfig, path, overrides, default_path=DEFAULT_CONFIG)
