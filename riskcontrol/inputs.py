"""Your data: the transactions (and late labels) riskcontrol reads instead of generating its own.

``input.path`` (``--input``) points at the user's transactions (Parquet or CSV file/folder,
``oss://`` prefix, or ``mysql://host:port/db`` + ``input.table``); ``input.columns`` maps their
names onto :data:`TRANSACTIONS`. Late labels (chargebacks, confirmed reviews) may come separately
in ``input.labels_path`` (:data:`LABELS`): each label is joined to its transaction by
``transaction_id`` and, like the generator's labels, is only used by the features once its
``label_time`` has passed (``features.merchant_feature_block``).

The data step (:func:`ingest_transactions`) writes them, validated, as the run's ``transactions``
output in the generator's shape (date-partitioned Parquet), with bad rows in
``transactions_rejects`` and bad labels in ``labels_rejects`` (id, stage, reason); every later step
runs unchanged on them.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.config import redact
from pipelines.input import column, read_input, source_columns, split_rejects
from pipelines.io import REJECT_SCHEMA, reject_ratio_failure, write_dataset
from pipelines.shuffle import partition_by
from pipelines.template import Run, StepResult

from .vocab import CATEGORIES, CHANNELS, CURRENCIES

TIME = pa.timestamp("us")  # naive timestamps are UTC; text with an offset is converted to UTC

TRANSACTIONS = pa.schema([
    column("transaction_id", pa.int64(), "unique id of the transaction (integer; scores and labels join on it)"),
    column("event_time", TIME, "when the transaction happened (ISO 8601 text, a timestamp, or epoch seconds; "
                               "naive = UTC): orders each card's history and the time split"),
    column("card_id", pa.int64(), "the card (integer, e.g. a hash of the card number): velocity, spend and "
                                  "device features over the card's own past"),
    column("merchant_id", pa.int64(), "the merchant (integer): 24 h merchant volume and its fraud rate from "
                                      "matured labels"),
    column("amount", pa.float64(), "amount in the transaction's currency (> 0; others go to rejects): amount "
                                   "features, spend sums"),
    column("currency", pa.string(), f"ISO code, one of {', '.join(CURRENCIES)} "
                                    "(others go to rejects)"),
    column("merchant_category", pa.string(), f"one of {', '.join(CATEGORIES)}; others share one "
                                             "'other' code"),
    column("channel", pa.string(), f"{', '.join(CHANNELS)} (others go to rejects)"),
    column("device_id", pa.string(), "terminal or device the card was used on: new-device and distinct-device "
                                     "features"),
    column("lat", pa.float64(), "latitude of the merchant or the online IP, degrees: distance and speed "
                                "from the card's previous transaction"),
    column("lon", pa.float64(), "longitude, degrees"),
    column("is_fraud", pa.int8(), "the label, 1 fraud / 0 legit (or give input.labels_path); empty: not known "
                                  "to be fraud (0)", required=False),
    column("label_time", TIME, "when the label became known (a chargeback's date); without it a label trains "
                               "the model but never feeds the merchant fraud rate", required=False),
    column("fraud_type", pa.string(), "kind of fraud when known (reported, not a feature)", required=False),
])

LABELS = pa.schema([
    column("transaction_id", pa.int64(), "the labelled transaction (joins to transactions.transaction_id)"),
    column("is_fraud", pa.int8(), "1 fraud, 0 legit (a cleared review)"),
    column("label_time", TIME, "when the label became known: the features use it only from then on"),
])

OUTPUT = pa.schema([pa.field(f.name, f.type) for f in TRANSACTIONS])  # the run's transactions (as generated)
SIDES = pa.schema([*OUTPUT, pa.field("_txn", pa.bool_()), pa.field("_label", pa.int8()),
                   pa.field("_label_time", TIME)])  # the union of transactions and labels before the join


def finish(table: pa.Table, labelled: bool, has_fraud_column: bool) -> pa.Table:
    """One batch of (joined) transactions in the generator's shape plus ``_orphan`` (a label row
    with no transaction) and ``_label_reject`` (why a label was not used).

    With late labels (``labelled``): a transaction's label and label time come from its label
    row; a label dated before its transaction is not used (and rejected with a reason); a label
    whose transaction is not in the input is rejected. ``is_fraud`` empty = 0 (nobody flagged it)
    when the input has labels at all, else it stays empty (no labels: scoring only).
    """
    n = table.num_rows
    problem = np.full(n, None, dtype=object)
    orphan = np.zeros(n, bool)
    if labelled:
        known = table["_txn"].is_valid().to_numpy(zero_copy_only=False)
        label, label_time = table["_label"], pc.cast(table["_label_time"], TIME)
        has_label = label.is_valid().to_numpy(zero_copy_only=False)
        event = pc.cast(table["event_time"], TIME)
        early = np.asarray(pc.fill_null(pc.less(label_time, event), False).to_numpy(zero_copy_only=False))
        orphan = has_label & ~known
        problem[orphan] = "no transaction with this transaction_id in input.path"
        for i in np.flatnonzero(has_label & known & early):
            problem[i] = (f"label_time {label_time[i].as_py()} is before the transaction's event_time "
                          f"{event[i].as_py()} (label not used)")
        use = pa.array(has_label & known & ~early)
        table = _set(table, "is_fraud", pc.if_else(use, pc.cast(label, pa.int8()),
                                                   pc.cast(table["is_fraud"], pa.int8())))
        table = _set(table, "label_time", pc.if_else(use, label_time, pc.cast(table["label_time"], TIME)))
    if labelled or has_fraud_column:
        table = _set(table, "is_fraud", pc.fill_null(pc.cast(table["is_fraud"], pa.int8()),
                                                     pa.scalar(0, pa.int8())))
    out = table.select(TRANSACTIONS.names).cast(OUTPUT)
    dates = pc.fill_null(pc.strftime(out["event_time"], format="%Y-%m-%d"), "unknown")
    return (out.append_column("date", dates).append_column("_orphan", pa.array(orphan))
            .append_column("_label_reject", pa.array(problem, pa.string())))


def _set(table: pa.Table, name: str, values) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), name, values)


def ingest_transactions(cfg, run: Run, blocks: int = 8) -> StepResult:
    """The data step on the user's data: ``input.path`` (+ ``input.labels_path``) validated and mapped
    into the run's ``transactions`` (the generator's columns, date-partitioned), bad rows into
    ``transactions_rejects`` and bad labels into ``labels_rejects``."""
    from .data import _ByDate

    inp = cfg.input
    names, _ = source_columns(inp.path, inp.format, inp.table)
    txn, txn_rejects = split_rejects(read_input(inp, TRANSACTIONS, id_columns=["transaction_id"]),
                                     stage="input transactions")
    labelled = bool(inp.labels_path)
    outputs = {"transactions_source": redact(inp.path)}
    if labelled:
        labels, label_rejects = split_rejects(read_input(labels_config(inp), LABELS, path=inp.labels_path,
                                                         id_columns=["transaction_id"]), stage="input labels")
        outputs["labels_source"] = redact(inp.labels_path)
        # a hash join by hand (Ray Data's join needs polars): both sides in one Dataset, hash-partitioned
        # by transaction_id so that a block holds every row of its transactions, joined block by block
        both = txn.map_batches(_side, batch_format="pyarrow", fn_kwargs={"labels": False}).union(
            labels.map_batches(_side, batch_format="pyarrow", fn_kwargs={"labels": True}))
        txn = partition_by(both, ["transaction_id"], blocks).map_batches(
            join_block, batch_format="pyarrow", batch_size=None)
    has_fraud = inp.columns.get("is_fraud", "is_fraud") in names
    done = txn.map_batches(finish, batch_format="pyarrow",
                           fn_kwargs={"labelled": labelled, "has_fraud_column": has_fraud}).materialize()
    kept = done.map_batches(_transactions_only, batch_format="pyarrow").materialize()
    outputs["transactions"] = write_dataset(_ByDate(kept), run.path("transactions"))
    outputs["transactions_rejects"] = write_dataset(txn_rejects, run.path("transactions_rejects"))
    rows, rejected = kept.count(), txn_rejects.count()
    frauds = kept.map_batches(_fraud_count, batch_format="pyarrow").take_all()
    metrics = {"transactions": rows, "transactions_rejects": rejected,
               "fraud_labels": sum(int(r["frauds"]) for r in frauds)}
    failure = reject_ratio_failure(rejected, rows + rejected, inp.max_reject_ratio, "transactions rows",
                                   "input.max_reject_ratio", run.path("transactions_rejects"))
    total_rejects = rejected
    if labelled:
        bad = label_rejects.union(done.map_batches(_label_problems, batch_format="pyarrow")).materialize()
        outputs["labels_rejects"] = write_dataset(bad, run.path("labels_rejects"))
        n_labels, n_bad = labels.count(), bad.count()
        metrics.update(labels=n_labels, labels_rejects=n_bad)
        total_rejects += n_bad
        failure = failure or reject_ratio_failure(n_bad, n_labels + label_rejects.count(), inp.max_reject_ratio,
                                                  "labels", "input.max_reject_ratio", run.path("labels_rejects"))
    return StepResult(outputs, metrics, rows=rows, rejects=total_rejects, failure=failure)


def labels_config(inp):
    """The input section as it applies to ``input.labels_path`` (its format is inferred from its path)."""
    return inp.model_copy(update={"format": None if inp.format == "mysql" else inp.format})


def _side(table: pa.Table, labels: bool) -> pa.Table:
    """A batch of transactions (``_txn`` true) or of labels (``_label``, ``_label_time``) in :data:`SIDES`."""
    n = table.num_rows
    if labels:
        cols = {"transaction_id": table["transaction_id"], "_label": table["is_fraud"],
                "_label_time": table["label_time"]}
    else:
        cols = {**{name: table[name] for name in OUTPUT.names}, "_txn": pa.array(np.ones(n, bool))}
    return pa.table([cols[f.name] if f.name in cols else pa.nulls(n, f.type) for f in SIDES], schema=SIDES)


def join_block(table: pa.Table) -> pa.Table:
    """The transactions of a block with their (latest) label: a full outer join on transaction_id, so that
    a label without its transaction is kept (and rejected by :func:`finish`)."""
    is_txn = pc.is_valid(table["_txn"])
    txns = table.filter(is_txn).drop_columns(["_label", "_label_time"])
    labels = table.filter(pc.invert(is_txn)).select(["transaction_id", "_label", "_label_time"])
    keyed = latest_labels(labels.rename_columns(["transaction_id", "is_fraud", "label_time"]))
    joined = txns.join(keyed, "transaction_id", join_type="full outer")
    return joined.select(SIDES.names).cast(SIDES)


def latest_labels(table: pa.Table) -> pa.Table:
    """One label per transaction, keyed for the join: the latest (a review, then a chargeback: the
    chargeback counts, from its own time). A block holds every label of its transactions."""
    df = table.select(["transaction_id", "is_fraud", "label_time"]).to_pandas()
    df = df.sort_values(["transaction_id", "label_time"], kind="mergesort").drop_duplicates(
        "transaction_id", keep="last")
    return pa.table({"transaction_id": pa.array(df.transaction_id, pa.int64()),
                     "_label": pa.array(df.is_fraud, pa.int8()),
                     "_label_time": pa.array(df.label_time, TIME)})


def _transactions_only(table: pa.Table) -> pa.Table:
    return table.filter(pc.invert(table["_orphan"])).drop_columns(["_orphan", "_label_reject"])


def _fraud_count(table: pa.Table) -> pa.Table:
    return pa.table({"frauds": [pc.sum(table["is_fraud"]).as_py() or 0]})


def _label_problems(table: pa.Table) -> pa.Table:
    bad = table.filter(pc.is_valid(table["_label_reject"]))
    ids = pc.cast(bad["transaction_id"], pa.string())
    return pa.table({"id": ids, "stage": pa.array(["input labels"] * bad.num_rows, pa.string()),
                     "reason": bad["_label_reject"]}, schema=REJECT_SCHEMA)
