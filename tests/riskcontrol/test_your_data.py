"""Your data: riskcontrol on transactions and late labels written in a user's shape (other column names,
an extra column, bad rows), mapped with ``--set input.columns.*``.

The unit tests need no Ray. ``user_run`` runs the whole template once on the session cluster (CSV on
its object store, run folder there too) and the tests below read that run: outputs, rejects naming
exactly the bad rows, the key metric, and the point-in-time guarantee on the user's late labels.
"""
import io

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from pipelines.input import InputError, conform, schema_markdown, split_table
from pipelines.io import join, read_table, write_bytes
from riskcontrol.config import DataConfig, load
from riskcontrol.data import generate_shard
from riskcontrol.features import FEATURE_COLUMNS, TRANSACTION_COLUMNS, features_frame
from riskcontrol.inputs import LABELS, TRANSACTIONS, finish, latest_labels
from riskcontrol.template import TEMPLATE

# the user's names for some of the template's columns (the rest keep the template's names)
USER_NAMES = {"transaction_id": "txn_id", "event_time": "ts", "card_id": "card", "amount": "amt",
              "is_fraud": "fraud", "label_time": "labelled_at"}
MAPPING = [f"input.columns.{ours}={theirs}" for ours, theirs in USER_NAMES.items()]
DATA = DataConfig(rows=6000, cards=120, merchants=50, days=10, shards=1, invalid_rate=0, seed=11)
BAD_AMOUNT_ID, EMPTY_CARD_ID, ORPHAN_LABEL_ID = 900_000_001, 900_000_002, 900_000_003


def user_files(data: DataConfig = DATA) -> tuple[str, str, dict]:
    """``(transactions CSV, labels CSV, facts)`` in a user's shape, made from the generator's rows:
    renamed columns, an extra ``terminal_country`` column, no labels in the transactions (they come
    late, in their own file), two bad transactions (an unparseable amount, an empty card), a label dated
    before its transaction and a label of a transaction that is not in the file."""
    frame = generate_shard(data, 0).drop(columns=["date"])
    txns = frame.drop(columns=["is_fraud", "label_time", "fraud_type"]).rename(columns=USER_NAMES)
    txns["terminal_country"] = np.where(txns.currency == "USD", "US", "XX")  # a column the template ignores
    bad = txns.iloc[[10, 20]].copy()
    bad["txn_id"] = [BAD_AMOUNT_ID, EMPTY_CARD_ID]
    bad = bad.astype({"amt": object, "card": object})
    bad.loc[bad.txn_id == BAD_AMOUNT_ID, "amt"] = "12,50 EUR"
    bad.loc[bad.txn_id == EMPTY_CARD_ID, "card"] = ""
    txns = pd.concat([txns.astype({"amt": object, "card": object}), bad], ignore_index=True)
    txns["ts"] = pd.to_datetime(txns.ts).dt.strftime("%Y-%m-%dT%H:%M:%S")  # ISO text, as exports write it

    labels = frame[["transaction_id", "is_fraud", "label_time"]].rename(columns=USER_NAMES)
    legit = frame[frame.is_fraud == 0].iloc[50]  # a label dated before its own transaction: not usable
    early = labels.txn_id == legit.transaction_id
    labels.loc[early, "labelled_at"] = legit.event_time - pd.Timedelta(hours=3)
    labels = pd.concat([labels, pd.DataFrame({"txn_id": [ORPHAN_LABEL_ID], "fraud": [1],
                                              "labelled_at": [frame.event_time.max()]})], ignore_index=True)
    labels["labelled_at"] = pd.to_datetime(labels.labelled_at).dt.strftime("%Y-%m-%d %H:%M:%S")
    return (txns.to_csv(index=False), labels.to_csv(index=False),
            {"frame": frame, "early_label_id": int(legit.transaction_id), "labels": labels})


# ---------------------------------------------------------------- no Ray
def test_schema_is_documented_and_requires_what_the_features_read():
    assert all(f.metadata and f.metadata[b"doc"] for f in (*TRANSACTIONS, *LABELS))
    required = {f.name for f in TRANSACTIONS if not f.nullable}
    assert required == set(TRANSACTION_COLUMNS)
    assert {"is_fraud", "label_time"} <= set(TRANSACTIONS.names) - required  # labels may come late
    assert {f.name for f in LABELS if not f.nullable} == {"transaction_id", "is_fraud", "label_time"}
    assert "| `card_id` | int64 | yes |" in schema_markdown(TRANSACTIONS)


def test_the_guide_shows_the_input_tables():
    from pathlib import Path

    guide = (Path(__file__).resolve().parents[2] / "docs" / "riskcontrol.md").read_text()
    assert schema_markdown(TRANSACTIONS) in guide and schema_markdown(LABELS) in guide


def test_user_rows_are_mapped_cast_and_bad_ones_get_a_reason():
    """One batch of the user's CSV through the mapping: good rows in the template's types, the two bad
    rows rejected with a reason naming the user's column, the extra column dropped."""
    txns_csv, _, facts = user_files(DataConfig(rows=400, cards=20, merchants=20, days=3, shards=1,
                                               invalid_rate=0))
    raw = pa.Table.from_pandas(pd.read_csv(io.StringIO(txns_csv), dtype=str, keep_default_na=False),
                               preserve_index=False)
    mapping = {name: USER_NAMES.get(name, name) for name in TRANSACTIONS.names}
    good, rejects = split_table(conform(raw, TRANSACTIONS, mapping, id_columns=["transaction_id"]))
    assert good.num_rows == len(facts["frame"]) and "terminal_country" not in good.column_names
    assert good.schema.field("amount").type == pa.float64() and good.schema.field("card_id").type == pa.int64()
    first = facts["frame"].iloc[0]
    row = good.slice(0, 1).to_pylist()[0]
    assert (row["transaction_id"], row["card_id"], row["amount"]) == (first.transaction_id, first.card_id,
                                                                      first.amount)
    assert pd.Timestamp(row["event_time"]) == first.event_time
    assert dict(zip(rejects["id"].to_pylist(), rejects["reason"].to_pylist())) == {
        str(BAD_AMOUNT_ID): "amount (your 'amt'): cannot read '12,50 EUR' as double",
        str(EMPTY_CARD_ID): "card_id (your 'card') is empty"}


def _joined(rows: list[dict]) -> pa.Table:
    """A batch as the full outer join of transactions (``_txn``) and labels (``_label*``) gives it."""
    base = {name: None for name in TRANSACTIONS.names}
    table = pa.Table.from_pylist([{**base, **r} for r in rows], schema=pa.schema(
        [*TRANSACTIONS, pa.field("_txn", pa.bool_()), pa.field("_label", pa.int8()),
         pa.field("_label_time", pa.timestamp("us"))]))
    return table


def test_late_labels_are_joined_only_when_usable():
    t = pd.Timestamp("2026-01-05 10:00:00")
    txn = {"event_time": t, "card_id": 1, "merchant_id": 2, "amount": 5.0, "currency": "USD",
           "merchant_category": "retail", "channel": "pos", "device_id": "d", "lat": 1.0, "lon": 2.0, "_txn": True}
    out = finish(_joined([
        {**txn, "transaction_id": 1, "_label": 1, "_label_time": t + pd.Timedelta(days=2)},   # a chargeback
        {**txn, "transaction_id": 2},                                                         # never flagged
        {**txn, "transaction_id": 3, "_label": 1, "_label_time": t - pd.Timedelta(hours=1)},  # dated too early
        {"transaction_id": 4, "_label": 0, "_label_time": t},                                 # no transaction
    ]), labelled=True, has_fraud_column=False).to_pandas()
    assert out.is_fraud.tolist() == [1, 0, 0, 0]
    assert out.label_time.tolist()[0] == t + pd.Timedelta(days=2) and out.label_time[1:].isna().all()
    assert out._orphan.tolist() == [False, False, False, True]
    assert out._label_reject[:2].isna().all()
    assert out._label_reject[2].startswith("label_time 2026-01-05 09:00:00 is before the transaction's event_time")
    assert out._label_reject[3] == "no transaction with this transaction_id in input.path"
    assert out.date.tolist()[:3] == ["2026-01-05"] * 3
    # without any label source, is_fraud stays empty (train then says so); with an is_fraud column, empty = 0
    assert finish(_joined([{**txn, "transaction_id": 5}]), False, False)["is_fraud"].to_pylist() == [None]
    assert finish(_joined([{**txn, "transaction_id": 5}]), False, True)["is_fraud"].to_pylist() == [0]


def test_a_block_joins_its_transactions_and_labels():
    """The block-wise full outer join: transactions and labels of the same ids, in one hash partition."""
    from riskcontrol.inputs import _side, join_block

    t = pd.Timestamp("2026-01-05 10:00:00")
    frame = generate_shard(DataConfig(rows=300, cards=10, merchants=20, days=5, shards=1, invalid_rate=0), 0)
    head = frame.head(3).drop(columns=["date"]).astype({"is_fraud": "Int8"})
    head.loc[2, ["is_fraud", "label_time"]] = [pd.NA, pd.NaT]  # ids[1] keeps its own label; ids[2] has none
    txns = pa.Table.from_pandas(head, preserve_index=False)
    txns = txns.select(TRANSACTIONS.names).cast(pa.schema([pa.field(f.name, f.type) for f in TRANSACTIONS]))
    ids = txns["transaction_id"].to_pylist()
    labels = pa.table({"transaction_id": [ids[0], ids[0], 99], "is_fraud": pa.array([0, 1, 1], pa.int8()),
                       "label_time": pa.array([t, t + pd.Timedelta(days=1), t], pa.timestamp("us"))})
    block = pa.concat_tables([_side(txns, labels=False), _side(labels, labels=True)])
    out = finish(join_block(block), labelled=True, has_fraud_column=False).to_pandas()
    out = out.set_index("transaction_id").sort_index()
    assert sorted(out.index) == sorted([*ids, 99])
    assert out.loc[ids[0], "is_fraud"] == 1 and out.loc[ids[0], "label_time"] == t + pd.Timedelta(days=1)
    assert out.loc[ids[1], "label_time"] == head.label_time[1] and out.loc[ids[1], "is_fraud"] == head.is_fraud[1]
    assert out.loc[ids[2], "is_fraud"] == 0 and pd.isna(out.loc[ids[2], "label_time"])
    assert out.loc[99, "_orphan"] and not out.loc[ids, "_orphan"].any()


def test_the_latest_label_of_a_transaction_counts():
    t = pd.Timestamp("2026-01-05")
    labels = pa.table({"transaction_id": [7, 7, 8], "is_fraud": pa.array([0, 1, 0], pa.int8()),
                       "label_time": pa.array([t, t + pd.Timedelta(days=3), t], pa.timestamp("us"))})
    got = latest_labels(labels).to_pylist()
    assert [(r["transaction_id"], r["_label"], r["_label_time"]) for r in got] == [
        (7, 1, (t + pd.Timedelta(days=3)).to_pydatetime()), (8, 0, t.to_pydatetime())]


def test_missing_required_column_is_one_line_before_any_cluster_work(tmp_path, capsys, monkeypatch):
    """Without the mapping for ``amt``, the run stops at the column check (no Ray started: the run folder
    is not even created) with one line naming the column and the file; the same for the labels file.
    A laptop run (no cluster address: in the full suite the session cluster's is in the environment)."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    txns_csv, labels_csv, _ = user_files(DataConfig(rows=200, cards=10, merchants=20, days=3, shards=1))
    (tmp_path / "txns.csv").write_text(txns_csv)
    (tmp_path / "labels.csv").write_text(labels_csv)
    run_dir = tmp_path / "run"
    mapping = [x for m in MAPPING if "amount" not in m for x in ("--set", m)]
    assert TEMPLATE.main(["--input", str(tmp_path / "txns.csv"), "--run-dir", str(run_dir), *mapping]) != 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "'amount'" in err and str(tmp_path / "txns.csv") in err, err
    assert "input.columns.amount" in err and not run_dir.exists()

    mapping = [x for m in MAPPING if "label_time" not in m for x in ("--set", m)]
    assert TEMPLATE.main(["--input", str(tmp_path / "txns.csv"), "--run-dir", str(run_dir), *mapping,
                          "--set", f"input.labels_path={tmp_path / 'labels.csv'}"]) != 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "input.labels_path" in err and "'label_time'" in err, err
    assert str(tmp_path / "labels.csv") in err and not run_dir.exists()


def test_labels_need_transactions_and_mysql_labels_are_refused():
    with pytest.raises(Exception, match="labels_path: give the transactions"):
        load(None, ["input.labels_path=labels.csv"])
    with pytest.raises(Exception, match="MySQL labels are not read yet"):
        load(None, ["input.path=t.csv", "input.labels_path=mysql://h:3306/db"])
    assert isinstance(InputError("x"), ValueError)


# ---------------------------------------------------------------- on the cluster
@pytest.fixture(scope="module")
def user_run(ray_connected):
    """The whole template (tiny config, in-process training) on the user's CSVs, into an oss:// run
    folder: ``(summary, facts)``."""
    from pipelines.testing import storage_run_dir

    out = storage_run_dir("riskcontrol-your-data")
    txns_csv, labels_csv, facts = user_files()
    txns = write_bytes(join(out, "upload", "my_txns.csv"), txns_csv.encode())
    labels = write_bytes(join(out, "upload", "my_labels.csv"), labels_csv.encode())
    small = [*TEMPLATE.test_overrides, "train.num_workers=0", "features.blocks=2"]
    args = ["--input", txns, "--run-dir", join(out, "run"), "--set", f"input.labels_path={labels}",
            *[x for item in [*MAPPING, *small] for x in ("--set", item)]]
    assert TEMPLATE.main(args) == 0
    from pipelines.io import read_json

    return read_json(join(out, "run", "summary.json")), {**facts, "txns": txns, "labels_uri": labels}


def test_ray_user_data_outputs_and_rejects(user_run):
    s, facts = user_run
    frame = facts["frame"]
    assert s["steps"] == ["data", "features", "train", "evaluate", "score"]
    assert s["outputs"]["transactions_source"] == facts["txns"]
    assert s["outputs"]["labels_source"] == facts["labels_uri"]
    for name in ("transactions", "transactions_rejects", "labels_rejects", "features", "rejects", "model",
                 "evaluation", "scores"):
        assert name in s["outputs"], name
    m = s["metrics"]
    assert m["transactions"] == m["feature_rows"] == m["scored_rows"] == len(frame)
    # the rejects name exactly the bad rows, with reasons naming the user's columns
    bad = read_table(s["outputs"]["transactions_rejects"]).to_pylist()
    assert {r["id"]: r["reason"] for r in bad} == {
        str(BAD_AMOUNT_ID): "amount (your 'amt'): cannot read '12,50 EUR' as double",
        str(EMPTY_CARD_ID): "card_id (your 'card') is empty"}
    labels = {r["id"]: r["reason"] for r in read_table(s["outputs"]["labels_rejects"]).to_pylist()}
    assert set(labels) == {str(ORPHAN_LABEL_ID), str(facts["early_label_id"])}
    assert labels[str(ORPHAN_LABEL_ID)] == "no transaction with this transaction_id in input.path"
    assert "is before the transaction's event_time" in labels[str(facts["early_label_id"])]
    assert read_table(s["outputs"]["rejects"]).num_rows == 0  # every mapped row was valid for the features
    assert s["rejects"] == 4 and m["transactions_rejects"] == 2 and m["labels_rejects"] == 2
    # the template's shape: the generator's columns (the extra one dropped), the labels from the late file
    got = read_table(s["outputs"]["transactions"]).to_pandas().sort_values("transaction_id", ignore_index=True)
    assert set(TRANSACTIONS.names) <= set(got.columns) and "terminal_country" not in got.columns
    want = frame.sort_values("transaction_id", ignore_index=True)
    assert got.transaction_id.tolist() == want.transaction_id.tolist()
    assert got.is_fraud.tolist() == want.is_fraud.tolist() and m["fraud_labels"] == int(want.is_fraud.sum())
    np.testing.assert_allclose(got.amount, want.amount)
    used = got.transaction_id != facts["early_label_id"]
    assert (pd.to_datetime(got.label_time[used]) == want.label_time[used]).all()
    assert got.label_time[~used].isna().all()


def test_ray_user_data_model_key_metric(user_run):
    """The model learned the user's fraud: AUPRC is computed on the test slice, far above the rate of
    fraud (what a random score gets) and above the rules baseline."""
    s, facts = user_run
    m = s["metrics"]
    assert TEMPLATE.key_metric == "auprc" and 0 < m["auprc"] <= 1
    assert m["auprc"] > 5 * facts["frame"].is_fraud.mean(), m
    assert m["auprc"] >= m["auprc_rules"] + 0.2 and m["roc_auc"] > 0.9, m  # well above the rules baseline


def _matured_labels_by_brute_force(txns: pd.DataFrame, labels: pd.DataFrame, early_id: int) -> pd.Series:
    """For each transaction: labels of its merchant's earlier transactions (by event_time, then id)
    known by its event_time, counted from the user's raw label file; a label dated before its own
    transaction is never used (documented)."""
    lab = labels[labels.txn_id != early_id].rename(columns={"txn_id": "transaction_id"})
    lab = lab.assign(known=pd.to_datetime(lab.labelled_at))[["transaction_id", "known"]]
    t = txns[["transaction_id", "merchant_id", "event_time"]].merge(lab, on="transaction_id", how="left")
    out = {}
    for _, g in t.sort_values(["merchant_id", "event_time", "transaction_id"]).groupby("merchant_id"):
        known = g.known.to_numpy()
        times = g.event_time.to_numpy()
        for i, tid in enumerate(g.transaction_id):
            earlier = known[:i]
            out[tid] = int(np.sum(~pd.isna(earlier) & (earlier <= times[i])))
    return pd.Series(out)


def test_ray_point_in_time_on_user_data(user_run):
    """The leakage test on the user's data: features computed on the cluster equal the plain ones; the
    rows before a cut get the same features without the later rows; and the merchant label feature
    counts exactly the user's late labels known at each transaction's time."""
    s, facts = user_run
    feats = read_table(s["outputs"]["features"]).to_pandas().sort_values("transaction_id", ignore_index=True)
    txns = read_table(s["outputs"]["transactions"]).to_pandas().drop(columns=["date"], errors="ignore")
    plain = features_frame(txns)
    assert plain.transaction_id.tolist() == feats.transaction_id.tolist()
    for col in FEATURE_COLUMNS:
        np.testing.assert_allclose(feats[col].to_numpy(float), plain[col].to_numpy(float), rtol=1e-9,
                                   equal_nan=True, err_msg=col)
    cut = txns.event_time.quantile(0.6)
    past = features_frame(txns[txns.event_time < cut])
    assert len(past) > 1000
    same = plain[plain.transaction_id.isin(past.transaction_id)].reset_index(drop=True)
    for col in FEATURE_COLUMNS:
        np.testing.assert_allclose(past[col].to_numpy(float), same[col].to_numpy(float), rtol=1e-12,
                                   equal_nan=True, err_msg=col)
    expected = _matured_labels_by_brute_force(txns, facts["labels"], facts["early_label_id"])
    got = feats.set_index("transaction_id").merchant_matured_labels
    assert got.max() > 0
    assert got.astype(int).to_dict() == expected.loc[got.index].to_dict()


def test_a_label_without_its_time_is_never_a_known_label():
    """An empty label_time (a label whose time is unknown) must not count as matured (it once read as
    the earliest possible time: known before every transaction)."""
    frame = generate_shard(DataConfig(rows=1500, cards=30, merchants=20, days=6, shards=1, invalid_rate=0), 0)
    frame = frame.assign(label_time=frame.label_time.where(frame.index % 3 != 0))
    got = features_frame(frame).set_index("transaction_id").merchant_matured_labels
    known = frame.dropna(subset=["label_time"])
    labels = pd.DataFrame({"txn_id": known.transaction_id, "labelled_at": known.label_time})
    assert got.max() > 0
    assert got.to_dict() == _matured_labels_by_brute_force(frame, labels, early_id=-1).loc[got.index].to_dict()


def test_without_labels_training_says_what_to_give(tmp_path):
    from pipelines.io import write_table
    from riskcontrol.config import RiskConfig
    from riskcontrol.train import run_training

    frame = generate_shard(DataConfig(rows=600, cards=20, merchants=20, days=5, shards=1), 0)
    feats = features_frame(frame.assign(is_fraud=pd.array([pd.NA] * len(frame), "Int8"), label_time=pd.NaT))
    write_table(pa.Table.from_pandas(feats, preserve_index=False), str(tmp_path / "features"))
    with pytest.raises(ValueError, match=r"have no labels: give is_fraud .* or input\.labels_path"):
        run_training(RiskConfig(), str(tmp_path / "features"), str(tmp_path), num_workers=0)


def test_ray_data_step_on_parquet_with_labels_but_no_label_times(adbray_run_dir):
    """Only the data step, on a Parquet folder whose labels have no time (is_fraud, renamed): the labels
    are kept for training (empty = 0), and never feed the merchant fraud rate (no label_time)."""
    from pipelines.io import write_table

    frame = generate_shard(DataConfig(rows=1500, cards=30, merchants=20, days=6, shards=1, invalid_rate=0), 0)
    user = frame.drop(columns=["date", "label_time", "fraud_type"]).rename(columns={"is_fraud": "chargeback"})
    user["chargeback"] = user.chargeback.astype("Int8").where(user.index % 7 != 0)  # some unknown
    folder = join(adbray_run_dir, "upload", "txns")
    write_table(pa.Table.from_pandas(user, preserve_index=False), folder)
    assert TEMPLATE.main(["data", "--input", folder, "--run-dir", join(adbray_run_dir, "run"),
                          "--set", "input.columns.is_fraud=chargeback"]) == 0
    got = read_table(join(adbray_run_dir, "run", "transactions")).to_pandas().sort_values("transaction_id")
    assert len(got) == len(frame) and got.label_time.isna().all()
    assert got.is_fraud.tolist() == user.chargeback.fillna(0).astype(int).tolist()
    assert (features_frame(got.drop(columns=["date"])).merchant_matured_labels == 0).all()
