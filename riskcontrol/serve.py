"""Online scoring on Ray Serve: FastAPI ingress, ``@serve.batch`` model calls, a per-card feature store.

    POST {prefix}/score    one transaction or a list -> probability, tier, reasons, model version, latency
    POST {prefix}/labels   matured-label feedback (chargebacks / cleared reviews) for merchant fraud rates
    GET  {prefix}/healthz

Features come from the same state machines as the batch path
(:func:`riskcontrol.features.advance`), kept per card and per merchant in a
feature store: in-process (default; one replica) or Redis (shared by replicas).
``serve run riskcontrol/serve_config.yaml`` deploys it without a driver.
"""

import asyncio
import math
import time
from datetime import datetime
from typing import Literal

import click
import httpx
import numpy as np
from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from pipelines.cli import RunFailed, exit_with, template_options
from pipelines.io import run_dir as make_run_dir
from pipelines.report import emit, summary

from .config import ServeConfig, load
from .features import CURRENCIES, CardState, MerchantState, add_label, advance, to_epoch


class Transaction(BaseModel):
    """One card transaction as the payment switch sends it."""

    model_config = ConfigDict(extra="forbid")
    transaction_id: int
    event_time: datetime
    card_id: int
    merchant_id: int
    amount: float = Field(gt=0, allow_inf_nan=False)
    currency: Literal[CURRENCIES]  # type: ignore[valid-type]
    merchant_category: str = Field(min_length=1)
    channel: Literal["pos", "online", "atm"]
    device_id: str = Field(min_length=1)
    lat: float = Field(ge=-90, le=90)
    lon: float = Field(ge=-180, le=180)


class Label(BaseModel):
    """A transaction's fraud label and the time it became known."""

    model_config = ConfigDict(extra="forbid")
    transaction_id: int
    merchant_id: int
    label_time: datetime
    is_fraud: Literal[0, 1]


# ------------------------------------------------------------ feature stores
class MemoryStore:
    """Card and merchant states in this process (one replica; lost on restart)."""

    def __init__(self):
        self.cards: dict = {}
        self.merchants: dict = {}

    def load(self, card_id, merchant_id) -> tuple[CardState, MerchantState]:
        return self.cards.get(card_id) or CardState(), self.merchants.get(merchant_id) or MerchantState()

    def save(self, card_id, card: CardState, merchant_id, merchant: MerchantState) -> None:
        self.cards[card_id], self.merchants[merchant_id] = card, merchant

    def load_merchant(self, merchant_id) -> MerchantState:
        return self.merchants.get(merchant_id) or MerchantState()

    def save_merchant(self, merchant_id, merchant: MerchantState) -> None:
        self.merchants[merchant_id] = merchant


class RedisStore:
    """Card and merchant states in Redis (JSON per key), shared by every replica."""

    def __init__(self, url: str, prefix: str = "riskcontrol"):
        import redis

        self.r = redis.Redis.from_url(url, socket_timeout=2)
        self.prefix = prefix

    def _keys(self, card_id, merchant_id):
        return f"{self.prefix}:card:{card_id}", f"{self.prefix}:merchant:{merchant_id}"

    def load(self, card_id, merchant_id) -> tuple[CardState, MerchantState]:
        card, merchant = self.r.mget(self._keys(card_id, merchant_id))
        return CardState.from_json(card), MerchantState.from_json(merchant)

    def save(self, card_id, card: CardState, merchant_id, merchant: MerchantState) -> None:
        ck, mk = self._keys(card_id, merchant_id)
        self.r.mset({ck: card.to_json(), mk: merchant.to_json()})

    def load_merchant(self, merchant_id) -> MerchantState:
        return MerchantState.from_json(self.r.get(self._keys(0, merchant_id)[1]))

    def save_merchant(self, merchant_id, merchant: MerchantState) -> None:
        self.r.set(self._keys(0, merchant_id)[1], merchant.to_json())

    def clear(self) -> int:
        keys = list(self.r.scan_iter(match=f"{self.prefix}:*", count=1000))
        return self.r.delete(*keys) if keys else 0


def make_store(kind: str = "memory", redis_url: str | None = None, prefix: str = "riskcontrol"):
    """The feature store named by config (``memory`` or ``redis``)."""
    return RedisStore(redis_url, prefix) if kind == "redis" else MemoryStore()


def score_online(store, txn: dict) -> dict:
    """Features of one transaction from the store, advancing the card's and merchant's state."""
    card, merchant = store.load(txn["card_id"], txn["merchant_id"])
    feats = advance(card, merchant, txn)
    store.save(txn["card_id"], card, txn["merchant_id"], merchant)
    return feats


def _clean(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


# ---------------------------------------------------------------- the app
api = FastAPI(title="riskcontrol online scoring")


@serve.deployment
@serve.ingress(api)
class RiskScorer:
    """The online scorer: features from the store, model calls batched across requests."""

    def __init__(self, model_dir: str, store: str = "memory", redis_url: str | None = None,
                 redis_prefix: str = "riskcontrol", max_batch_size: int = 32, batch_wait_timeout_s: float = 0.002,
                 high_threshold: float | None = None, medium_threshold: float | None = None):
        from .score import Scorer

        self.scorer = Scorer(model_dir, high_threshold, medium_threshold)
        self.store = make_store(store, redis_url, redis_prefix)
        self.predict.set_max_batch_size(max_batch_size)
        self.predict.set_batch_wait_timeout_s(batch_wait_timeout_s)

    @api.get("/healthz")
    def healthz(self) -> dict:
        return {"status": "ok", "model_version": self.scorer.meta["version"]}

    @api.post("/labels")
    def labels(self, body: Label | list[Label]) -> dict:
        items = body if isinstance(body, list) else [body]
        for label in items:
            merchant = self.store.load_merchant(label.merchant_id)
            add_label(merchant, to_epoch(label.label_time), label.is_fraud)
            self.store.save_merchant(label.merchant_id, merchant)
        return {"accepted": len(items)}

    @api.post("/score")
    async def score(self, body: Transaction | list[Transaction], features: bool = False):
        start = time.perf_counter()
        items = body if isinstance(body, list) else [body]
        # features first, in request order (each call advances the card's state)
        rows = []
        for t in items:
            txn = t.model_dump()
            txn["ts"] = to_epoch(t.event_time)
            rows.append(score_online(self.store, txn))
        results = await asyncio.gather(*(self.predict(r) for r in rows))
        latency = (time.perf_counter() - start) * 1000
        out = []
        for t, r, f in zip(items, results, rows):
            r = {"transaction_id": t.transaction_id, **r, "model_version": self.scorer.meta["version"],
                 "latency_ms": latency}
            if features:
                r["features"] = {k: _clean(v) for k, v in f.items()}
            out.append(r)
        return out if isinstance(body, list) else out[0]

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def predict(self, rows: list[dict]) -> list[dict]:
        names = self.scorer.features
        X = np.array([[r[n] for n in names] for r in rows], dtype=np.float64)
        s = self.scorer.score_matrix(X)
        return [{"probability": float(p), "risk_tier": str(tier), "reasons": reasons}
                for p, tier, reasons in zip(s["probability"], s["risk_tier"], s["reasons"])]


def build_app(args: dict):
    """Application builder for ``serve run riskcontrol.serve:build_app model_dir=...`` / serve_config.yaml."""
    cfg = ServeConfig(**{k: v for k, v in args.items() if k in ServeConfig.model_fields})
    if not cfg.model_dir:
        raise ValueError("serve.model_dir: the online scorer needs a trained model folder")
    return application(cfg, cfg.model_dir)


def application(cfg: ServeConfig, model_dir: str):
    """The bound Serve application for ``cfg`` (replicas, CPUs, batching, store)."""
    return RiskScorer.options(
        num_replicas=cfg.max_actors, ray_actor_options={"num_cpus": cfg.num_cpus},
        max_ongoing_requests=cfg.max_ongoing_requests,
    ).bind(model_dir=model_dir, store=cfg.store, redis_url=cfg.redis_url, redis_prefix=cfg.redis_prefix,
           max_batch_size=cfg.max_batch_size, batch_wait_timeout_s=cfg.batch_wait_timeout_s)


def deploy(cfg: ServeConfig, model_dir: str) -> str:
    """Start Serve (free port), run the app and wait until every proxy routes it; returns its base URL."""
    from pipelines.serving import deploy_app

    try:
        return deploy_app(application(cfg, model_dir), cfg.app_name, cfg.route_prefix)
    except TimeoutError as e:
        raise RunFailed(str(e)) from None


def transaction_payload(row: dict) -> dict:
    """A JSON body for ``/score`` from a transactions row."""
    return {"transaction_id": int(row["transaction_id"]),
            "event_time": _iso(row["event_time"]), "card_id": int(row["card_id"]),
            "merchant_id": int(row["merchant_id"]), "amount": float(row["amount"]), "currency": row["currency"],
            "merchant_category": row["merchant_category"], "channel": row["channel"],
            "device_id": row["device_id"], "lat": float(row["lat"]), "lon": float(row["lon"])}


def _iso(value) -> str:
    import pandas as pd

    return pd.Timestamp(value).isoformat()


def smoke_test(cfg, model_dir: str, transactions_path: str) -> dict:
    """Deploy, replay the first ``serve.smoke_requests`` valid transactions at 50 req/s, delete the app."""
    from pipelines.serving import load_test

    from .features import invalid_reasons
    from .train import read_features

    frame = read_features(transactions_path).sort_values(["event_time", "transaction_id"])
    frame = frame[invalid_reasons(frame) == ""].head(cfg.serve.smoke_requests)
    payloads = [transaction_payload(r) for r in frame.to_dict("records")]
    url = deploy(cfg.serve, model_dir)
    try:
        first = httpx.post(f"{url}/score", json=payloads[0], timeout=30)
        if first.status_code != 200 or "probability" not in first.json():
            raise RunFailed(f"online smoke test: /score answered {first.status_code}: {first.text[:200]}")
        stats = load_test(f"{url}/score", payloads[1:], rps=50, seconds=(len(payloads) - 1) / 50)
    finally:
        serve.delete(cfg.serve.app_name)
    return {"requests": stats["requests"] + 1, "error_rate": stats["error_rate"], "p50_ms": stats["p50_ms"],
            "p99_ms": stats["p99_ms"]}


@click.command()
@template_options
@click.option("--model", "model_dir", default=None, help="Model folder (default: serve.model_dir).")
@click.option("--block/--no-block", default=None, help="Keep serving until Ctrl-C (default: serve.block).")
def main(config, overrides, address, run_dir, model_dir, block):
    """Deploy the online scorer (python -m riskcontrol.serve --model DIR)."""
    from .data import TEMPLATE, connect_for
    from .train import load_model

    cfg = load(config, overrides)
    model_dir = model_dir or cfg.serve.model_dir
    if not model_dir:
        raise ValueError("serve.model_dir: no model given (use --model DIR)")
    _, meta = load_model(model_dir)
    connect_for(cfg, address)
    out = run_dir or make_run_dir(TEMPLATE)
    url = deploy(cfg.serve, model_dir)
    health = httpx.get(f"{url}/healthz", timeout=10).json()
    emit(summary(TEMPLATE, "serve", out, {"url": url}, {"model_version": meta["version"], **health},
                 app=cfg.serve.app_name))
    if block if block is not None else cfg.serve.block:
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            serve.delete(cfg.serve.app_name)


if __name__ == "__main__":
    exit_with(main)
