"""The pieces of riskcontrol's training and batch scoring that need no Ray: the time window pushed into
the Parquet read, how workers share the row groups, and the Arrow scorer against the pandas one."""
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from riskcontrol.config import TrainConfig
from riskcontrol.features import CATEGORICAL_FEATURES, FEATURE_COLUMNS
from riskcontrol.score import Scorer, arrow_matrix
from riskcontrol.train import (
    LABEL,
    fit_booster,
    label_counts,
    read_window,
    row_groups,
    save_model,
    split_times,
)


def _features(n: int, start: str, tz: str | None, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(rng.normal(size=(n, len(FEATURE_COLUMNS))), columns=FEATURE_COLUMNS)
    for name in CATEGORICAL_FEATURES:
        frame[name] = rng.integers(0, 4, n)
    frame["event_time"] = pd.date_range(start, periods=n, freq="min", tz=tz)
    frame[LABEL] = (frame[FEATURE_COLUMNS[0]] + rng.normal(scale=0.5, size=n) > 1.2).astype("int64")
    frame["transaction_id"] = np.arange(n)
    return frame


def _write(frame: pd.DataFrame, folder, files: int) -> str:
    folder.mkdir()
    bounds = np.linspace(0, len(frame), files + 1).astype(int)
    for i in range(files):
        part = frame.iloc[bounds[i]:bounds[i + 1]]
        pq.write_table(pa.Table.from_pandas(part, preserve_index=False), folder / f"part-{i}.parquet")
    return str(folder)


@pytest.mark.parametrize("tz", [None, "UTC", "Asia/Shanghai"])
def test_the_window_read_equals_the_pandas_slice_for_naive_and_aware_times(tmp_path, tz):
    frame = _features(600, "2026-03-01 00:00:00", tz)
    path = _write(frame, tmp_path / "f", 4)
    t1, t2 = split_times(frame["event_time"].min(), frame["event_time"].max(), TrainConfig())
    times = pd.to_datetime(frame["event_time"], utc=True)
    cols = ["transaction_id", "event_time", LABEL]
    train = read_window(row_groups(path), cols, end=t1)
    valid = read_window(row_groups(path), cols, start=t1, end=t2)
    assert sorted(train["transaction_id"]) == sorted(frame.loc[times < t1, "transaction_id"])
    assert sorted(valid["transaction_id"]) == sorted(frame.loc[(times >= t1) & (times < t2), "transaction_id"])
    assert t1.nanosecond == 0 and t2.nanosecond == 0  # the cut is in whole microseconds, as Parquet stores time


def test_workers_share_row_groups_only_when_every_share_has_training_rows(tmp_path):
    frame = _features(800, "2026-03-01", "UTC")
    mixed = _write(frame.sample(frac=1, random_state=1), tmp_path / "mixed", 4)  # every file spans the time range
    by_time = _write(frame, tmp_path / "by_time", 4)  # files in time order: the last ones hold no training rows
    cfg = TrainConfig(num_workers=2)
    assert label_counts(mixed, cfg)["by_groups"] is True
    assert label_counts(by_time, TrainConfig(num_workers=4))["by_groups"] is False
    counts = label_counts(mixed, cfg)
    assert len(counts["train_labels"]) == int((frame["event_time"] < counts["t1"]).sum())


def test_the_arrow_scorer_gives_the_pandas_scores_and_reasons(tmp_path):
    frame = _features(3000, "2026-03-01", "UTC", seed=3)
    cfg = TrainConfig(num_boost_round=30, min_data_in_leaf=5)
    params = {"objective": "binary", "metric": ["average_precision"], "verbose": -1, "num_threads": 1, "seed": 7}
    booster = fit_booster(frame.iloc[:2000], frame.iloc[2000:], params, cfg)
    model = save_model(booster, str(tmp_path / "model"), {"version": "t1"})
    batch = frame.iloc[:500].copy()
    batch.loc[batch.index[:7], FEATURE_COLUMNS[1]] = np.nan  # missing values stay missing
    for c in ("card_id", "merchant_id", "amount"):
        batch[c] = np.arange(len(batch))
    scorer = Scorer(model, high=0.5, medium=0.1)
    table = pa.Table.from_pandas(batch, preserve_index=False)
    assert np.isnan(arrow_matrix(table, FEATURE_COLUMNS)[:7, 1]).all()
    out = scorer(table)
    expected = scorer.score_frame(batch)
    assert out.num_rows == 500 and out.column_names[:5] == ["transaction_id", "event_time", "card_id",
                                                             "merchant_id", "amount"]
    np.testing.assert_allclose(out.column("probability").to_numpy(), expected["probability"])
    assert out.column("risk_tier").to_pylist() == list(expected["risk_tier"])
    assert [list(r) for r in zip(*(out.column(f"reason_{i}").to_pylist() for i in (1, 2, 3)))] == expected["reasons"]
    explained = [r for r in expected["reasons"] if r[0]]
    assert explained and len(explained) < 500  # some rows explained, the low-risk ones not
    assert set(out.column("model_version").to_pylist()) == {"t1"}
