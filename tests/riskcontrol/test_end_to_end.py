"""python -m riskcontrol on configs/local.yaml (run once per session) and the quality bars on its summary."""
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest


@pytest.fixture(scope="session")
def local_run(ray_connected, tmp_path_factory):
    """The end-to-end run on the local config (~200k transactions), shared by the tests below."""
    from riskcontrol.template import TEMPLATE

    out = tmp_path_factory.mktemp("riskcontrol-e2e")
    rc = TEMPLATE.main(["--run-dir", str(out)])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    return out, summary


def test_summary_contract(local_run):
    out, s = local_run
    assert s["template"] == "riskcontrol" and s["step"] == "all" and s["run_dir"] == str(out)
    assert s["steps"] == ["data", "features", "train", "evaluate", "score", "online"]
    for name in ("transactions", "features", "rejects", "model", "scores", "evaluation", "pr_curve"):
        assert Path(s["outputs"][name]).exists(), name
    m = s["metrics"]
    assert 190_000 <= m["transactions"] <= 210_000
    assert m["feature_rows"] + s["rejects"] == m["transactions"]
    assert s["rejects"] > 0  # the generator corrupts a few rows; they must land in rejects, not vanish
    rejects = pq.read_table(s["outputs"]["rejects"]).to_pylist()
    assert len(rejects) == s["rejects"] and all(r["reason"] and r["stage"] == "features" for r in rejects)


def test_quality_bars(local_run):
    _, s = local_run
    m = s["metrics"]
    assert m["auprc"] >= 0.6, m
    assert m["auprc"] >= m["auprc_rules"] + 0.2, m  # well above the rules baseline
    assert m["roc_auc"] > 0.9 and m["recall_at_1pct_fpr"] > 0.5
    assert abs(m["auprc"] - m["auprc_inprocess"]) <= 0.01, m


def test_training_was_data_parallel(local_run):
    """Two workers each held part of the rows, and the model saw all of them."""
    out, s = local_run
    meta = json.loads((out / "model" / "model.json").read_text())
    assert meta["num_workers"] == 2 and meta["trainer"] == "ray"
    assert meta["rows_seen"] == meta["train_rows"] == s["metrics"]["train_rows"]
    assert 0 < meta["rows_worker_0"] < meta["train_rows"]


def test_every_valid_transaction_scored_once(local_run):
    _, s = local_run
    ids = pq.read_table(s["outputs"]["scores"], columns=["transaction_id"]).column(0).to_pylist()
    assert len(ids) == len(set(ids)) == s["metrics"]["scored_rows"] == s["metrics"]["feature_rows"]
    evaluation = json.loads(Path(s["outputs"]["evaluation"]).read_text())
    assert {"model", "rules", "inprocess"} <= set(evaluation)


def test_online_smoke(local_run):
    _, s = local_run
    m = s["metrics"]
    assert m["online_requests"] == m["online_ok"] == 200 and m["online_error_rate"] == 0  # counted replies
