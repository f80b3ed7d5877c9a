"""Bring your own data: the user's interactions (and optional item side input) in the template's shape.

With ``input.path`` set, the data step does not generate: it ingests the interactions
(:data:`INTERACTIONS`, mapped with ``input.columns``, bad rows to ``interactions_rejects`` with a
reason) and the optional item side input ``input.items_path`` (:data:`ITEMS`, to ``catalog``),
then writes the tables the later steps read, as the generator would:

- ``users`` / ``items``: dense ids 0..n-1 with the user's id in ``key`` (items: category index and
  name, price, title, description; an item without side features gets category "(none)", no price,
  no text: the models then use its id embedding and its popularity);
- ``impressions`` (one row per interaction: ``clicked`` = the click value, else
  ``rating >= input.positive_rating``, else true), ``clicks`` (the positives), ``queries`` (empty);
- ``dataset.json`` (:class:`recsys.common.DataShape`): counts and a global time split. The
  latest ``input.test_fraction`` of interactions (by timestamp) is the evaluation slice, the
  ``input.ranker_fraction`` before it labels the ranker's lists, the retriever trains on the rest.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.config import redact
from pipelines.input import InputError, column, ingest
from pipelines.io import read_table, write_json, write_table
from pipelines.template import Run, StepResult

from . import config as C
from .common import SHAPE_FILE, DataShape

INTERACTIONS = pa.schema([
    column("user_id", pa.string(), "who: any id (text or number); a user needs no other features"),
    column("item_id", pa.string(), "what: any id (text or number); matched to `item_id` of the item side input"),
    column("timestamp", pa.timestamp("us"), "when: seconds since the epoch (UTC) or ISO 8601 text; the time split "
                                            "(the latest `input.test_fraction` of interactions is evaluated)"),
    column("rating", pa.float64(), "explicit feedback (e.g. 1-5 stars): `rating >= input.positive_rating` "
                                   "(default 4) is a positive, lower ratings are shown-but-not-liked", required=False),
    column("click", pa.bool_(), "implicit feedback (true/false, 1/0, yes/no); wins over `rating`; "
                                "a row with neither is a positive", required=False),
    column("position", pa.int32(), "slot the item was shown in (0 = top; default 0): kept on the impressions, "
                                   "not a ranker feature (serving has no slot)", required=False),
])

ITEMS = pa.schema([
    column("item_id", pa.string(), "the item, as in the interactions"),
    column("title", pa.string(), "short text: its words feed the retriever's item tower and `/search`",
           required=False),
    column("text", pa.string(), "longer description (the item's words when it has no title)", required=False),
    column("category", pa.string(), "one label (of a pipe-separated list such as MovieLens genres, the first): "
                                    "a ranker field, the user's category shares, the category filter",
           required=False),
    column("price", pa.float64(), "a ranker feature and the `max_price` filter (an item without one never "
                                  "passes that filter)", required=False),
])

NO_CATEGORY = "(none)"
QUERIES_SCHEMA = pa.schema([("query_id", pa.int64()), ("user_id", pa.int64()), ("ts", pa.int64()),
                            ("query", pa.string()), ("item_id", pa.int64())])


def positives(t: pa.Table, positive_rating: float) -> np.ndarray:
    """Implicit feedback per row: the click value, else ``rating >= positive_rating``, else true."""
    n = t.num_rows
    out = np.ones(n, dtype=bool)
    if "rating" in t.column_names:
        rating = t.column("rating").to_numpy(zero_copy_only=False).astype(np.float64)
        known = ~np.isnan(rating)
        out[known] = rating[known] >= positive_rating
    if "click" in t.column_names:
        click = t.column("click").combine_chunks()
        known = click.is_valid().to_numpy(zero_copy_only=False)
        out[known] = np.asarray(click.fill_null(False).to_numpy(zero_copy_only=False), dtype=bool)[known]
    return out


def _catalog_frame(catalog: pa.Table | None) -> pd.DataFrame:
    cols = ["item_id", "title", "text", "category", "price"]
    if catalog is None:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in cols})
    df = catalog.to_pandas()
    for c in cols:
        if c not in df:
            df[c] = None
    return df.drop_duplicates("item_id", keep="first").set_index("item_id")


def _text(values: pd.Series) -> pd.Series:
    return values.astype("string").str.strip().replace("", pd.NA)


def build_tables(inter: pa.Table, catalog: pa.Table | None, inp: C.RecsysInputConfig,
                 source: str = "input") -> tuple[dict[str, pa.Table], DataShape]:
    """The template's tables (``users``, ``items``, ``impressions``, ``clicks``, ``queries``) and the
    data's shape from validated interactions (and item side input); InputError (one line) when the
    data cannot be split in time into train / ranker / test slices that each hold a positive."""
    if inter.num_rows == 0:
        raise InputError(f"input {source}: no valid interactions")
    user_keys = pc.unique(inter.column("user_id")).sort()
    cat = _catalog_frame(catalog)
    item_keys = pc.unique(pa.chunked_array([inter.column("item_id").combine_chunks(),
                                            pa.array(cat.index.astype(str), pa.string())])).sort()
    user = pc.index_in(inter.column("user_id"), value_set=user_keys).to_numpy().astype(np.int64)
    item = pc.index_in(inter.column("item_id"), value_set=item_keys).to_numpy().astype(np.int64)

    side = cat.reindex(item_keys.to_pylist())
    label = _text(side["category"]).str.split("|").str[0].str.strip().replace("", pd.NA)
    names = sorted(label.dropna().unique().tolist())
    if label.isna().any() or not names:
        names.append(NO_CATEGORY)
    category = pd.Categorical(label.fillna(NO_CATEGORY), categories=names).codes.astype(np.int32)
    title, text = _text(side["title"]), _text(side["text"])
    price = pd.to_numeric(side["price"], errors="coerce").astype(np.float64).to_numpy()
    items = pa.table({"item_id": np.arange(len(item_keys), dtype=np.int64), "key": item_keys,
                      "category": category, "category_name": pa.array([names[c] for c in category], pa.string()),
                      "price": price,
                      "title": pa.array(title.fillna(text).fillna("").tolist(), pa.string()),
                      "description": pa.array(text.fillna(title).fillna("").tolist(), pa.string())})
    users = pa.table({"user_id": np.arange(len(user_keys), dtype=np.int64), "key": user_keys})

    micros = pc.cast(inter.column("timestamp"), pa.int64()).to_numpy()
    seconds = micros // 1_000_000
    t0 = int(seconds.min())
    ts = seconds - t0
    clicked = positives(inter, inp.positive_rating)
    position = (inter.column("position").to_numpy(zero_copy_only=False) if "position" in inter.column_names
                else np.zeros(inter.num_rows))
    position = np.nan_to_num(np.asarray(position, dtype=np.float64), nan=0.0).astype(np.int32)
    order = np.argsort(ts, kind="stable")
    impressions = pa.table({"impression_id": np.arange(inter.num_rows, dtype=np.int64),
                            "user_id": user[order], "item_id": item[order], "position": position[order],
                            "ts": ts[order].astype(np.int64), "clicked": clicked[order]})
    t1, t2, end = time_split(ts, inp.test_fraction, inp.ranker_fraction)
    for lo, hi, what in ((0, t1, "train (retriever)"), (t1, t2, "ranker"), (t2, end, "test")):
        if not (clicked & (ts >= lo) & (ts < hi)).any():
            raise InputError(f"input {source}: no positive interaction in the {what} slice of the time split "
                             f"(input.test_fraction={inp.test_fraction}, input.ranker_fraction="
                             f"{inp.ranker_fraction}, input.positive_rating={inp.positive_rating})")
    shape = DataShape(num_users=len(user_keys), num_items=len(item_keys), num_categories=len(names),
                      t1=t1, t2=t2, end=end, source=source, t0=t0, exclude_seen=inp.exclude_seen)
    tables = {"users": users, "items": items, "impressions": impressions,
              "clicks": impressions.filter(pa.array(impressions.column("clicked").to_numpy(zero_copy_only=False))),
              "queries": QUERIES_SCHEMA.empty_table()}
    return tables, shape


def time_split(ts: np.ndarray, test_fraction: float, ranker_fraction: float) -> tuple[int, int, int]:
    """Global time cuts ``(t1, t2, end)``: about ``test_fraction`` of the interactions at or after t2,
    ``ranker_fraction`` in [t1, t2), the rest before t1; InputError when the timestamps cannot be cut so."""
    end = int(ts.max()) + 1
    t2 = int(np.quantile(ts, 1 - test_fraction, method="higher"))
    t1 = int(np.quantile(ts, 1 - test_fraction - ranker_fraction, method="higher"))
    if not 0 < t1 < t2 < end:
        raise InputError(f"input: the timestamps cannot be split in time (train < {t1} <= ranker < {t2} <= test): "
                         f"too few distinct times ({len(np.unique(ts))})")
    return t1, t2, end


def run(cfg: C.RecsysConfig, run: Run) -> StepResult:
    """Ingest ``input.path`` (+ ``input.items_path``) and write the template's tables from them."""
    inp = cfg.input
    results = [ingest(inp, INTERACTIONS, run, "interactions", id_columns=("user_id", "item_id", "timestamp"))]
    if inp.items_path:
        results.append(ingest(inp, ITEMS, run, "catalog", path=inp.items_path, id_columns=("item_id",)))
    outputs, metrics = {}, {}
    for r in results:
        outputs.update(r.outputs)
        metrics.update(r.metrics)
    rows, rejects = sum(r.rows for r in results), sum(r.rejects for r in results)
    failure = next((r.failure for r in results if r.failure), None)
    if failure:
        return StepResult(outputs, metrics, rows=rows, rejects=rejects, failure=failure)
    catalog = read_table(run.path("catalog")) if inp.items_path else None
    tables, shape = build_tables(read_table(run.path("interactions")), catalog, inp, source=redact(inp.path))
    for name, table in tables.items():
        outputs[name] = write_table(table, run.path(name))
    outputs["dataset"] = write_json(run.path(SHAPE_FILE), shape.as_dict())
    n_imp = tables["impressions"].num_rows
    metrics.update(users=shape.num_users, items=shape.num_items, categories=shape.num_categories,
                   impressions=n_imp, clicks=tables["clicks"].num_rows, queries=0,
                   ctr=tables["clicks"].num_rows / n_imp)
    return StepResult(outputs, metrics, rows=rows + sum(t.num_rows for t in tables.values()), rejects=rejects)
