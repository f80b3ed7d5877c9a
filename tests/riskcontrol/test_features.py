"""Feature logic without Ray: point-in-time correctness (leakage), online == batch, rejects, generator."""
import math

import numpy as np
import pandas as pd
import pytest

from riskcontrol.config import DataConfig
from riskcontrol.data import generate_shard
from riskcontrol.features import (
    FEATURE_COLUMNS,
    CardState,
    MerchantState,
    add_label,
    advance,
    features_frame,
    invalid_reasons,
    to_epoch,
)

SMALL = DataConfig(rows=6000, cards=120, merchants=60, days=10, shards=1, invalid_rate=0.002)


@pytest.fixture(scope="module")
def transactions():
    return generate_shard(SMALL, 0)


def assert_same_features(a: pd.DataFrame, b: pd.DataFrame):
    a = a.set_index("transaction_id").sort_index()
    b = b.set_index("transaction_id").sort_index()
    assert list(a.index) == list(b.index)
    for col in FEATURE_COLUMNS:
        np.testing.assert_allclose(a[col].to_numpy(float), b[col].to_numpy(float), rtol=1e-12, atol=1e-12,
                                   equal_nan=True, err_msg=col)


def test_generator_is_seeded_with_fraud_between_1_and_3_percent(transactions):
    again = generate_shard(SMALL, 0)
    pd.testing.assert_frame_equal(transactions, again)
    assert 0.01 <= transactions.is_fraud.mean() <= 0.03
    assert set(transactions.fraud_type.unique()) > {"", "burst", "card_testing"}
    assert (transactions.label_time > transactions.event_time).all()


def test_adding_future_transactions_never_changes_earlier_features(transactions):
    """The leakage test: features of rows before a cut are the same with or without later rows."""
    cut = transactions.event_time.quantile(0.6)
    full = features_frame(transactions)
    past = features_frame(transactions[transactions.event_time < cut])
    assert len(past) > 1000
    assert_same_features(past, full[full.transaction_id.isin(past.transaction_id)])
    # and the label-based feature really moved over time, from matured labels only
    assert full.merchant_matured_labels.max() > 0
    early = full[full.event_time < full.event_time.min() + pd.Timedelta(days=SMALL.label_delay_days[0])]
    assert (early.merchant_matured_labels == 0).all()


def test_online_advance_matches_batch(transactions):
    """Replaying transactions one by one through the online state machine gives the batch features."""
    ordered = transactions[invalid_reasons(transactions) == ""].sort_values(["event_time", "transaction_id"])
    cards, merchants, rows = {}, {}, []
    for txn in ordered.to_dict("records"):
        txn["ts"] = to_epoch(txn["event_time"])
        card = cards.setdefault(txn["card_id"], CardState())
        merchant = merchants.setdefault(txn["merchant_id"], MerchantState())
        # round-trip through JSON as the Redis store does
        card2, merchant2 = CardState.from_json(card.to_json()), MerchantState.from_json(merchant.to_json())
        feats = advance(card2, merchant2, txn)
        cards[txn["card_id"]], merchants[txn["merchant_id"]] = card2, merchant2
        add_label(merchant2, to_epoch(txn["label_time"]), txn["is_fraud"])
        rows.append({"transaction_id": txn["transaction_id"], **feats})
    assert_same_features(pd.DataFrame(rows), features_frame(transactions))


def test_invalid_rows_get_a_reason_and_never_enter_history(transactions):
    reasons = invalid_reasons(transactions)
    bad = transactions[reasons != ""]
    assert len(bad) == round(len(transactions) * SMALL.invalid_rate)
    assert set(reasons[reasons != ""]) <= {"amount must be > 0", "amount is not a number", "unknown currency",
                                           "lat/lon out of range"}
    feats = features_frame(transactions)
    assert len(feats) == len(transactions) - len(bad)
    assert not feats.transaction_id.isin(bad.transaction_id).any()


def test_card_features_by_hand():
    card, merchant = CardState(), MerchantState()
    base = {"card_id": 1, "merchant_id": 5, "currency": "USD", "merchant_category": "retail",
            "channel": "online", "lat": 40.0, "lon": -74.0}
    t0 = to_epoch("2026-01-05T10:00:00")
    first = advance(card, merchant, {**base, "ts": t0, "amount": 2.0, "device_id": "a"})
    assert first["card_cnt_1h"] == 0 and math.isnan(first["secs_since_last"]) and first["new_device"] == 1
    second = advance(card, merchant, {**base, "ts": t0 + 600, "amount": 3.0, "device_id": "a"})
    assert second["card_cnt_1h"] == 1 and second["card_small_cnt_1h"] == 1 and second["new_device"] == 0
    assert second["secs_since_last"] == 600 and second["merchant_cnt_24h"] == 1
    far = advance(card, merchant, {**base, "ts": t0 + 2 * 86400, "amount": 500.0, "device_id": "b",
                                   "lat": 51.5, "lon": -0.1})
    assert far["card_cnt_24h"] == 0 and far["card_cnt_7d"] == 2 and far["dist_prev_km"] > 5000
    assert far["amount_to_mean"] == pytest.approx(200.0)
