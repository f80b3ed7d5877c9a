"""The online scorer's bounds and store behaviour, without Ray: the ingress class's FastAPI app in a
TestClient (routes, validation, limits, timeouts, /healthz) and the Redis store against the real Redis."""
import asyncio
import socket
import time
from contextlib import contextmanager
from types import SimpleNamespace
from unittest.mock import patch

import pytest
from fastapi.testclient import TestClient

from riskcontrol.config import ServeConfig
from riskcontrol.features import CardState, MerchantState, invalid_reasons, to_epoch
from riskcontrol.serve import MAX_ITEMS, MAX_TEXT, RedisStore, RiskScorer, api, replay, transaction_payload

from .riskcontrol_helpers import small_model

CARD = 777001


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A small in-process model and one valid transaction payload."""
    out = tmp_path_factory.mktemp("riskcontrol-serve-unit")
    frame, _ = small_model(out, rows=3000, cards=30, merchants=20, days=5, seed=3)
    good = transaction_payload(frame[invalid_reasons(frame) == ""].iloc[0].to_dict())
    return str(out / "model"), good


@contextmanager
def scorer(model_dir: str, **serve):
    """(TestClient, RiskScorer instance) for the ingress app, the instance built as a replica would be."""
    cfg = ServeConfig(**serve)
    # a stand-in replica context: serve.ingress resolves each route's `self` as its servable_object,
    # serve.batch reads max_ongoing_requests from it
    context = SimpleNamespace(_deployment_config=SimpleNamespace(max_ongoing_requests=cfg.max_ongoing_requests))
    cls = RiskScorer.func_or_class.__mro__[1]  # the user class under Serve's ingress wrapper
    # serve.batch keeps one queue per process, bound to the event loop that first used it: each
    # TestClient runs a new loop, so start with a fresh queue
    cls.predict.set_max_batch_size.__self__._queue = None
    with patch("ray.serve.get_replica_context", return_value=context):
        context.servable_object = instance = cls(model_dir, cfg.model_dump())
        with TestClient(api) as client:
            yield client, instance


def burst(good: dict, n: int, card_id: int = CARD, merchant_id: int | None = None) -> list[dict]:
    """``n`` transactions of one card, a minute apart."""
    t0 = to_epoch(good["event_time"])
    from datetime import datetime, timezone

    return [{**good, "card_id": card_id, "transaction_id": 5_000_000 + i,
             "merchant_id": good["merchant_id"] if merchant_id is None else merchant_id,
             "event_time": datetime.fromtimestamp(t0 + 60 * i, timezone.utc).isoformat()} for i in range(n)]


def redis_card(url: str, prefix: str, card_id: int) -> CardState:
    import redis

    return CardState.from_json(redis.Redis.from_url(url).get(f"{prefix}:card:{card_id}"))


@pytest.mark.parametrize("field", ["transaction_id", "card_id", "merchant_id"])
def test_score_ids_outside_int64_are_422(model, field):
    model_dir, good = model
    with scorer(model_dir) as (client, _):
        for bad in (2 ** 63, 10 ** 30, -1):
            r = client.post("/score", json={**good, field: bad})
            assert r.status_code == 422, (bad, r.status_code, r.text[:200])
            assert field in str(r.json()["detail"])
        assert client.post("/score", json={**good, field: 2 ** 63 - 1}).status_code == 200


@pytest.mark.parametrize("field", ["transaction_id", "merchant_id"])
def test_label_ids_outside_int64_are_422(model, field):
    model_dir, good = model
    label = {"transaction_id": 1, "merchant_id": 2, "label_time": good["event_time"], "is_fraud": 1}
    with scorer(model_dir) as (client, _):
        assert client.post("/labels", json={**label, field: 2 ** 63}).status_code == 422
        assert client.post("/labels", json=label).json() == {"accepted": 1}


def test_lists_longer_than_max_items_are_422(model):
    model_dir, good = model
    label = {"transaction_id": 1, "merchant_id": 2, "label_time": good["event_time"], "is_fraud": 0}
    with scorer(model_dir) as (client, instance):
        assert client.post("/score", json=[good] * (MAX_ITEMS + 1)).status_code == 422
        assert client.post("/labels", json=[label] * (MAX_ITEMS + 1)).status_code == 422
        assert not instance.store.cards and not instance.store.merchants  # nothing was applied
        assert client.post("/labels", json=[label] * MAX_ITEMS).json() == {"accepted": MAX_ITEMS}


@pytest.mark.parametrize("field", ["device_id", "merchant_category"])
def test_over_long_strings_are_422(model, field):
    model_dir, good = model
    with scorer(model_dir) as (client, _):
        r = client.post("/score", json={**good, field: "x" * (MAX_TEXT + 1)})
        assert r.status_code == 422 and field in str(r.json()["detail"])
        assert client.post("/score", json={**good, field: "x" * MAX_TEXT}).status_code == 200


@pytest.mark.parametrize("store", ["memory", "redis"])
def test_card_recent_list_is_capped(model, store, request):
    """A card scored 8 times within an hour keeps only ``max_card_recent`` = 5 recent rows."""
    model_dir, good = model
    serve = {"store": store, "max_card_recent": 5}
    if store == "redis":
        serve.update(redis_url=request.getfixturevalue("redis_url"), redis_prefix="riskcontrol-test-cap")
        RedisStore(serve["redis_url"], serve["redis_prefix"]).clear()
    try:
        with scorer(model_dir, **serve) as (client, instance):
            replies = [client.post("/score", params={"features": "true"}, json=b).json() for b in burst(good, 8)]
            if store == "memory":
                card = instance.store.cards[CARD]
            else:
                card = redis_card(serve["redis_url"], serve["redis_prefix"], CARD)
    finally:
        if store == "redis":
            RedisStore(serve["redis_url"], serve["redis_prefix"]).clear()
    assert [r["features"]["card_cnt_1h"] for r in replies] == [0, 1, 2, 3, 4, 5, 5, 5]
    assert replies[-1]["features"]["card_history_count"] == 7  # the lifetime count is not capped
    assert len(card.recent) == 5 and card.count == 8
    assert [row[0] for row in card.recent] == [to_epoch(b["event_time"]) for b in burst(good, 8)[3:]]


def test_memory_store_keeps_at_most_max_entries_least_recently_used_out(model):
    model_dir, good = model
    with scorer(model_dir, memory_max_entries=3) as (client, instance):
        for card in (1, 2, 3, 4, 5, 3, 6):  # card and merchant ids alike
            assert client.post("/score", json={**good, "card_id": card, "merchant_id": card}).status_code == 200
        assert list(instance.store.cards) == [5, 3, 6]
        assert list(instance.store.merchants) == [5, 3, 6]
        assert instance.store.cards[3].count == 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_redis_store_unreachable_is_503(model):
    """A Redis store on a dead port: /healthz, /score and /labels answer 503 (not 200, not 500)."""
    model_dir, good = model
    url = f"redis://127.0.0.1:{free_port()}/0"
    label = {"transaction_id": 1, "merchant_id": 2, "label_time": good["event_time"], "is_fraud": 0}
    with scorer(model_dir, store="redis", redis_url=url) as (client, _):
        health = client.get("/healthz")
        assert health.status_code == 503 and "feature store" in health.json()["detail"]
        assert client.post("/score", json=good).status_code == 503
        assert client.post("/labels", json=label).status_code == 503


@pytest.fixture
def stalled_redis():
    """A TCP port that accepts connections and never answers (a hung Redis)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        yield f"redis://127.0.0.1:{s.getsockname()[1]}/0"


def test_stalled_store_answers_within_the_request_timeout(model, stalled_redis):
    """Redis hangs (its socket timeout 10 s): /score answers 504 and /healthz 503 after ~request_timeout_s."""
    model_dir, good = model
    with scorer(model_dir, store="redis", redis_url=stalled_redis, redis_timeout_s=10,
                request_timeout_s=0.5) as (client, _):
        t0 = time.perf_counter()
        r = client.post("/score", json=good)
        took = time.perf_counter() - t0
        assert r.status_code == 504 and took < 3, (r.status_code, took, r.text[:200])
        t0 = time.perf_counter()
        health = client.get("/healthz")
        assert health.status_code == 503 and time.perf_counter() - t0 < 3


def test_redis_updates_from_two_replicas_are_atomic(model, redis_url):
    """Two stores (two replicas) advance one card and label its merchant concurrently: nothing is lost."""
    _, good = model
    prefix = "riskcontrol-test-atomic"
    RedisStore(redis_url, prefix).clear()
    stores = [RedisStore(redis_url, prefix), RedisStore(redis_url, prefix)]
    txns = [{**b, "ts": to_epoch(b["event_time"])} for b in burst(good, 40, merchant_id=31)]

    async def race():
        work = [stores[i % 2].advance(t) for i, t in enumerate(txns)]
        work += [stores[i % 2].label(31, txns[0]["ts"] + 10 * 86400, 1) for i in range(20)]
        out = await asyncio.gather(*work)
        for s in stores:
            await s.close()
        return out[:40]

    try:
        feats = asyncio.run(race())
        import redis

        merchant = MerchantState.from_json(redis.Redis.from_url(redis_url).get(f"{prefix}:merchant:31"))
        card = redis_card(redis_url, prefix, CARD)
    finally:
        RedisStore(redis_url, prefix).clear()
    assert card.count == 40 and sorted(f["card_history_count"] for f in feats) == list(range(40))
    assert len(merchant.recent) == 40 and len(merchant.pending) == 20


def test_replay_counts_only_200_replies_with_a_probability():
    """The smoke test's counter: of 20 requests, 10 get 200 + probability; 503s, 200s without a
    probability and a reset connection are not counted as served."""
    import json

    import httpx
    from fastapi import FastAPI, Response

    app = FastAPI()

    @app.post("/score")
    def fake(body: dict, response: Response):
        if body["transaction_id"] % 4 == 1:
            response.status_code = 503
        return {"probability": 0.5} if body["transaction_id"] % 2 == 0 else {"detail": "no"}

    class ResetsSeven(httpx.AsyncBaseTransport):
        """The app over ASGI, except that request 7's connection is reset."""

        def __init__(self):
            self.inner = httpx.ASGITransport(app=app)

        async def handle_async_request(self, request):
            if json.loads(request.content)["transaction_id"] == 7:
                raise httpx.ReadError("connection reset by peer", request=request)
            return await self.inner.handle_async_request(request)

    stats = replay("http://fake/score", [{"transaction_id": i} for i in range(20)], rps=200, transport=ResetsSeven())
    assert stats["requests"] == 20 and stats["ok"] == 10 and stats["error_rate"] == 0.5, stats
    assert stats["p50_ms"] > 0 and len(stats["errors"]) == 5
    assert any(e.startswith("503") for e in stats["errors"]) and any("ReadError" in e for e in stats["errors"])


def test_auto_store_on_an_ha_cluster_without_redis_is_one_line(monkeypatch, redis_url):
    """serve.store=auto picks Redis on a HIGH_AVAILABILITY cluster for the user: a Redis that is not there (the
    default 127.0.0.1 URL on a real group's worker) fails the replica in one line, not with a 503 per request."""
    from riskcontrol import serve

    monkeypatch.setattr(serve, "gcs_in_redis", lambda: True)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    with pytest.raises(ValueError, match=r"serve.store=auto on a HIGH_AVAILABILITY cluster .* set serve.redis_url"):
        serve.make_store(ServeConfig(redis_url=f"redis://127.0.0.1:{closed}/0", redis_timeout_s=0.5))
    assert isinstance(serve.make_store(ServeConfig(redis_url=redis_url)), RedisStore)  # a Redis that answers
    monkeypatch.setattr(serve, "gcs_in_redis", lambda: False)
    assert not isinstance(serve.make_store(ServeConfig(redis_url=f"redis://127.0.0.1:{closed}/0")), RedisStore)
