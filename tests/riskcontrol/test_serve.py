"""Online scoring on the shared cluster's Serve: replay == offline features, 422s, cold start, replica kill."""
import threading
import time

import httpx
import numpy as np
import pandas as pd
import pytest
from ray import serve
from .riskcontrol_helpers import small_model

from riskcontrol.config import ServeConfig
from riskcontrol.features import FEATURE_COLUMNS, features_frame, invalid_reasons
from riskcontrol.serve import RedisStore, deploy, transaction_payload

SMALL = {"rows": 6000, "cards": 100, "merchants": 50, "days": 10, "seed": 11}


@pytest.fixture(scope="module")
def model(ray_connected, tmp_path_factory):
    out = tmp_path_factory.mktemp("riskcontrol-serve")
    frame, feats = small_model(out, **SMALL)
    return str(out / "model"), frame, feats


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
        assert client.post(f"{url}/labels", json=labels).json() == {"accepted": len(labels)}
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
    flagged = [r for r in online if r["risk_tier"] != "low"]
    assert flagged and all(len(set(r["reasons"])) == 3 and r["reasons"][0] in FEATURE_COLUMNS for r in flagged)
    assert online[0]["model_version"].startswith("model-")


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
    """Two replicas sharing a Redis store; one is killed mid-load; errors stay under 1%."""
    import ray

    from pipelines import serving
    from pipelines.serving import load_test

    kinds = []  # what the failed requests saw, for the assertion message
    fire = serving._fire

    async def recording_fire(client, method, url, body, lat, errors):
        before = len(errors)
        await fire(client, method, url, body, lat, errors)
        kinds.extend(errors[before:])

    monkeypatch.setattr(serving, "_fire", recording_fire)
    cfg = ServeConfig(store="redis", redis_url=redis_url, redis_prefix="riskcontrol-test-kill", max_actors=2,
                      max_ongoing_requests=2)  # little in flight per replica: the router holds the rest
    RedisStore(redis_url, cfg.redis_prefix).clear()
    url = deploy(cfg, model[0])
    _, frame, _ = model
    payloads = [transaction_payload(r) for r in frame[invalid_reasons(frame) == ""].head(2000).to_dict("records")]
    try:
        result = {}
        runner = threading.Thread(target=lambda: result.update(load_test(f"{url}/score", payloads, rps=25,
                                                                          seconds=20)))
        runner.start()
        time.sleep(3)  # let the load reach steady state before the kill
        replicas = [a for a in ray.util.list_named_actors(all_namespaces=True)
                    if "SERVE_REPLICA" in a["name"] and cfg.app_name in a["name"]]
        assert len(replicas) == 2
        victim = ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"])
        ray.kill(victim, no_restart=True)
        runner.join()
        assert result["error_rate"] < 0.01, (result, kinds)
        deadline = time.time() + 60
        while time.time() < deadline:
            status = serve.status().applications[cfg.app_name]
            running = sum(d.replica_states.get("RUNNING", 0) for d in status.deployments.values())
            if running == 2:
                break
            time.sleep(1)
        assert running == 2, status
    finally:
        serve.delete(cfg.app_name)
        RedisStore(redis_url, cfg.redis_prefix).clear()
