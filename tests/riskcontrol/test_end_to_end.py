"""python -m riskcontrol on configs/local.yaml (run once per session, into an oss:// run folder on the
isolated-disk cluster) and the quality bars on its summary, read back from the object store."""

import pytest

from pipelines.io import exists, join, read_bytes, read_json, read_table
from pipelines.testing import local_run_traces, storage_run_dir


def _rows(uri: str) -> int:
    return read_table(uri, columns=["transaction_id"]).num_rows


@pytest.fixture(scope="session")
def local_run(ray_connected):
    """The end-to-end run on the local config (~200k transactions), shared by the tests below:
    (run folder URI, summary read back from it, local run folders that appeared during the run)."""
    from riskcontrol.template import TEMPLATE

    out = storage_run_dir("riskcontrol-e2e")
    before = local_run_traces()
    rc = TEMPLATE.main(["--run-dir", out])
    assert rc == 0
    summary = read_json(join(out, "summary.json"))
    return out, summary, local_run_traces() - before


def test_summary_contract(local_run):
    out, s, _ = local_run
    assert out.startswith("oss://")
    assert s["template"] == "riskcontrol" and s["step"] == "all" and s["run_dir"] == out
    assert s["steps"] == ["data", "features", "train", "evaluate", "score", "online"]
    for name in ("transactions", "features", "rejects", "model", "scores", "evaluation", "pr_curve",
                 "calibration"):
        assert s["outputs"][name].startswith(out + "/") and exists(s["outputs"][name]), name
    m = s["metrics"]
    assert 190_000 <= m["transactions"] <= 210_000
    assert m["feature_rows"] + s["rejects"] == m["transactions"]
    assert s["rejects"] > 0  # the generator corrupts a few rows; they must land in rejects, not vanish
    rejects = read_table(s["outputs"]["rejects"]).to_pylist()
    assert len(rejects) == s["rejects"] and all(r["reason"] and r["stage"] == "features" for r in rejects)


def test_outputs_are_on_the_object_store_only(local_run):
    """The Parquet outputs read back from the object store with the summary's row counts; nothing
    was written under the driver's local run folders."""
    _, s, new_local = local_run
    m = s["metrics"]
    assert _rows(s["outputs"]["transactions"]) == m["transactions"]
    assert _rows(s["outputs"]["features"]) == m["feature_rows"]
    assert _rows(s["outputs"]["scores"]) == m["scored_rows"]
    assert new_local == set(), new_local


def test_quality_bars(local_run):
    _, s, _ = local_run
    m = s["metrics"]
    assert m["auprc"] >= 0.6, m
    assert m["auprc"] >= m["auprc_rules"] + 0.2, m  # well above the rules baseline
    assert m["roc_auc"] > 0.9 and m["recall_at_1pct_fpr"] > 0.5
    assert abs(m["auprc"] - m["auprc_inprocess"]) <= 0.01, m


def test_training_was_data_parallel(local_run):
    """Two workers each held part of the rows, and the model saw all of them; it loads from the store."""
    from riskcontrol.train import load_model

    _, s, _ = local_run
    booster, meta = load_model(s["outputs"]["model"])
    assert booster.num_trees() == meta["best_iteration"]
    assert meta["num_workers"] == 2 and meta["trainer"] == "ray"
    assert meta["rows_seen"] == meta["train_rows"] == s["metrics"]["train_rows"]
    assert 0 < meta["rows_worker_0"] < meta["train_rows"]
    assert meta["alert_threshold"] == s["metrics"]["alert_threshold"]  # the evaluate step saved it


def test_every_valid_transaction_scored_once(local_run):
    _, s, _ = local_run
    ids = read_table(s["outputs"]["scores"], columns=["transaction_id"]).column(0).to_pylist()
    assert len(ids) == len(set(ids)) == s["metrics"]["scored_rows"] == s["metrics"]["feature_rows"]
    evaluation = read_json(s["outputs"]["evaluation"])
    assert {"model", "rules", "inprocess"} <= set(evaluation)


def test_report_plots(local_run):
    """Every evaluate plot is a PNG in the object store, listed in the outputs; the numbers behind
    them are in evaluation.json."""
    from riskcontrol.evaluate import PLOTS
    from riskcontrol.features import FEATURE_COLUMNS

    out, s, _ = local_run
    for name in PLOTS:
        assert s["outputs"][name] == join(out, f"{name}.png"), name
        assert read_bytes(s["outputs"][name])[:8] == b"\x89PNG\r\n\x1a\n", name
    evaluation = read_json(s["outputs"]["evaluation"])
    importance = evaluation["feature_importance"]  # share of gain, largest first
    assert set(importance) == set(FEATURE_COLUMNS) and max(importance.values()) > 0, importance
    assert list(importance.values()) == sorted(importance.values(), reverse=True), importance
    assert evaluation["score_median"]["fraud"] > 10 * evaluation["score_median"]["legit"]


def test_online_smoke(local_run):
    _, s, _ = local_run
    m = s["metrics"]
    assert m["online_requests"] == m["online_ok"] == 200 and m["online_error_rate"] == 0  # counted replies
