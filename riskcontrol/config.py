"""Config models of the riskcontrol template (loaded from ``configs/*.yaml`` plus ``--set``)."""
from __future__ import annotations

from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

from pydantic import Field, model_validator

from pipelines.config import FAST_SERVE_ENV, LocalRayConfig, StrictModel, load_config
from pipelines.input import InputConfig
from pipelines.serving import Autoscaling, check_replicas

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "local.yaml"
# serve.fast_serve: FAST_SERVE_ENV (Serve's throughput-optimized mode with the HAProxy ingress) must be in
# the environment of the Ray processes (controller, proxy, replicas): set when this template starts its own
# local Ray, `deploy.local.up(spec, env=FAST_SERVE_ENV)` for a local cluster, the cluster's env for a managed one.


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


class RiskInputConfig(InputConfig):
    """Your data (``--input``): transactions instead of the generator's, and optional late labels."""

    labels_path: str | None = Field(None, description="late labels (transaction_id, is_fraud, label_time): "
                                                      "file, folder or oss:// prefix; joined by transaction_id")

    @model_validator(mode="after")
    def _labels_source(self):
        if self.labels_path and not self.path:
            raise ValueError("labels_path: give the transactions they label as input.path (--input) too")
        if self.labels_path and urlparse(self.labels_path).scheme in ("mysql", "mysql+pymysql"):
            raise ValueError("labels_path: MySQL labels are not read yet; give a Parquet/CSV file, folder or "
                             "oss:// prefix, or put is_fraud and label_time columns in input.table")
        return self


# score.* keys that moved to the input section
MOVED = {"input": "input.path (--input)", "input_mysql_url": "input.path=mysql://host:port/db",
         "input_table": "input.table"}


class ScoreConfig(StrictModel):
    """Batch scoring with Ray Data actors (model loaded once per actor). What it scores: the run's
    features, or ``input.path`` when the run's features were not made from it."""

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data):
        for key, new in MOVED.items():
            if isinstance(data, dict) and key in data:
                raise ValueError(f"{key!r} moved to the input section: use {new}")
        return data

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
    # auto: redis on a HIGH_AVAILABILITY cluster (a replica's memory is lost with it; riskcontrol.serve), else memory
    store: Literal["auto", "memory", "redis"] = "auto"
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = "riskcontrol"
    num_cpus: float = Field(1, gt=0)   # per replica
    max_actors: int | None = Field(None, ge=1)  # fixed replicas (default 1; the memory store needs 1)
    autoscaling: Autoscaling | None = None  # or replicas between min and max on load (not with max_actors)
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

    @model_validator(mode="after")
    def _replicas(self):
        check_replicas(self.max_actors, self.autoscaling, "serve.max_actors", "serve.autoscaling")
        most = self.autoscaling.max_replicas if self.autoscaling else self.max_actors or 1
        if self.store in ("memory", "auto") and most > 1:
            auto = " (serve.store=auto is memory off a HIGH_AVAILABILITY cluster)" if self.store == "auto" else ""
            raise ValueError(f"serve.store=memory keeps card and merchant state inside one replica{auto}: for up to "
                             f"{most} replicas use serve.store=redis (shared by replicas)")
        return self


class RiskConfig(StrictModel):
    input: RiskInputConfig = RiskInputConfig()
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
            self.local_ray.add_env(FAST_SERVE_ENV)
        return self


def load(path: str | None = None, overrides=()) -> RiskConfig:
    """The template config: ``path`` (default configs/local.yaml) plus ``--set`` overrides."""
    return load_config(RiskConfig, path, overrides, default_path=DEFAULT_CONFIG)
