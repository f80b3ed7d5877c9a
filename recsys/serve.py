"""Online recommendations and search on Ray Serve (FastAPI ingress).

    GET/POST /recsys/recommend   user_id, k, filters (categories, max_price)
    GET/POST /recsys/search      query, optional user_id, k, filters

Ingress -> ``RetrieverDeployment`` (index + query tower) -> feature lookup
(in-process or Redis) -> ``RankerDeployment`` (``@serve.batch``: one forward pass
for many requests) -> items, scores and the model version. Search scores add the query
relevance (retrieval logit) to the ranker's personal score, so matches stay on top. Unknown users, missing
users and empty queries fall back to popular items; bad input (ids outside ``[0, 2**63)`` too) is a 422.
A ranked answer says in ``batch_size`` how many requests the ranker call that scored it held. Each request
has ``serve.request_timeout_s`` (504); Redis lookups run off the event loop; ``/healthz`` is a 503 when
the Redis feature store does not answer.

Deploy with ``python -m recsys.serve --run-dir RUN``, or without a driver ``adbray serve recsys --run-dir URI
--group G`` (or ``serve deploy`` of the config it prints; recsys/serve_config.yaml is that config, generated
from the ``serve`` section).
"""

import asyncio
import json
import sys
import time
from typing import Annotated

import click
import numpy as np
from fastapi import FastAPI, HTTPException, Query
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from redis.exceptions import RedisError

from pipelines.cli import RunFailed, exit_with, template_options
from pipelines.io import read_table
from pipelines.report import emit, summary
from pipelines.serving import replica_options
from pipelines.template import Run, prepare_run_dir, read_manifest

from . import config as C
from .features import FeatureStore, RedisUsers, redis_prefix
from .score import RankerScorer, Retriever

MAX_K = 100
INT64_END = 2 ** 63
Id = Annotated[int, Field(ge=0, lt=INT64_END)]  # user and category ids: int64 in every table
api = FastAPI(title="recsys")


class Filters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    categories: list[Id] | None = Field(None, max_length=100)
    max_price: float | None = Field(None, gt=0)

    def as_kwargs(self) -> dict:
        return {"categories": self.categories, "max_price": self.max_price}


class RecommendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_id: Id | None = None
    k: int = Field(10, ge=1, le=MAX_K)
    filters: Filters = Filters()


class SearchRequest(RecommendRequest):
    query: str = Field("", max_length=200)


def single_thread_torch() -> None:
    """Small per-request batches: one intra-op thread is ~10x faster than contending threads."""
    import torch

    torch.set_num_threads(1)


@serve.deployment
class RetrieverDeployment:
    """Holds the item index, user vectors and query tower; returns candidates."""

    def __init__(self, run_dir: str, retrieval_cfg: dict):
        single_thread_torch()
        self.r = Retriever(run_dir, C.RetrievalConfig(**retrieval_cfg))
        self.n = C.RetrievalConfig(**retrieval_cfg).candidates

    def for_user(self, user_id: int, k: int, filters: dict):
        """(ids, scores) of the user's candidates, or None for an unknown user."""
        if not self.r.known([user_id])[0]:
            return None
        ids, scores = self.r.for_users([user_id], max(self.n, k), self.r.allowed(**filters))
        return self.finite(ids[0], scores[0])

    def for_query(self, user_id: int | None, query: str, k: int, filters: dict):
        ids, scores = self.r.for_queries([user_id], [query], max(self.n, k), self.r.allowed(**filters))
        return self.finite(ids[0], scores[0])

    @staticmethod
    def finite(ids, scores):
        """Drop slots a filter left empty (score -inf)."""
        keep = np.isfinite(scores)
        return ids[keep], scores[keep]


@serve.deployment
class RankerDeployment:
    """DeepFM scores; concurrent requests are batched into one forward pass."""

    def __init__(self, run_dir: str, max_batch_size: int, batch_wait_timeout_s: float):
        single_thread_torch()
        self.scorer = RankerScorer(run_dir)
        self.score.set_max_batch_size(max_batch_size)
        self.score.set_batch_wait_timeout_s(batch_wait_timeout_s)

    def version(self) -> str:
        return self.scorer.version

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.001)
    async def score(self, requests: list[tuple[np.ndarray, np.ndarray]]) -> list[tuple[np.ndarray, int]]:
        """Per request: (its scores, how many requests this forward pass held)."""
        sizes = [len(s) for s, _ in requests]
        out = self.scorer(np.concatenate([s for s, _ in requests]), np.concatenate([d for _, d in requests]))
        return [(part, len(requests)) for part in np.split(out, np.cumsum(sizes)[:-1])]


@serve.deployment
@serve.ingress(api)
class Ingress:
    """HTTP routes: validation, fallbacks, feature lookup, and the response."""

    def __init__(self, retriever, ranker, run_dir: str, serve_cfg: dict, version: str, temperature: float):
        s = C.ServeConfig(**serve_cfg)
        self.timeout_s, self.redis = s.request_timeout_s, s.feature_store == "redis"
        # query relevance on the retriever's logit scale, times serve.search_relevance_weight
        self.relevance_weight = s.search_relevance_weight / temperature
        self.retriever, self.ranker, self.version = retriever, ranker, version
        self.features = FeatureStore.from_dir(f"{run_dir}/features/serve", s.feature_store, s.redis_url,
                                              redis_prefix(version))
        items = read_table(f"{run_dir}/features/serve/items", columns=["clicks"])
        meta = read_table(f"{run_dir}/items", columns=["category", "price"])
        clicks = items.column("clicks").to_numpy()
        self.popular = np.argsort(-clicks, kind="stable")
        self.popular_score = clicks[self.popular].astype(float)
        self.category = meta.column("category").to_numpy()
        self.price = meta.column("price").to_numpy()

    def _popular(self, k: int, f: Filters, reason: str) -> dict:
        ok = np.ones(len(self.popular), dtype=bool)
        if f.categories:
            ok &= np.isin(self.category[self.popular], f.categories)
        if f.max_price is not None:
            ok &= self.price[self.popular] <= f.max_price
        ids, scores = self.popular[ok][:k], self.popular_score[ok][:k]
        return self._response(ids, scores, source="popular", fallback=reason)

    def _response(self, ids, scores, source: str, fallback: str | None = None,
                  batch_size: int | None = None) -> dict:
        return {"items": [{"item_id": int(i), "score": float(s)} for i, s in zip(ids, scores)],
                "model_version": self.version, "source": source, "fallback": fallback, "batch_size": batch_size}

    async def _bounded(self, work):
        """``work`` within ``serve.request_timeout_s``: a 504 past it, a 503 when Redis fails."""
        try:
            return await asyncio.wait_for(work, self.timeout_s)
        except TimeoutError:
            raise HTTPException(504, f"request took over serve.request_timeout_s={self.timeout_s}s") from None
        except RedisError as e:
            raise HTTPException(503, f"feature store unavailable: {type(e).__name__}: {e}") from None

    async def _rank(self, user_id: int | None, ids: np.ndarray, scores: np.ndarray, k: int,
                    relevance_weight: float = 0.0) -> dict:
        """Ranker scores for the candidates; search adds ``relevance_weight`` x query relevance."""
        if len(ids) == 0:
            return self._response([], [], source="ranker")
        users = np.full(len(ids), -1 if user_id is None else user_id, dtype=np.int64)
        if self.redis:  # a blocking client: keep the event loop free
            sparse, dense = await asyncio.to_thread(self.features.ranker_inputs, users, ids, scores)
        else:
            sparse, dense = self.features.ranker_inputs(users, ids, scores)
        personal, batch_size = await self.ranker.score.remote((sparse, dense))
        ranked = personal + relevance_weight * scores
        order = np.argsort(-ranked, kind="stable")[:k]
        return self._response(ids[order], ranked[order], source="ranker", batch_size=batch_size)

    async def recommend(self, req: RecommendRequest) -> dict:
        if req.user_id is None:
            return self._popular(req.k, req.filters, "no user_id")
        found = await self.retriever.for_user.remote(req.user_id, req.k, req.filters.as_kwargs())
        if found is None:
            return self._popular(req.k, req.filters, "unknown user")
        return await self._rank(req.user_id, *found, req.k)

    async def search(self, req: SearchRequest) -> dict:
        if not req.query.strip():
            return self._popular(req.k, req.filters, "empty query")
        ids, scores = await self.retriever.for_query.remote(req.user_id, req.query, req.k, req.filters.as_kwargs())
        return await self._rank(req.user_id, ids, scores, req.k, relevance_weight=self.relevance_weight)

    @api.get("/recommend")
    async def recommend_get(self, user_id: Annotated[int | None, Query(ge=0, lt=INT64_END)] = None,
                            k: Annotated[int, Query(ge=1, le=MAX_K)] = 10,
                            category: Annotated[list[Id] | None, Query(max_length=100)] = None,
                            max_price: Annotated[float | None, Query(gt=0)] = None):
        return await self._bounded(self.recommend(RecommendRequest(
            user_id=user_id, k=k, filters=Filters(categories=category, max_price=max_price))))

    @api.post("/recommend")
    async def recommend_post(self, req: RecommendRequest):
        return await self._bounded(self.recommend(req))

    @api.get("/search")
    async def search_get(self, query: Annotated[str, Query(max_length=200)] = "",
                         user_id: Annotated[int | None, Query(ge=0, lt=INT64_END)] = None,
                         k: Annotated[int, Query(ge=1, le=MAX_K)] = 10,
                         category: Annotated[list[Id] | None, Query(max_length=100)] = None,
                         max_price: Annotated[float | None, Query(gt=0)] = None):
        return await self._bounded(self.search(SearchRequest(
            query=query, user_id=user_id, k=k, filters=Filters(categories=category, max_price=max_price))))

    @api.post("/search")
    async def search_post(self, req: SearchRequest):
        return await self._bounded(self.search(req))

    @api.get("/healthz")
    async def healthz(self):
        if self.redis:
            try:
                await asyncio.wait_for(asyncio.to_thread(self.features.users.client.ping), self.timeout_s)
            except (RedisError, OSError) as e:  # refused, hung (TimeoutError is an OSError), auth
                raise HTTPException(503, f"feature store unreachable: {type(e).__name__}: {e}") from None
        return {"ok": True, "model_version": self.version}


def model_version(run_dir: str) -> str:
    from .models import DeepFM, load_model
    from .ranking import MODEL_FILE

    return load_model(DeepFM, f"{run_dir}/{MODEL_FILE}")[1].get("version", "unknown")


def build_app(cfg: C.RecsysConfig, run_dir: str):
    """The Serve application; with the Redis feature store, user features are published first."""
    s = cfg.serve
    version = model_version(run_dir)
    if s.feature_store == "redis":
        users = read_table(f"{run_dir}/features/serve/users")
        width = users.schema.field("cat_share").type.list_size
        RedisUsers(s.redis_url, redis_prefix(version), width).publish(users)
    opts = {"num_cpus": s.num_cpus}

    def replicas(name: str) -> dict:  # fixed or autoscaled (serve.<name>_replicas / serve.autoscaling.<name>)
        return replica_options(getattr(s, f"{name}_replicas"), s.autoscaling.get(name))

    retriever = RetrieverDeployment.options(**replicas("retriever"), ray_actor_options=opts).bind(
        run_dir, cfg.retrieval.model_dump())
    ranker = RankerDeployment.options(**replicas("ranker"), ray_actor_options={**opts, "num_gpus": s.num_gpus}).bind(
        run_dir, s.max_batch_size, s.batch_wait_timeout_s)
    return Ingress.options(**replicas("ingress"), ray_actor_options=opts).bind(
        retriever, ranker, run_dir, s.model_dump(), version, cfg.retrieval.temperature)


def app_config(args: dict) -> C.RecsysConfig:
    """The config a Serve-config app runs with: ``args.config``/``overrides`` when given, else the run's own
    resolved ``config.yaml`` (the retrieval settings, vocabulary and index the models were trained with),
    else the default config; ``args.serve`` (the ``serve`` section) on top."""
    from pipelines.html_report import CONFIG
    from pipelines.io import exists, join, read_bytes

    run_config = join(str(args["run_dir"]).rstrip("/"), CONFIG)
    if args.get("config") is None and not args.get("overrides") and exists(run_config):
        import yaml

        cfg = C.RecsysConfig.model_validate(yaml.safe_load(read_bytes(run_config)))
    else:
        cfg = C.load(args.get("config"), args.get("overrides", ()))
    if args.get("serve") is not None:
        cfg = cfg.model_copy(update={"serve": C.ServeConfig(**args["serve"])})
    return cfg


def app_builder(args: dict):
    """For Serve config files (``adbray serve``, ``serve deploy``, serve_config.yaml): ``args.run_dir``
    (required: a run folder with trained models), ``args.serve`` (the ``serve`` config section), and
    ``config``/``overrides`` for the other sections (default: the run's own ``config.yaml``)."""
    if not args.get("run_dir"):
        raise ValueError("recsys serve app needs args.run_dir: a run folder with trained models")
    return build_app(app_config(args), str(args["run_dir"]).rstrip("/"))


def deploy(cfg: C.RecsysConfig, run_dir: str) -> str:
    """Start Serve (free port) and deploy the app; returns the base URL of its routes."""
    from pipelines.serving import deploy_app

    try:
        return deploy_app(build_app(cfg, run_dir), cfg.serve.app_name, cfg.serve.route_prefix)
    except TimeoutError as e:
        raise RunFailed(str(e)) from None


@click.command()
@template_options
@click.option("--block/--no-block", default=False, help="Keep serving until Ctrl-C (local use).")
def main(config, overrides, address, run_dir, block):
    """Deploy the online recommend/search app and check one request of each kind."""
    import httpx

    cfg = C.load(config, overrides)
    if not run_dir:
        raise click.UsageError("give --run-dir: a run folder with trained models (python -m recsys)")
    out = prepare_run_dir(C.TEMPLATE, run_dir, address)
    Run(out, read_manifest(out)).input("ranker")
    from .template import TEMPLATE

    TEMPLATE.connect(cfg, address)
    url = deploy(cfg, out)
    t0 = time.perf_counter()
    rec = httpx.get(f"{url}/recommend", params={"user_id": 0, "k": 5}, timeout=30).json()
    found = httpx.post(f"{url}/search", json={"query": "classic shoes", "k": 5}, timeout=30).json()
    metrics = {"first_request_ms": (time.perf_counter() - t0) * 1000, "recommend_items": len(rec["items"]),
               "search_items": len(found["items"])}
    print(json.dumps({"recommend": rec, "search": found})[:2000], file=sys.stderr)
    emit(summary(C.TEMPLATE, "serve", out, {"url": url}, metrics, model_version=rec["model_version"]))
    if block:
        print(f"serving at {url} (Ctrl-C to stop)", file=sys.stderr)
        while True:
            time.sleep(3600)


if __name__ == "__main__":
    exit_with(main)
