"""Config models of the recsys template (loaded from ``configs/*.yaml`` plus ``--set``)."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from pipelines.config import FAST_SERVE_ENV, LocalRayConfig, StrictModel, load_config
from pipelines.input import InputConfig
from pipelines.serving import Autoscaling, check_replicas

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
TEMPLATE = "recsys"


class DataConfig(StrictModel):
    """Synthetic users/items/impressions/queries from latent factors."""

    seed: int = 7
    num_users: int = Field(3000, ge=10)
    num_items: int = Field(500, ge=20)
    num_categories: int = Field(12, ge=2)
    latent_dim: int = Field(8, ge=2)
    days: int = Field(14, ge=3)
    ranker_days: int = Field(3, ge=1, description="days before the test slice used to train the ranker")
    test_days: int = Field(2, ge=1, description="last days: the evaluation time slice")
    sessions_per_user: float = Field(6.0, gt=0)
    slate_size: int = Field(10, ge=2)
    queries_per_user: float = Field(2.0, ge=0)
    popularity_alpha: float = Field(1.0, ge=0, description="Zipf exponent of item popularity")
    affinity_weight: float = Field(2.5, ge=0, description="weight of user-item affinity in the click logit")
    popularity_weight: float = Field(0.6, ge=0, description="weight of log popularity in the click logit")
    personal_exposure: float = Field(0.8, ge=0, le=1,
                                     description="share of each slate's candidates drawn from the user's categories")
    position_bias: float = Field(0.8, ge=0, description="click prob is scaled by 1/(1+position)^this")
    users_per_block: int = Field(500, ge=1)
    mysql_url: str | None = Field(None, description="also upsert the data into MySQL tables recsys_*")

    @model_validator(mode="after")
    def _slices(self):
        if self.ranker_days + self.test_days >= self.days:
            raise ValueError(f"ranker_days + test_days must be < days ({self.days})")
        return self


class RecsysInputConfig(InputConfig):
    """The ``input`` section: the user's interactions (``input.path``) and item side input
    (``input.items_path``) instead of generated data; schemas in :mod:`recsys.inputs`."""

    items_path: str | None = Field(None, description="item side input (item_id, optional title/text, "
                                                     "category, price): a file, folder or oss:// prefix")
    positive_rating: float = Field(4.0, description="implicit feedback: rating >= this is a positive "
                                                    "(used when a row has no click value)")
    test_fraction: float = Field(0.1, gt=0, lt=0.5, description="time split: the latest share of "
                                                                "interactions is the evaluation slice")
    ranker_fraction: float = Field(0.15, gt=0, lt=0.5, description="time split: the share before the test "
                                                                   "slice whose positives train the ranker")
    exclude_seen: bool = Field(True, description="never recommend an item the user already interacted "
                                                 "with (ratings: one per item); evaluation excludes them "
                                                 "from every method's list alike")

    @model_validator(mode="after")
    def _split(self):
        if self.test_fraction + self.ranker_fraction >= 0.9:
            raise ValueError("test_fraction + ranker_fraction must be < 0.9 (the retriever trains on the rest)")
        return self


class TrainWorkers(StrictModel):
    """Ray Train resources: ``num_workers`` x (``num_cpus``, ``num_gpus``)."""

    num_workers: int = Field(2, ge=1)
    num_cpus: float = Field(1, gt=0)
    num_gpus: float = Field(0, ge=0)


class RetrievalConfig(TrainWorkers):
    embed_dim: int = Field(32, ge=4)
    hidden: int = Field(64, ge=4)
    vocab_buckets: int = Field(2000, ge=16, description="hashed title/query token buckets")
    max_tokens: int = Field(8, ge=1)
    epochs: int = Field(4, ge=1)
    batch_size: int = Field(256, ge=2)
    lr: float = Field(0.01, gt=0)
    temperature: float = Field(0.1, gt=0)
    logq_correction: bool = True
    anonymous_rate: float = Field(0.3, ge=0, le=1, description="share of search pairs trained without the user")
    candidates: int = Field(100, ge=1, description="items retrieved per request for the ranker")
    exact_max_items: int = Field(1_000_000, ge=0, description="exact top-k search (faiss IndexFlatIP) up to "
                                 "this many items; a faiss IVF index beyond")
    ivf_lists: int | None = Field(None, ge=1, description="IVF cells (default ~sqrt(items))")
    ivf_probe: int | None = Field(None, ge=1, description="IVF cells searched per query (default cells/16, >= 8)")
    embed_batch_size: int = Field(1024, ge=1)
    max_actors: int = Field(1, ge=1, description="item/user embedding actor pool size")


class RankerConfig(TrainWorkers):
    embed_dim: int = Field(16, ge=2)
    hidden: list[int] = Field(default_factory=lambda: [64, 32])
    epochs: int = Field(4, ge=1)
    batch_size: int = Field(32, ge=1, description="users per step (each with its candidate list)")
    lr: float = Field(0.005, gt=0)
    weight_decay: float = Field(1e-5, ge=0)
    val_fraction: float = Field(0.1, gt=0, lt=1)
    max_failures: int = Field(1, ge=-1, description="worker-group restarts from the last checkpoint")
    fail_after_epoch: int | None = Field(
        None, description="testing: raise in the train loop after this epoch's checkpoint (first attempt)")
    storage_path: str | None = Field(
        None, description="Train checkpoints: a path or oss:// / s3:// URI every node reaches (default <run_dir>/train)")


class EvalConfig(StrictModel):
    k: int = Field(10, ge=1)
    recall_k: int = Field(50, ge=1)
    batch_size: int = Field(256, ge=1)
    num_cpus: float = Field(1, gt=0)
    max_actors: int = Field(1, ge=1)


class BatchConfig(StrictModel):
    k: int = Field(20, ge=1)
    output: Literal["parquet", "mysql"] = "parquet"
    mysql_url: str = "mysql://root@127.0.0.1:3306/test"
    mysql_table: str = "recsys_recommendations"
    batch_size: int = Field(256, ge=1)
    num_cpus: float = Field(1, gt=0)
    num_gpus: float = Field(0, ge=0)
    max_actors: int = Field(1, ge=1)


class ServeConfig(StrictModel):
    app_name: str = "recsys"
    route_prefix: str = "/recsys"
    feature_store: Literal["inprocess", "redis"] = "inprocess"
    redis_url: str = "redis://127.0.0.1:6379/0"
    search_relevance_weight: float = Field(
        3.0, ge=0, description="/search score = ranker score + this x query relevance logit")
    max_batch_size: int = Field(16, ge=1)
    # how long the ranker's first queued request waits for more: at 50 req/s 1 ms gathers a second request
    # one time in 20, so a longer wait is mostly added latency (5 ms: p50 25 ms, 1 ms: 18 ms); requests
    # that queue while a forward pass runs are batched whatever the wait
    batch_wait_timeout_s: float = Field(0.001, ge=0)
    fast_serve: bool = Field(True, description="RAY_SERVE_THROUGHPUT_OPTIMIZED + HAProxy when this run starts Ray "
                                               "(pipelines.config.FAST_SERVE_ENV)")
    num_cpus: float = Field(0.5, ge=0)
    num_gpus: float = Field(0, ge=0)
    ranker_replicas: int | None = Field(None, ge=1, description="fixed replicas (default 1), or autoscaling.ranker")
    retriever_replicas: int | None = Field(None, ge=1, description="fixed replicas (default 1), or autoscaling.retriever")
    ingress_replicas: int | None = Field(None, ge=1, description="fixed replicas (default 1), or autoscaling.ingress")
    autoscaling: dict[Literal["ingress", "retriever", "ranker"], Autoscaling] = Field(
        default_factory=dict, description="per deployment: replicas between min and max on load (not with its *_replicas)")
    request_timeout_s: float = Field(5.0, gt=0, description="per request: a 504 past it (/healthz: a 503)")

    @model_validator(mode="after")
    def _replicas(self):
        for name in ("ingress", "retriever", "ranker"):
            check_replicas(getattr(self, f"{name}_replicas"), self.autoscaling.get(name),
                           f"serve.{name}_replicas", f"serve.autoscaling.{name}")
        return self


class RecsysConfig(StrictModel):
    local_ray: LocalRayConfig = LocalRayConfig()
    input: RecsysInputConfig = RecsysInputConfig()
    data: DataConfig = DataConfig()
    retrieval: RetrievalConfig = RetrievalConfig()
    ranker: RankerConfig = RankerConfig()
    eval: EvalConfig = EvalConfig()
    batch: BatchConfig = BatchConfig()
    serve: ServeConfig = ServeConfig()

    @model_validator(mode="after")
    def _fast_serve_env(self):
        if self.serve.fast_serve:  # an in-process Ray's Serve processes must start with these
            self.local_ray.add_env(FAST_SERVE_ENV)
        return self


def load(path: str | None = None, overrides=()) -> RecsysConfig:
    """Load the recsys config (default ``configs/local.yaml``) with ``--set`` overrides."""
    return load_config(RecsysConfig, path, overrides, default_path=CONFIG_DIR / "local.yaml")
