"""Point-in-time features: one implementation for batch (Ray Data) and online (Serve).

The feature logic is a pair of small state machines, :class:`CardState` and
:class:`MerchantState`. A transaction's features are computed from the state
*before* it (plus the transaction itself), then the transaction is folded in.
Batch runs every card's (and merchant's) transactions through the same
functions in time order (blocks of whole cards, then of whole merchants); online keeps the states in
a feature store and advances them with each scored transaction. Merchant fraud
rates only count labels that have matured (``label_time <= event_time``).
"""
from __future__ import annotations

import heapq
import json
import math
from datetime import datetime, timezone

import numpy as np
import pandas as pd

from pipelines.io import filesystem_for, reject_ratio_failure, rejects_table, write_dataset, write_table
from pipelines.shuffle import partition_by
from pipelines.template import Run, StepResult

from .vocab import CATEGORIES, CHANNELS, CURRENCIES, DAY, HOUR

WINDOWS = {"1h": HOUR, "24h": DAY, "7d": 7 * DAY}
KEEP_SECONDS = 7 * DAY
SMALL_AMOUNT = 5.0
MAX_DEVICES_KEPT = 64
RATE_PRIOR, RATE_PRIOR_WEIGHT = 0.02, 20.0

CARD_FEATURES = [
    "card_cnt_1h", "card_cnt_24h", "card_cnt_7d", "card_sum_1h", "card_sum_24h", "card_sum_7d",
    "card_small_cnt_1h", "secs_since_last", "card_history_count", "amount_to_mean", "amount_z",
    "distinct_merchants_24h", "distinct_devices_24h", "new_device", "dist_prev_km", "speed_kmh",
]
MERCHANT_FEATURES = ["merchant_cnt_24h", "merchant_fraud_rate", "merchant_matured_labels"]
TXN_FEATURES = ["amount", "log_amount", "hour", "is_night", "channel_code", "category_code"]
FEATURE_COLUMNS = TXN_FEATURES + CARD_FEATURES + MERCHANT_FEATURES
CATEGORICAL_FEATURES = ["channel_code", "category_code"]

TRANSACTION_COLUMNS = ["transaction_id", "event_time", "card_id", "merchant_id", "amount", "currency",
                       "merchant_category", "channel", "device_id", "lat", "lon"]


def to_epoch(value) -> float:
    """Seconds since 1970 (UTC) for a datetime, pandas Timestamp, ISO string or number."""
    if isinstance(value, (int, float, np.integer, np.floating)):
        return float(value)
    if isinstance(value, str):
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if isinstance(value, pd.Timestamp):
        value = value.to_pydatetime()
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.timestamp()


def haversine_km(lat1, lon1, lat2, lon2) -> float:
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * 6371.0 * math.asin(min(1.0, math.sqrt(a)))


def _code(value, vocabulary) -> int:
    try:
        return vocabulary.index(value)
    except ValueError:
        return -1


def transaction_features(txn: dict) -> dict:
    """Features of the transaction itself (no history)."""
    ts = txn["ts"]
    hour = int((ts % DAY) // HOUR)
    return {"amount": float(txn["amount"]), "log_amount": math.log1p(max(float(txn["amount"]), 0.0)),
            "hour": hour, "is_night": int(1 <= hour < 6),
            "channel_code": _code(txn["channel"], CHANNELS),
            "category_code": _code(txn["merchant_category"], CATEGORIES)}


# ----------------------------------------------------------------- card state
class CardState:
    """What the card features know about one card's past (the last 7 days in detail)."""

    __slots__ = ("amount_sq", "amount_sum", "count", "devices", "last_lat", "last_lon", "last_ts", "recent")

    def __init__(self):
        self.recent: list = []  # [ts, amount, merchant_id, device_id] within 7 days, time order
        self.count, self.amount_sum, self.amount_sq = 0, 0.0, 0.0
        self.last_ts = self.last_lat = self.last_lon = None
        self.devices: list = []

    def to_json(self) -> str:
        return json.dumps([self.recent, self.count, self.amount_sum, self.amount_sq, self.last_ts,
                           self.last_lat, self.last_lon, self.devices])

    @classmethod
    def from_json(cls, text: str | bytes | None) -> CardState:
        state = cls()
        if text:
            (state.recent, state.count, state.amount_sum, state.amount_sq, state.last_ts,
             state.last_lat, state.last_lon, state.devices) = json.loads(text)
        return state


def card_features(state: CardState, txn: dict) -> dict:
    """Card features of ``txn`` from the card's past only (``state`` is not changed)."""
    ts, amount = txn["ts"], float(txn["amount"])
    out = {}
    for name, width in WINDOWS.items():
        rows = [r for r in state.recent if r[0] > ts - width]
        out[f"card_cnt_{name}"] = len(rows)
        out[f"card_sum_{name}"] = float(sum(r[1] for r in rows))
    out["card_small_cnt_1h"] = sum(1 for r in state.recent if r[0] > ts - HOUR and r[1] < SMALL_AMOUNT)
    day_rows = [r for r in state.recent if r[0] > ts - DAY]
    out["distinct_merchants_24h"] = len({r[2] for r in day_rows})
    out["distinct_devices_24h"] = len({r[3] for r in day_rows})
    out["card_history_count"] = state.count
    if state.count:
        mean = state.amount_sum / state.count
        var = max(state.amount_sq / state.count - mean * mean, 0.0)
        out["amount_to_mean"] = amount / mean if mean > 0 else float("nan")
        out["amount_z"] = (amount - mean) / math.sqrt(var) if var > 1e-9 else 0.0
    else:
        out["amount_to_mean"] = out["amount_z"] = float("nan")
    out["new_device"] = int(txn["device_id"] not in state.devices)
    if state.last_ts is None:
        out["secs_since_last"] = out["dist_prev_km"] = out["speed_kmh"] = float("nan")
    else:
        gap = ts - state.last_ts
        dist = haversine_km(state.last_lat, state.last_lon, float(txn["lat"]), float(txn["lon"]))
        out["secs_since_last"] = gap
        out["dist_prev_km"] = dist
        out["speed_kmh"] = dist / max(gap / HOUR, 1.0 / 60)
    return out


def update_card(state: CardState, txn: dict) -> None:
    """Fold ``txn`` into the card's state (drops detail older than 7 days)."""
    ts, amount = txn["ts"], float(txn["amount"])
    state.recent = [r for r in state.recent if r[0] > ts - KEEP_SECONDS]
    state.recent.append([ts, amount, txn["merchant_id"], txn["device_id"]])
    state.count += 1
    state.amount_sum += amount
    state.amount_sq += amount * amount
    state.last_ts, state.last_lat, state.last_lon = ts, float(txn["lat"]), float(txn["lon"])
    if txn["device_id"] not in state.devices:
        state.devices = (state.devices + [txn["device_id"]])[-MAX_DEVICES_KEPT:]


# ------------------------------------------------------------- merchant state
class MerchantState:
    """A merchant's last 24 h of transactions and its labels (pending until they mature)."""

    __slots__ = ("matured", "matured_fraud", "pending", "recent")

    def __init__(self):
        self.recent: list = []   # transaction times within 24 h
        self.pending: list = []  # heap of [label_time, is_fraud]
        self.matured, self.matured_fraud = 0, 0

    def to_json(self) -> str:
        return json.dumps([self.recent, self.pending, self.matured, self.matured_fraud])

    @classmethod
    def from_json(cls, text: str | bytes | None) -> MerchantState:
        state = cls()
        if text:
            state.recent, state.pending, state.matured, state.matured_fraud = json.loads(text)
        return state


def add_label(state: MerchantState, label_time: float, is_fraud: int) -> None:
    """Record a label that becomes usable at ``label_time`` (a chargeback or a cleared review)."""
    heapq.heappush(state.pending, [float(label_time), int(is_fraud)])


def merchant_features(state: MerchantState, ts: float) -> dict:
    """Merchant features at time ``ts``; matures the labels whose time has come."""
    while state.pending and state.pending[0][0] <= ts:
        _, fraud = heapq.heappop(state.pending)
        state.matured += 1
        state.matured_fraud += fraud
    rate = (state.matured_fraud + RATE_PRIOR * RATE_PRIOR_WEIGHT) / (state.matured + RATE_PRIOR_WEIGHT)
    return {"merchant_cnt_24h": sum(1 for t in state.recent if t > ts - DAY),
            "merchant_fraud_rate": rate, "merchant_matured_labels": state.matured}


def update_merchant(state: MerchantState, ts: float) -> None:
    state.recent = [t for t in state.recent if t > ts - DAY] + [ts]


def advance(card: CardState, merchant: MerchantState, txn: dict) -> dict:
    """All features of ``txn`` from its card's and merchant's past, then fold it into both states.

    The online path calls this per transaction; the batch path runs the same
    card and merchant functions over each card's and merchant's rows in order.
    """
    feats = {**transaction_features(txn), **card_features(card, txn), **merchant_features(merchant, txn["ts"])}
    update_card(card, txn)
    update_merchant(merchant, txn["ts"])
    return feats


# ------------------------------------------------------------------- batch
def _in_order(block: pd.DataFrame, key: str) -> tuple[pd.DataFrame, list]:
    """The block sorted by (key, event_time, transaction_id) and its epoch seconds."""
    block = block.sort_values([key, "event_time", "transaction_id"], kind="mergesort").reset_index(drop=True)
    ts = pd.to_datetime(block["event_time"], utc=True).dt.as_unit("us").astype("int64") / 1e6
    return block, ts.tolist()


def card_feature_block(block: pd.DataFrame) -> pd.DataFrame:
    """Rows of whole cards -> the same rows plus transaction and card features (each card in time order)."""
    block, times = _in_order(block, "card_id")
    cols = ["card_id", "amount", "merchant_id", "device_id", "lat", "lon", "channel", "merchant_category"]
    rows, state, current = [], None, object()
    for ts, values in zip(times, zip(*(block[c].tolist() for c in cols))):
        txn = dict(zip(cols, values), ts=ts)
        if txn["card_id"] != current:
            state, current = CardState(), txn["card_id"]
        rows.append({**transaction_features(txn), **card_features(state, txn)})
        update_card(state, txn)
    feats = pd.DataFrame(rows, columns=TXN_FEATURES + CARD_FEATURES, index=block.index)
    return pd.concat([block, feats.drop(columns=[c for c in feats.columns if c in block.columns])], axis=1)


def merchant_feature_block(block: pd.DataFrame) -> pd.DataFrame:
    """Rows of whole merchants -> the same rows plus merchant features (labels only once matured)."""
    block, times = _in_order(block, "merchant_id")
    has_labels = "is_fraud" in block.columns and "label_time" in block.columns
    labels = block["is_fraud"].tolist() if has_labels else [None] * len(block)
    label_times = [None] * len(block)
    if has_labels:  # an empty label_time (a label whose time is unknown) is never a known label
        known = pd.to_datetime(block["label_time"], utc=True)
        label_times = (known.dt.as_unit("us").astype("int64") / 1e6).where(known.notna()).tolist()
    rows, state, current = [], None, object()
    for ts, merchant, label, label_ts in zip(times, block["merchant_id"].tolist(), labels, label_times):
        if merchant != current:
            state, current = MerchantState(), merchant
        rows.append(merchant_features(state, ts))
        update_merchant(state, ts)
        if label is not None and label_ts is not None and not (pd.isna(label) or pd.isna(label_ts)):
            add_label(state, label_ts, int(label))
    feats = pd.DataFrame(rows, columns=MERCHANT_FEATURES, index=block.index)
    return pd.concat([block, feats], axis=1)


def invalid_reasons(batch: pd.DataFrame) -> pd.Series:
    """One reason per row ('' when valid): missing fields, bad amount, currency, geo, channel."""
    reasons = pd.Series([""] * len(batch), index=batch.index, dtype=object)

    def mark(mask, why):
        mask = pd.Series(mask, index=batch.index).fillna(True).astype(bool) & (reasons == "")
        reasons[mask] = why

    for col in ("transaction_id", "event_time", "card_id", "merchant_id", "device_id"):
        if col not in batch.columns:
            reasons[reasons == ""] = f"missing column {col}"
            return reasons
        mark(batch[col].isna(), f"{col} is missing")
    amount = pd.to_numeric(batch["amount"], errors="coerce")
    mark(~np.isfinite(amount.astype(float)), "amount is not a number")
    mark(amount <= 0, "amount must be > 0")
    mark(~batch["currency"].isin(CURRENCIES), "unknown currency")
    mark(~batch["channel"].isin(CHANNELS), "unknown channel")
    lat, lon = pd.to_numeric(batch["lat"], errors="coerce"), pd.to_numeric(batch["lon"], errors="coerce")
    mark(~lat.between(-90, 90) | ~lon.between(-180, 180), "lat/lon out of range")
    return reasons


def tag_invalid(batch: pd.DataFrame) -> pd.DataFrame:
    """Add a ``reject_reason`` column ('' for valid rows)."""
    return batch.assign(reject_reason=invalid_reasons(batch))


def build_features(transactions, num_cpus: float = 1, blocks: int = 8, streaming: bool = False):
    """Ray Datasets ``(features, rejects)`` from a transactions Dataset.

    Rows are hash-partitioned by card (then by merchant) into ``blocks`` blocks
    so each block holds whole cards; invalid rows go to ``rejects`` (id, stage,
    reason) and never enter any card's or merchant's history. The partitions are
    computed here (plain Ray tasks, :func:`pipelines.shuffle.partition_by`: Ray Data's
    keyed repartition cost 6-11 s for 6,000 rows on 2 cores), or with ``streaming``
    by Ray Data as the consumer asks (for an actor pool downstream: see that function);
    the merchant features and ``rejects`` stay lazy.
    """
    tagged = transactions.map_batches(tag_invalid, batch_format="pandas", num_cpus=num_cpus)
    # batch filters, not row ones: rows rebuilt from Python values lose the column types (an int8 label
    # becomes int64, and a block whose label_time is partly empty an unwritable object column)
    valid = tagged.map_batches(_valid_rows, batch_format="pandas", num_cpus=num_cpus)
    rejects = tagged.map_batches(_to_rejects, batch_format="pandas", num_cpus=num_cpus)
    cards = partition_by(valid, ["card_id"], blocks, num_cpus, streaming).map_batches(
        card_feature_block, batch_format="pandas", batch_size=None, num_cpus=num_cpus)
    features = partition_by(cards, ["merchant_id"], blocks, num_cpus, streaming).map_batches(
        merchant_feature_block, batch_format="pandas", batch_size=None, num_cpus=num_cpus)
    return features, rejects


def _valid_rows(batch: pd.DataFrame) -> pd.DataFrame:
    return batch[batch["reject_reason"] == ""].drop(columns=["reject_reason"])


def _to_rejects(batch: pd.DataFrame) -> pd.DataFrame:
    bad = batch[batch["reject_reason"] != ""]
    return pd.DataFrame({"id": bad["transaction_id"].astype(str), "stage": "features",
                         "reason": bad["reject_reason"].astype(str)})


def features_frame(transactions: pd.DataFrame) -> pd.DataFrame:
    """The same features without Ray, for small in-memory frames (tests, baselines)."""
    valid = transactions[invalid_reasons(transactions) == ""]
    return merchant_feature_block(card_feature_block(valid)).sort_values("transaction_id", ignore_index=True)


# ------------------------------------------------------------------ the step
def run_features(transactions, out_dir: str, cfg) -> dict:
    """Compute and write ``features`` and ``rejects`` Parquet folders (``cfg``: FeatureConfig); counts,
    and ``failure`` (one line) when more than ``max_reject_ratio`` of the rows were rejected."""
    max_reject_ratio = cfg.max_reject_ratio
    features, rejects = build_features(transactions.materialize(), cfg.num_cpus, cfg.blocks)
    write_dataset(features, f"{out_dir}/features")
    bad = rejects.to_pandas() if rejects.count() else pd.DataFrame(columns=["id", "stage", "reason"])
    write_table(rejects_table(bad.to_dict("records")), f"{out_dir}/rejects")
    rows = _count_rows(f"{out_dir}/features")
    failure = reject_ratio_failure(len(bad), rows + len(bad), max_reject_ratio, "transactions",
                                   "features.max_reject_ratio", f"{out_dir}/rejects")
    return {"outputs": {"features": f"{out_dir}/features", "rejects": f"{out_dir}/rejects"},
            "rows": rows, "rejects": len(bad), "failure": failure}


def _count_rows(path: str) -> int:
    import pyarrow.dataset as pads

    fs, p = filesystem_for(path)
    return pads.dataset(p, filesystem=fs, format="parquet").count_rows()


def run(cfg, run: Run) -> StepResult:
    """The features step: point-in-time ``features`` and ``rejects`` of the run's ``transactions``."""
    from .data import read_transactions

    res = run_features(read_transactions(run.input("transactions")), run.dir, cfg.features)
    return StepResult(res["outputs"], {"feature_rows": res["rows"]}, rows=res["rows"], rejects=res["rejects"],
                      failure=res["failure"])


if __name__ == "__main__":
    from .template import TEMPLATE

    TEMPLATE.step_alias("features")
