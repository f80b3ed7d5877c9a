"""Batch scoring on the shared cluster: rejects, reason codes, idempotent Parquet and MySQL writes."""
import pytest

from pipelines.io import join, read_table
from pipelines.testing import storage_run_dir
from riskcontrol.config import FeatureConfig, RiskInputConfig, ScoreConfig
from riskcontrol.data import read_transactions
from riskcontrol.features import FEATURE_COLUMNS, build_features
from riskcontrol.score import run_score

from .riskcontrol_helpers import small_model

SMALL = {"rows": 8000, "cards": 150, "merchants": 60, "days": 12, "invalid_rate": 0.002}


def sql(url: str, statement: str):
    """Run one statement and commit; the first row of its result (or None)."""
    from pipelines.io import mysql_connect

    conn = mysql_connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute(statement)
            row = cur.fetchone()
        conn.commit()
        return row
    finally:
        conn.close()


@pytest.fixture(scope="module")
def small_run(ray_connected):
    """Small transactions (Parquet) and an in-process model trained on their features, on the object store."""
    out = storage_run_dir("riskcontrol-score")
    frame, feats = small_model(out, **SMALL)
    return out, frame, feats


def test_ray_features_equal_plain_features(small_run):
    """The Ray Data path (hash partitions by card, then merchant) computes exactly the plain features."""
    out, frame, feats = small_run
    ds, rejects = build_features(read_transactions(join(out, "transactions")), blocks=3)
    got = ds.to_pandas().sort_values("transaction_id", ignore_index=True)
    assert list(got.transaction_id) == list(feats.transaction_id)
    for col in FEATURE_COLUMNS:
        assert got[col].fillna(-1).tolist() == pytest.approx(feats[col].fillna(-1).tolist(), rel=1e-12), col
    assert rejects.count() == len(frame) - len(feats) > 0


def test_score_twice_one_row_per_id_with_reasons(small_run, mysql_url):
    out, frame, feats = small_run
    table = "riskcontrol_test_scores"
    sql(mysql_url, f"DROP TABLE IF EXISTS `{table}`")
    cfg = ScoreConfig(batch_size=1000, max_actors=2, output_mysql_url=mysql_url, output_table=table)
    for _ in range(2):
        res = run_score(read_transactions(join(out, "transactions")), join(out, "model"), cfg, join(out, "run"),
                        FeatureConfig(blocks=2))
    assert res["rows"] == len(feats) and res["rejects"] == len(frame) - len(feats)
    scores = read_table(join(out, "run", "scores")).to_pandas()
    assert len(scores) == scores.transaction_id.nunique() == len(feats)
    assert scores.probability.between(0, 1).all()
    assert set(scores.risk_tier) <= {"low", "medium", "high"} and (scores.risk_tier == "high").any()
    flagged = scores[scores.risk_tier != "low"]
    assert flagged.reason_1.isin(FEATURE_COLUMNS).all() and (flagged.reason_1 != flagged.reason_2).all()
    assert (scores[scores.risk_tier == "low"].reason_1 == "").all()
    # fraud rows get higher scores than the rest
    merged = scores.merge(frame[["transaction_id", "is_fraud"]], on="transaction_id")
    assert merged[merged.is_fraud == 1].probability.mean() > 5 * merged[merged.is_fraud == 0].probability.mean()
    rejects = read_table(join(out, "run", "rejects")).to_pandas()
    assert len(rejects) == res["rejects"] and rejects.reason.str.len().gt(0).all()
    total, distinct = sql(mysql_url, f"SELECT COUNT(*), COUNT(DISTINCT transaction_id) FROM `{table}`")
    sql(mysql_url, f"DROP TABLE `{table}`")
    assert total == distinct == len(feats)


def test_score_reads_transactions_from_mysql(small_run, mysql_url):
    out, frame, _ = small_run
    import pyarrow as pa

    from pipelines.io import upsert_mysql
    from riskcontrol.features import invalid_reasons
    from riskcontrol.score import input_dataset

    table = "riskcontrol_test_transactions"
    sql(mysql_url, f"DROP TABLE IF EXISTS `{table}`")
    subset = frame.drop(columns=["date"]).head(3000)
    upsert_mysql(mysql_url, table, pa.Table.from_pandas(subset, preserve_index=False), ["transaction_id"])
    good, unreadable = input_dataset(RiskInputConfig(path=mysql_url, table=table))
    cfg = ScoreConfig(batch_size=1000)
    res = run_score(good, join(out, "model"), cfg, join(out, "run_mysql"), FeatureConfig(blocks=2),
                    input_rejects=unreadable)
    assert res["rows"] + res["rejects"] == 3000 and res["rejects"] > 0
    rejected = read_table(join(out, "run_mysql", "rejects"), columns=["id"]).column(0).to_pylist()
    invalid = subset.transaction_id[invalid_reasons(subset) != ""].astype(str)
    assert sorted(rejected) == sorted(invalid)  # read (a NULL amount) or feature checks: the same rows
    ids = read_table(join(out, "run_mysql", "scores"), columns=["transaction_id"]).column(0).to_pylist()
    assert len(ids) == len(set(ids)) == res["rows"]
    sql(mysql_url, f"DROP TABLE `{table}`")


def test_generator_writes_mysql_idempotently(mysql_url, adbray_run_dir):
    from riskcontrol.config import DataConfig
    from riskcontrol.data import write_transactions

    table = "riskcontrol_test_generated"
    cfg = DataConfig(rows=4000, cards=40, merchants=20, days=5, shards=2, invalid_rate=0.01,
                     mysql_url=mysql_url, mysql_table=table)
    sql(mysql_url, f"DROP TABLE IF EXISTS `{table}`")
    for _ in range(2):
        outputs, rows = write_transactions(cfg, adbray_run_dir)
    total, distinct, null_amounts = sql(
        mysql_url, f"SELECT COUNT(*), COUNT(DISTINCT transaction_id), SUM(amount IS NULL) FROM `{table}`")
    sql(mysql_url, f"DROP TABLE `{table}`")
    assert total == distinct == rows and outputs["transactions"].endswith(f"#{table}")
    assert null_amounts > 0  # NaN amounts arrive as NULL (and are rejected when scored)
