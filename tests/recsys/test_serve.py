"""The online app on the shared cluster's Serve: routes, ranking, fallbacks, 422s, batching; and the
ingress class alone (TestClient, stand-in retriever): request timeout, a dead or hung Redis store."""
from __future__ import annotations

import asyncio
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from unittest.mock import patch

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from ray import serve

from pipelines.io import read_table
from recsys import config as C
from recsys.serve import Ingress, api, deploy


@pytest.fixture(scope="module")
def app_url(recsys_run):
    out, _, _ = recsys_run  # an oss:// run folder: the replicas read the models and features from it
    cfg = C.load()
    url = deploy(cfg, out)
    yield url, cfg, out
    serve.delete(cfg.serve.app_name)


def test_recommend_get_and_post_rank_with_the_model(app_url, recsys_run):
    url, cfg, out = app_url
    _, s, _ = recsys_run
    got = httpx.get(f"{url}/recommend", params={"user_id": 3, "k": 7}, timeout=30).json()
    posted = httpx.post(f"{url}/recommend", json={"user_id": 3, "k": 7}, timeout=30).json()
    assert {**got, "batch_size": None} == {**posted, "batch_size": None}
    assert got["source"] == "ranker" and got["model_version"] == s["metrics"]["model_version"]
    assert len(got["items"]) == 7
    scores = [i["score"] for i in got["items"]]
    assert scores == sorted(scores, reverse=True)
    from recsys.score import Recommender

    ids, _ = Recommender(out, cfg.retrieval).recommend(np.array([3]), 7)
    assert [i["item_id"] for i in got["items"]] == ids[0].tolist()  # same answer as the batch path


def test_the_locustfile_loads_the_app_headless_without_failures(app_url, tmp_path):
    """recsys/locustfile.py, as a user would run it against their deployment (5 s, 4 users)."""
    from pipelines.testing import run_locust

    url, _, _ = app_url
    stats = run_locust(Path(__file__).resolve().parents[2] / "recsys" / "locustfile.py", url, tmp_path)
    for name in ("/recommend GET", "/recommend POST", "/search"):
        assert int(stats[name]["Request Count"]) >= 3, stats.get(name)
    assert int(stats["Aggregated"]["Request Count"]) >= 30 and stats["Aggregated"]["Failure Count"] == "0", \
        stats["Aggregated"]


def test_filters_and_search(app_url):
    url, _, out = app_url
    items = read_table(f"{out}/items").to_pandas().set_index("item_id")
    r = httpx.post(f"{url}/recommend", json={"user_id": 5, "k": 10, "filters": {"categories": [2],
                                                                                "max_price": 80}}).json()
    assert r["items"] and all(items.category[i["item_id"]] == 2 and items.price[i["item_id"]] <= 80
                              for i in r["items"])
    found = 0
    for item in range(0, 200, 20):
        r = httpx.get(f"{url}/search", params={"query": items.title[item], "k": 10}).json()
        assert r["source"] == "ranker" and len(r["items"]) == 10
        found += item in [i["item_id"] for i in r["items"]]
    assert found >= 5, found  # a product's own title finds it (ranker-only ordering finds ~2 in 10)


def test_fallbacks_to_popular(app_url):
    url, _, _ = app_url
    unknown = httpx.get(f"{url}/recommend", params={"user_id": 10 ** 9, "k": 5}).json()
    anonymous = httpx.post(f"{url}/recommend", json={"k": 5}).json()
    empty = httpx.post(f"{url}/search", json={"query": "  ", "user_id": 1, "k": 5}).json()
    assert unknown["source"] == anonymous["source"] == empty["source"] == "popular"
    assert unknown["fallback"] == "unknown user" and empty["fallback"] == "empty query"
    assert unknown["items"] == anonymous["items"] == empty["items"] and len(unknown["items"]) == 5


@pytest.mark.parametrize("method,path,kwargs", [
    ("GET", "/recommend", {"params": {"user_id": "abc"}}),
    ("GET", "/recommend", {"params": {"user_id": 1, "k": 0}}),
    ("GET", "/recommend", {"params": {"user_id": 1, "k": 1000}}),
    ("POST", "/recommend", {"json": {"user_id": -4}}),
    ("POST", "/recommend", {"json": {"user_id": 1, "filters": {"colour": "red"}}}),
    ("POST", "/recommend", {"json": {"user_id": 1, "filters": {"max_price": -1}}}),
    ("POST", "/search", {"json": {"query": "x" * 500}}),
    ("POST", "/search", {"content": b"not json", "headers": {"content-type": "application/json"}}),
    # integers past int64 (and negative ids) are 422, not a 500 from numpy
    ("GET", "/recommend", {"params": {"user_id": 2 ** 63}}),
    ("POST", "/recommend", {"json": {"user_id": 2 ** 63}}),
    ("GET", "/search", {"params": {"query": "shoes", "user_id": 2 ** 63}}),
    ("POST", "/search", {"json": {"query": "shoes", "user_id": 2 ** 63}}),
    ("GET", "/recommend", {"params": {"user_id": 1, "category": 2 ** 63}}),
    ("GET", "/search", {"params": {"query": "shoes", "category": -1}}),
    ("POST", "/recommend", {"json": {"user_id": 1, "filters": {"categories": [2 ** 63]}}}),
    ("POST", "/search", {"json": {"query": "shoes", "filters": {"categories": [-1]}}}),
    ("GET", "/recommend", {"params": {"user_id": 1, "k": 2 ** 64}}),
])
def test_bad_input_is_422(app_url, method, path, kwargs):
    url, _, _ = app_url
    assert httpx.request(method, f"{url}{path}", **kwargs).status_code == 422


def test_concurrent_requests_are_batched_and_all_answered(app_url):
    url, cfg, _ = app_url

    async def fire():
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*(client.get(f"{url}/recommend", params={"user_id": u, "k": 3})
                                          for u in range(40)))

    replies = asyncio.run(fire())
    assert all(r.status_code == 200 and r.json()["source"] == "ranker" for r in replies)
    sizes = [r.json()["batch_size"] for r in replies]  # requests in the ranker call that served each
    assert max(sizes) > 1 and all(1 <= n <= cfg.serve.max_batch_size for n in sizes), sizes


# ------------------------------------------------ the ingress class alone (no Serve)
def remote(fn):
    """A stand-in deployment method: ``.remote(*args)`` returns an awaitable, as a handle's does."""
    return SimpleNamespace(remote=fn)


async def never_answers(*_):
    await asyncio.sleep(30)


async def some_candidates(*_):
    return np.arange(10), np.linspace(1.0, 0.1, 10)


@contextmanager
def ingress(run_dir, retriever=None, **serve_cfg):
    """A TestClient on the ingress app, its class built on ``run_dir`` with a stand-in retriever."""
    cfg = C.load().serve.model_copy(update=serve_cfg)
    cls = Ingress.func_or_class.__mro__[1]  # the user class under Serve's ingress wrapper
    instance = cls(retriever, None, run_dir, cfg.model_dump(), "test-version", 0.1)
    # serve.ingress resolves each route's `self` as the replica context's servable_object
    context = SimpleNamespace(servable_object=instance)
    with patch("ray.serve.get_replica_context", return_value=context), TestClient(api) as client:
        yield client


def test_request_timeout_is_504(recsys_run):
    out, _, _ = recsys_run
    slow = SimpleNamespace(for_user=remote(never_answers), for_query=remote(never_answers))
    with ingress(out, slow, request_timeout_s=0.3) as client:
        t0 = time.perf_counter()
        assert client.get("/recommend", params={"user_id": 3}).status_code == 504
        assert client.post("/search", json={"query": "classic shoes"}).status_code == 504
        assert time.perf_counter() - t0 < 5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_healthz_is_503_when_the_redis_store_is_down(recsys_run):
    out, _, _ = recsys_run
    with ingress(out, feature_store="redis", redis_url=f"redis://127.0.0.1:{free_port()}/0") as client:
        r = client.get("/healthz")
        assert r.status_code == 503 and "feature store" in r.json()["detail"]


def test_hung_redis_store_answers_within_the_request_timeout(recsys_run):
    """Redis accepts and never answers: /recommend is a 504 and /healthz a 503 after ~request_timeout_s
    (the lookup runs off the event loop, so the timeout can fire)."""
    out, _, _ = recsys_run
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(64)
    try:
        retriever = SimpleNamespace(for_user=remote(some_candidates))
        with ingress(out, retriever, feature_store="redis", redis_url=f"redis://127.0.0.1:{hung.getsockname()[1]}/0",
                     request_timeout_s=0.5) as client:
            t0 = time.perf_counter()
            assert client.get("/recommend", params={"user_id": 3}).status_code == 504
            assert client.get("/healthz").status_code == 503
            took = time.perf_counter() - t0
            hung.close()  # resets the stuck connections: the blocked lookup threads end
        assert took < 5, took
    finally:
        hung.close()
