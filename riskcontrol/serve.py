"""Online scoring on Ray Serve: FastAPI ingress, ``@serve.batch`` model calls, a per-card feature store.

    POST {prefix}/score    one transaction or a list -> probability, tier, reasons, model version, latency,
                           batch_size (how many transactions the model call that scored it held)
    POST {prefix}/labels   matured-label feedback (chargebacks / cleared reviews) for merchant fraud rates
    GET  {prefix}/healthz  200 (model version, store: memory|redis), or 503 when the feature store does not answer

Features come from the same state machines as the batch path
(:func:`riskcontrol.features.advance`), kept per card and per merchant in a
feature store: in-process (one replica; least recently used entries
dropped past ``serve.memory_max_entries``) or Redis (shared by replicas); the
default ``auto`` is Redis on a HIGH_AVAILABILITY cluster (:func:`store_kind`). Each
update of a card's and merchant's state is atomic: a Redis WATCH/MULTI
transaction, retried on conflict, so replicas scoring one card at once lose no
update. Bounds: ``MAX_ITEMS`` per request, ``MAX_TEXT`` characters per string,
ids in ``[0, 2**63)`` (422 otherwise); ``serve.max_card_recent`` /
``serve.max_merchant_events`` cap the kept history (the windowed counts
saturate there, unlike the batch path); ``serve.request_timeout_s`` per request
(504; a list may be partly applied). ``adbray serve riskcontrol --run-dir URI --group G``
(or ``serve deploy`` of the config it prints) deploys it without a driver; riskcontrol/serve_config.yaml
is that config, generated from the ``serve`` section.
"""

import asyncio
import heapq
import math
import time
from collections import OrderedDict
from datetime import datetime
from typing import Annotated, Literal

import click
import httpx
import numpy as np
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from redis.exceptions import RedisError, WatchError

from pipelines.cli import RunFailed, exit_with, template_options
from pipelines.report import emit, summary
from pipelines.template import prepare_run_dir

from .config import ServeConfig, load
from .features import CURRENCIES, CardState, MerchantState, add_label, advance, to_epoch

MAX_ITEMS = 1000  # transactions or labels in one request
MAX_TEXT = 128    # characters of a device_id or merchant_category
MAX_CONFLICTS = 200  # Redis transaction retries of one update before giving up (503)
Id = Annotated[int, Field(ge=0, lt=2 ** 63)]  # BIGINT ids, as the batch path stores them


class Transaction(BaseModel):
    """One card transaction as the payment switch sends it."""

    model_config = ConfigDict(extra="forbid")
    transaction_id: Id
    event_time: datetime
    card_id: Id
    merchant_id: Id
    amount: float = Field(gt=0, allow_inf_nan=False)
    currency: Literal[CURRENCIES]  # type: ignore[valid-type]
    merchant_category: str = Field(min_length=1, max_length=MAX_TEXT)
    channel: Literal["pos", "online", "atm"]
    device_id: str = Field(min_length=1, max_length=MAX_TEXT)
    lat: float = Field(ge=-90, le=90)
    lon: float = Field(ge=-180, le=180)


class Label(BaseModel):
    """A transaction's fraud label and the time it became known."""

    model_config = ConfigDict(extra="forbid")
    transaction_id: Id
    merchant_id: Id
    label_time: datetime
    is_fraud: Literal[0, 1]


Transactions = Annotated[list[Transaction], Field(max_length=MAX_ITEMS)]
Labels = Annotated[list[Label], Field(max_length=MAX_ITEMS)]


# ------------------------------------------------------------ feature stores
def cap_states(card: CardState | None, merchant: MerchantState, max_card_recent: int,
               max_merchant_events: int) -> None:
    """Keep the newest ``max_card_recent`` card rows, the newest ``max_merchant_events`` merchant
    times and the ``max_merchant_events`` labels that mature first."""
    if card is not None and len(card.recent) > max_card_recent:
        card.recent = card.recent[-max_card_recent:]
    if len(merchant.recent) > max_merchant_events:
        merchant.recent = merchant.recent[-max_merchant_events:]
    if len(merchant.pending) > max_merchant_events:
        merchant.pending = heapq.nsmallest(max_merchant_events, merchant.pending)  # sorted: still a heap


class MemoryStore:
    """Card and merchant states in this process (one replica; lost on restart), at most
    ``max_entries`` cards and ``max_entries`` merchants (least recently used dropped).
    Updates are atomic: no ``await`` between read and write."""

    def __init__(self, max_entries: int = 100_000, max_card_recent: int = 1000,
                 max_merchant_events: int = 10_000):
        self.cards: OrderedDict = OrderedDict()
        self.merchants: OrderedDict = OrderedDict()
        self.max_entries, self.caps = max_entries, (max_card_recent, max_merchant_events)

    @staticmethod
    def _get(table: OrderedDict, key, new):
        if key in table:
            table.move_to_end(key)
            return table[key]
        return new()

    def _put(self, table: OrderedDict, key, state) -> None:
        table[key] = state
        table.move_to_end(key)
        while len(table) > self.max_entries:
            table.popitem(last=False)

    def update(self, txn: dict) -> dict:
        """Features of ``txn``; its card's and merchant's states advanced past it."""
        card = self._get(self.cards, txn["card_id"], CardState)
        merchant = self._get(self.merchants, txn["merchant_id"], MerchantState)
        feats = advance(card, merchant, txn)
        cap_states(card, merchant, *self.caps)
        self._put(self.cards, txn["card_id"], card)
        self._put(self.merchants, txn["merchant_id"], merchant)
        return feats

    async def advance(self, txn: dict) -> dict:
        return self.update(txn)

    async def label(self, merchant_id: int, label_time: float, is_fraud: int) -> None:
        merchant = self._get(self.merchants, merchant_id, MerchantState)
        add_label(merchant, label_time, is_fraud)
        cap_states(None, merchant, *self.caps)
        self._put(self.merchants, merchant_id, merchant)

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None


class RedisStore:
    """Card and merchant states in Redis (JSON per key), shared by every replica (``redis.asyncio``:
    no blocking call on the event loop). Each update is a WATCH/MULTI transaction on the keys it
    changes, retried when another replica changed them first."""

    def __init__(self, url: str, prefix: str = "riskcontrol", timeout_s: float = 2.0,
                 max_card_recent: int = 1000, max_merchant_events: int = 10_000):
        import redis.asyncio

        self.url, self.prefix, self.timeout_s = url, prefix, timeout_s
        self.caps = (max_card_recent, max_merchant_events)
        self.r = redis.asyncio.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)

    def _card_key(self, card_id) -> str:
        return f"{self.prefix}:card:{card_id}"

    def _merchant_key(self, merchant_id) -> str:
        return f"{self.prefix}:merchant:{merchant_id}"

    async def _transact(self, keys: list[str], change):
        """``change(*current values) -> (new values, result)`` applied atomically to ``keys``; the result."""
        async with self.r.pipeline(transaction=True) as pipe:
            for _ in range(MAX_CONFLICTS):
                try:
                    await pipe.watch(*keys)
                    values, result = change(*await pipe.mget(keys))
                    pipe.multi()
                    pipe.mset(dict(zip(keys, values)))
                    await pipe.execute()
                    return result
                except WatchError:  # another replica wrote first: read again
                    continue
        raise RedisError(f"{keys[0]}: changed by others {MAX_CONFLICTS} times in a row, update not applied")

    async def advance(self, txn: dict) -> dict:
        def change(card_raw, merchant_raw):
            card, merchant = CardState.from_json(card_raw), MerchantState.from_json(merchant_raw)
            feats = advance(card, merchant, txn)
            cap_states(card, merchant, *self.caps)
            return (card.to_json(), merchant.to_json()), feats

        return await self._transact([self._card_key(txn["card_id"]), self._merchant_key(txn["merchant_id"])],
                                    change)

    async def label(self, merchant_id: int, label_time: float, is_fraud: int) -> None:
        def change(raw):
            merchant = MerchantState.from_json(raw)
            add_label(merchant, label_time, is_fraud)
            cap_states(None, merchant, *self.caps)
            return (merchant.to_json(),), None

        await self._transact([self._merchant_key(merchant_id)], change)

    async def ping(self) -> None:
        await self.r.ping()

    async def close(self) -> None:
        await self.r.aclose()

    def clear(self) -> int:
        """Delete every key under the prefix (tests, resets); a blocking call, not for the serving path."""
        import redis

        client = redis.Redis.from_url(self.url, socket_timeout=self.timeout_s)
        keys = list(client.scan_iter(match=f"{self.prefix}:*", count=1000))
        return client.delete(*keys) if keys else 0


def gcs_in_redis() -> bool:
    """Whether the Ray cluster this process belongs to keeps its GCS state in Redis (HIGH_AVAILABILITY:
    it survives a head restart). Its head records its GCS storage (``redis``/``memory``/``rocksdb``) in
    the cluster's internal KV when it starts, whether or not usage stats are sent (Ray's
    ``extra_usage_tag_gcs_storage``); False without Ray."""
    try:
        from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_initialized

        if not _internal_kv_initialized():
            return False
        return _internal_kv_get(b"extra_usage_tag_gcs_storage", namespace=b"usage_stats") == b"redis"
    except Exception:  # noqa: BLE001 - private API moved or the GCS does not answer: not known to be HA
        return False


def store_kind(store: str) -> str:
    """``memory`` or ``redis`` for ``serve.store``: ``auto`` is redis on a HIGH_AVAILABILITY cluster (a head
    restart keeps the replicas, but a replica that dies takes an in-memory store with it), else memory."""
    if store != "auto":
        return store
    return "redis" if gcs_in_redis() else "memory"


def _require_redis(url: str, timeout_s: float) -> None:
    import redis

    from pipelines.config import redact

    try:
        redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s).ping()
    except RedisError as e:
        raise ValueError(f"serve.store=auto on a HIGH_AVAILABILITY cluster uses Redis, but {redact(url)} does not "
                         f"answer ({e}): set serve.redis_url, or serve.store=memory to keep the state in the "
                         "replica (lost when it dies)") from None


def make_store(cfg: ServeConfig):
    """The feature store ``cfg.store`` names (see :func:`store_kind`), with its bounds."""
    caps = {"max_card_recent": cfg.max_card_recent, "max_merchant_events": cfg.max_merchant_events}
    if store_kind(cfg.store) == "redis":
        if cfg.store == "auto":  # chosen for the user: a Redis that is not there is one line, not a 503 per request
            _require_redis(cfg.redis_url, cfg.redis_timeout_s)
        return RedisStore(cfg.redis_url, cfg.redis_prefix, cfg.redis_timeout_s, **caps)
    return MemoryStore(cfg.memory_max_entries, **caps)


def score_online(store: MemoryStore, txn: dict) -> dict:
    """Features of one transaction from an in-process store, advancing the card's and merchant's state."""
    return store.update(txn)


def _clean(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


# ---------------------------------------------------------------- the app
api = FastAPI(title="riskcontrol online scoring")


@serve.deployment
@serve.ingress(api)
class RiskScorer:
    """The online scorer: features from the store, model calls batched across requests."""

    def __init__(self, model_dir: str, serve_cfg: dict | None = None,
                 high_threshold: float | None = None, medium_threshold: float | None = None):
        from .score import Scorer

        self.cfg = ServeConfig(**(serve_cfg or {}))
        self.scorer = Scorer(model_dir, high_threshold, medium_threshold)
        self.store = make_store(self.cfg)
        self.store_kind = "redis" if isinstance(self.store, RedisStore) else "memory"
        self.predict.set_max_batch_size(self.cfg.max_batch_size)
        self.predict.set_batch_wait_timeout_s(self.cfg.batch_wait_timeout_s)

    async def _bounded(self, work, what: str):
        """``work`` within ``serve.request_timeout_s`` (504); a store that fails answers 503."""
        try:
            return await asyncio.wait_for(work, self.cfg.request_timeout_s)
        except TimeoutError:  # (before OSError: TimeoutError is one)
            raise HTTPException(504, f"{what} took over serve.request_timeout_s="
                                     f"{self.cfg.request_timeout_s}s") from None
        except (RedisError, OSError) as e:
            raise HTTPException(503, f"feature store unavailable: {type(e).__name__}: {e}") from None

    @api.get("/healthz")
    async def healthz(self) -> dict:
        try:
            await asyncio.wait_for(self.store.ping(), self.cfg.request_timeout_s)
        except (RedisError, OSError, TimeoutError) as e:
            raise HTTPException(503, f"feature store unreachable: {type(e).__name__}: {e}") from None
        return {"status": "ok", "model_version": self.scorer.meta["version"], "store": self.store_kind}

    @api.post("/labels")
    async def labels(self, body: Label | Labels) -> dict:
        items = body if isinstance(body, list) else [body]

        async def apply():
            for label in items:
                await self.store.label(label.merchant_id, to_epoch(label.label_time), label.is_fraud)

        await self._bounded(apply(), "labels")
        return {"accepted": len(items)}

    @api.post("/score")
    async def score(self, body: Transaction | Transactions, features: bool = False):
        items = body if isinstance(body, list) else [body]
        out = await self._bounded(self._score(items, features), "scoring")
        return out if isinstance(body, list) else out[0]

    async def _score(self, items: list[Transaction], features: bool) -> list[dict]:
        start = time.perf_counter()
        rows = []
        for t in items:  # features first, in request order (each call advances the card's state)
            txn = t.model_dump()
            txn["ts"] = to_epoch(t.event_time)
            rows.append(await self.store.advance(txn))
        results = await asyncio.gather(*(self.predict(r) for r in rows))
        latency = (time.perf_counter() - start) * 1000
        out = []
        for t, r, f in zip(items, results, rows):
            r = {"transaction_id": t.transaction_id, **r, "model_version": self.scorer.meta["version"],
                 "latency_ms": latency}
            if features:
                r["features"] = {k: _clean(v) for k, v in f.items()}
            out.append(r)
        return out

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def predict(self, rows: list[dict]) -> list[dict]:
        names = self.scorer.features
        X = np.array([[r[n] for n in names] for r in rows], dtype=np.float64)
        s = self.scorer.score_matrix(X)
        return [{"probability": float(p), "risk_tier": str(tier), "reasons": reasons, "batch_size": len(rows)}
                for p, tier, reasons in zip(s["probability"], s["risk_tier"], s["reasons"])]


def build_app(args: dict):
    """Application builder for Serve config files (``adbray serve``, ``serve deploy``, serve_config.yaml):
    ``args.serve`` is the ``serve`` config section, ``args.run_dir`` a run folder whose model it serves
    (the one its manifest records, else ``<run_dir>/model``; ``serve.model_dir`` wins)."""
    cfg = ServeConfig(**(args.get("serve") or {}))
    model_dir = cfg.model_dir or (args.get("run_dir") and run_model(str(args["run_dir"])))
    if not model_dir:
        raise ValueError("riskcontrol serve app: give args.run_dir (a run folder with a trained model) "
                         "or args.serve.model_dir")
    return application(cfg, model_dir)


def run_model(run_dir: str) -> str:
    """The model folder of a run: its manifest's ``model`` output, else ``<run_dir>/model``."""
    from pipelines.io import join
    from pipelines.template import read_manifest

    return read_manifest(run_dir.rstrip("/")).get("model") or join(run_dir.rstrip("/"), "model")


def application(cfg: ServeConfig, model_dir: str):
    """The bound Serve application for ``cfg`` (fixed or autoscaled replicas, CPUs, batching, store, bounds)."""
    from pipelines.serving import replica_options

    return RiskScorer.options(
        **replica_options(cfg.max_actors, cfg.autoscaling), ray_actor_options={"num_cpus": cfg.num_cpus},
        max_ongoing_requests=cfg.max_ongoing_requests,
    ).bind(model_dir=model_dir, serve_cfg=cfg.model_dump())


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


def replay(url: str, payloads: list, rps: float, timeout: float = 30.0, transport=None) -> dict:
    """POST each payload to ``url`` at ``rps`` (open loop; latency from each scheduled send time) and
    count the replies that are 200 with a probability: requests, ok, error_rate, p50_ms, p99_ms, errors
    (the first few reasons)."""
    from pipelines.serving import percentiles

    async def run():
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
        async with httpx.AsyncClient(timeout=timeout, limits=limits, transport=transport) as client:
            start = time.perf_counter()

            async def one(i: int, body) -> tuple[str | None, float]:
                due = start + i / rps
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
                try:
                    r = await client.post(url, json=body)
                    good = r.status_code == 200 and "probability" in r.json()
                    why = None if good else f"{r.status_code}: {r.text[:200]}"
                except (httpx.HTTPError, ValueError) as e:  # refused, reset, timed out, not JSON
                    why = f"{type(e).__name__}: {e}"
                return why, time.perf_counter() - due

            return await asyncio.gather(*(one(i, b) for i, b in enumerate(payloads)))

    results = asyncio.run(run())
    errors = [why for why, _ in results if why]
    ok = [took for why, took in results if not why]
    stats = percentiles(ok)
    return {"requests": len(results), "ok": len(ok), "error_rate": len(errors) / max(len(results), 1),
            "p50_ms": stats["p50_ms"], "p99_ms": stats["p99_ms"], "errors": errors[:5]}


def smoke_test(cfg, model_dir: str, transactions_path: str) -> dict:
    """Deploy, replay the first ``serve.smoke_requests`` valid transactions at 50 req/s, delete the app;
    ``requests`` sent and ``ok`` replies (200 with a probability) are counted, not taken from config."""
    import sys

    from .features import invalid_reasons
    from .train import read_features

    frame = read_features(transactions_path).sort_values(["event_time", "transaction_id"])
    frame = frame[invalid_reasons(frame) == ""].head(cfg.serve.smoke_requests)
    payloads = [transaction_payload(r) for r in frame.to_dict("records")]
    if not payloads:
        raise RunFailed(f"online smoke test: no valid transaction in {transactions_path}")
    url = deploy(cfg.serve, model_dir)
    try:
        first = replay(f"{url}/score", payloads[:1], rps=1)
        if not first["ok"]:
            raise RunFailed(f"online smoke test: /score answered {first['errors'][0]}")
        stats = replay(f"{url}/score", payloads[1:], rps=50)
    finally:
        serve.delete(cfg.serve.app_name)
    if stats["errors"]:
        print(f"online smoke test: {len(payloads) - 1 - stats['ok']} failed, first: {stats['errors'][0]}",
              file=sys.stderr)
    requests, ok = 1 + stats["requests"], 1 + stats["ok"]
    return {"requests": requests, "ok": ok, "error_rate": (requests - ok) / requests, "p50_ms": stats["p50_ms"],
            "p99_ms": stats["p99_ms"]}


@click.command()
@template_options
@click.option("--model", "model_dir", default=None,
              help="Model folder, local or oss://BUCKET/PATH (default: serve.model_dir).")
@click.option("--block/--no-block", default=None, help="Keep serving until Ctrl-C (default: serve.block).")
def main(config, overrides, address, run_dir, model_dir, block):
    """Deploy the online scorer (python -m riskcontrol.serve --model DIR)."""
    from pipelines.template import require_cluster_readable

    from .template import TEMPLATE
    from .train import load_model

    cfg = load(config, overrides)
    model_dir = model_dir or cfg.serve.model_dir
    if not model_dir:
        raise ValueError("serve.model_dir: no model given (use --model DIR)")
    require_cluster_readable(model_dir, "--model", "--model", address)  # replicas load it on the cluster's nodes
    _, meta = load_model(model_dir)
    out = prepare_run_dir(TEMPLATE.name, run_dir, address)
    TEMPLATE.connect(cfg, address)
    url = deploy(cfg.serve, model_dir)
    health = httpx.get(f"{url}/healthz", timeout=10).json()
    emit(summary(TEMPLATE.name, "serve", out, {"url": url}, {"model_version": meta["version"], **health},
                 app=cfg.serve.app_name))
    if block if block is not None else cfg.serve.block:
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            serve.delete(cfg.serve.app_name)


if __name__ == "__main__":
    exit_with(main)
