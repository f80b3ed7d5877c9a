"""Online scoring on the shared cluster's Serve: replay == offline features, 422s, cold start, replica kill,
no lost card updates across replicas."""
import asyncio
import posixpath
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
from ray import serve

from pipelines.io import join
from pipelines.testing import storage_run_dir
from riskcontrol.config import ServeConfig
from riskcontrol.features import FEATURE_COLUMNS, features_frame, invalid_reasons
from riskcontrol.serve import MAX_ITEMS, RedisStore, deploy, smoke_test, transaction_payload

from .riskcontrol_helpers import small_model

SMALL = {"rows": 6000, "cards": 100, "merchants": 50, "days": 10, "seed": 11}


@pytest.fixture(scope="module")
def model(ray_connected):
    """A small in-process model on the object store (replicas load it from there)."""
    out = storage_run_dir("riskcontrol-serve")
    frame, feats = small_model(out, **SMALL)
    return join(out, "model"), frame, feats


@pytest.fixture
def app(model):
    """A fresh app (fresh in-process store); deleted after the test."""
    cfg = ServeConfig()
    url = deploy(cfg, model[0])
    yield url, cfg
    serve.delete(cfg.app_name)


def test_replay_online_features_equal_offline(model, app):
    """Replay a transaction stream through /score: the store's features equal the batch features."""
    url, _ = app
    _, frame, _ = model
    stream = frame[invalid_reasons(frame) == ""].sort_values(["event_time", "transaction_id"]).head(1500)
    labels = [{"transaction_id": int(r.transaction_id), "merchant_id": int(r.merchant_id),
               "label_time": pd.Timestamp(r.label_time).isoformat(), "is_fraud": int(r.is_fraud)}
              for r in frame[frame.transaction_id.isin(stream.transaction_id)].itertuples()]
    with httpx.Client(timeout=30) as client:
        for i in range(0, len(labels), MAX_ITEMS):  # at most MAX_ITEMS per request
            chunk = labels[i:i + MAX_ITEMS]
            assert client.post(f"{url}/labels", json=chunk).json() == {"accepted": len(chunk)}
        online = []
        records = stream.to_dict("records")
        for i in range(0, len(records), 100):
            body = [transaction_payload(r) for r in records[i:i + 100]]
            resp = client.post(f"{url}/score", params={"features": "true"}, json=body)
            assert resp.status_code == 200, resp.text
            online += resp.json()
    assert [r["transaction_id"] for r in online] == list(stream.transaction_id)
    # offline: the batch features of the same stream (labels of later rows mature later, as online)
    offline = features_frame(stream).set_index("transaction_id").loc[stream.transaction_id]
    got = pd.DataFrame([r["features"] for r in online]).astype(float)
    for col in FEATURE_COLUMNS:
        np.testing.assert_allclose(got[col].to_numpy(), offline[col].to_numpy(float), rtol=1e-9,
                                   equal_nan=True, err_msg=col)
    assert all(0 <= r["probability"] <= 1 and r["latency_ms"] > 0 for r in online)
    assert max(r["batch_size"] for r in online) > 1  # a list's model calls were batched
    flagged = [r for r in online if r["risk_tier"] != "low"]
    assert flagged and all(len(set(r["reasons"])) == 3 and r["reasons"][0] in FEATURE_COLUMNS for r in flagged)
    assert online[0]["model_version"].startswith("model-")


def test_smoke_test_counts_the_ok_replies(model):
    """smoke_test reports the requests it sent and the 200 replies with a probability it got."""
    from riskcontrol.config import RiskConfig

    stats = smoke_test(RiskConfig(serve={"smoke_requests": 30}), model[0],
                       join(posixpath.dirname(model[0]), "transactions"))
    assert stats["requests"] == stats["ok"] == 30 and stats["error_rate"] == 0, stats


def test_malformed_requests_get_422_and_unknown_cards_work(model, app):
    url, _ = app
    _, frame, _ = model
    good = transaction_payload(frame.iloc[0].to_dict())
    with httpx.Client(timeout=30) as client:
        assert client.get(f"{url}/healthz").json()["status"] == "ok"
        bad = client.post(f"{url}/score", json={**good, "amount": -5, "currency": "XXX"})
        assert bad.status_code == 422
        fields = {tuple(e["loc"][-1:]) for e in bad.json()["detail"]}
        assert ("amount",) in fields and ("currency",) in fields
        missing = {k: v for k, v in good.items() if k != "card_id"}
        assert client.post(f"{url}/score", json=missing).status_code == 422
        cold = client.post(f"{url}/score", params={"features": "true"},
                           json={**good, "card_id": 987654321, "transaction_id": 1})
        assert cold.status_code == 200
        assert cold.json()["features"]["card_history_count"] == 0


def test_replica_killed_under_load_is_replaced(model, redis_url, monkeypatch):
    """Two replicas sharing a Redis store; one is killed mid-load (10 s client timeout); errors stay under 1%,
    and Serve replaces the killed replica."""
    import ray

    from pipelines import serving
    from pipelines.serving import load_test

    def wait_for(predicate, timeout, what):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(0.2)
        raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")

    kinds = []  # what the failed requests saw, for the assertion message
    sent = []  # (send time, answered OK) of every request, in completion order
    fire = serving._fire

    async def recording_fire(client, method, url, body, lat, errors):
        t0, before = time.monotonic(), len(errors)
        await fire(client, method, url, body, lat, errors)
        kinds.extend(errors[before:])
        sent.append((t0, len(errors) == before))

    monkeypatch.setattr(serving, "_fire", recording_fire)
    cfg = ServeConfig(store="redis", redis_url=redis_url, redis_prefix="riskcontrol-test-kill", max_actors=2,
                      max_ongoing_requests=2)  # little in flight per replica: the router holds the rest
    RedisStore(redis_url, cfg.redis_prefix).clear()
    url = deploy(cfg, model[0])
    _, frame, _ = model
    payloads = [transaction_payload(r) for r in frame[invalid_reasons(frame) == ""].head(2000).to_dict("records")]
    # a rate one replica keeps up with on a slow 2-core CI machine (at 25 req/s there, p50 was 0.7 s before the
    # kill and the queue behind the one survivor hit the 10 s timeout): the test is about losing no request
    rps, seconds = 10, 36

    def replicas():
        return [a for a in ray.util.list_named_actors(all_namespaces=True)
                if "SERVE_REPLICA" in a["name"] and cfg.app_name in a["name"]]

    try:
        result = {}
        runner = threading.Thread(target=lambda: result.update(load_test(f"{url}/score", payloads, rps=rps,
                                                                          seconds=seconds, timeout=10.0)))
        runner.start()
        # steady state before the kill: a second's worth of requests answered OK (not a fixed sleep)
        wait_for(lambda: sum(ok for _, ok in sent) >= rps or not runner.is_alive(), 60, "the load to flow")
        before = replicas()
        assert runner.is_alive() and len(before) == 2, before
        victim = before[0]
        killed_at = time.monotonic()
        ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
        runner.join()
        assert result["error_rate"] < 0.01, (result, kinds)
        after_kill = sum(t >= killed_at for t, _ in sent)
        assert after_kill >= 5 * rps, f"only {after_kill} requests were sent after the kill: not under load"

        def replaced():  # a new replica in place of the killed one, both RUNNING
            names = {a["name"] for a in replicas()}
            status = serve.status().applications[cfg.app_name]
            running = sum(d.replica_states.get("RUNNING", 0) for d in status.deployments.values())
            return running == 2 and len(names) == 2 and victim["name"] not in names

        wait_for(replaced, 120, "Serve to replace the killed replica")
    finally:
        serve.delete(cfg.app_name)
        RedisStore(redis_url, cfg.redis_prefix).clear()


def test_concurrent_scores_of_one_card_on_two_replicas_lose_no_update(model, redis_url):
    """A fraud burst: 40 concurrent /score calls for one card on 2 replicas sharing Redis; none is lost.

    Three bursts (three cards): without an atomic update the old code lost 1-14 of 40 per burst here.
    """
    import redis

    from riskcontrol.features import CardState

    cfg = ServeConfig(store="redis", redis_url=redis_url, redis_prefix="riskcontrol-test-race", max_actors=2)
    RedisStore(redis_url, cfg.redis_prefix).clear()
    _, frame, _ = model
    base = transaction_payload(frame[invalid_reasons(frame) == ""].iloc[0].to_dict())
    start = pd.Timestamp(base["event_time"])
    url = deploy(cfg, model[0])
    counts = []
    try:
        for card in (424242, 424243, 424244):
            bodies = [{**base, "card_id": card, "transaction_id": 10 ** 9 + i,
                       "event_time": (start + pd.Timedelta(seconds=i)).isoformat()} for i in range(40)]

            async def burst(bodies=bodies):
                async with httpx.AsyncClient(timeout=60) as client:
                    return await asyncio.gather(*(client.post(f"{url}/score", params={"features": "true"}, json=b)
                                                  for b in bodies))

            replies = asyncio.run(burst())
            assert all(r.status_code == 200 for r in replies), [r.text for r in replies if r.status_code != 200][:3]
            stored = CardState.from_json(redis.Redis.from_url(redis_url).get(f"{cfg.redis_prefix}:card:{card}"))
            seen = sorted(r.json()["features"]["card_history_count"] for r in replies)
            counts.append((stored.count, seen == list(range(40))))  # each call saw a distinct prior count
    finally:
        serve.delete(cfg.app_name)
        RedisStore(redis_url, cfg.redis_prefix).clear()
    assert counts == [(40, True)] * 3, counts


def test_the_locustfile_loads_the_app_headless_without_failures(app, tmp_path):
    """riskcontrol/locustfile.py, as a user would run it against their deployment (5 s, 4 users)."""
    from pipelines.testing import run_locust

    url, _ = app
    stats = run_locust(Path(__file__).resolve().parents[2] / "riskcontrol" / "locustfile.py", url, tmp_path)
    assert int(stats["/score"]["Request Count"]) >= 20, stats["/score"]
    assert int(stats["/labels"]["Request Count"]) >= 1, stats.get("/labels")
    assert stats["Aggregated"]["Failure Count"] == "0", stats["Aggregated"]
