"""recsys on the user's own data: MovieLens-shaped ratings written here, mapped with input.columns.

Unit tests (no Ray) check the shaping of validated interactions into the template's tables; the
end-to-end test runs ``python -m recsys --input ratings.csv --set input.columns...`` on the
shared cluster into an oss:// run folder and checks the rejects and NDCG@10 against popularity.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest

from pipelines.input import InputError, conform, schema_markdown, split_table, user_names
from recsys import config as C
from recsys.common import DataShape
from recsys.features import item_static, snapshot
from recsys.index import VectorIndex
from recsys.inputs import INTERACTIONS, ITEMS, build_tables, positives, time_split
from recsys.template import TEMPLATE

from . import movielens as ML

MAPPING = {"user_id": "userId", "item_id": "movieId", "category": "genres"}


def _read(path: Path, schema: pa.Schema, ids) -> tuple[pa.Table, pa.Table]:
    """What ``pipelines.input.read_input`` does per block (CSV as text, mapped and cast), in memory."""
    raw = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(strings_can_be_null=True, column_types={
        c: pa.string() for c in pacsv.read_csv(path).column_names}))
    return split_table(conform(raw, schema, user_names(schema, MAPPING), id_columns=ids))


@pytest.fixture(scope="module")
def movielens(tmp_path_factory):
    data = ML.generate()
    return data, *ML.write(data, tmp_path_factory.mktemp("movielens"))


def test_movielens_rows_shape_into_the_template_tables(movielens):
    data, ratings, movies = movielens
    good, rejects = _read(ratings, INTERACTIONS, ["user_id", "item_id", "timestamp"])
    assert dict(zip(rejects.column("id").to_pylist(), rejects.column("reason").to_pylist())) == \
        ML.expected_rejects(data.bad)
    assert good.num_rows == len(data.ratings) and "source" not in good.column_names  # the extra column stays out
    catalog, _ = _read(movies, ITEMS, ["item_id"])
    tables, shape = build_tables(good, catalog, C.load().input)
    users, items, imp = tables["users"], tables["items"], tables["impressions"]
    assert (shape.num_users, shape.num_items) == (data.ratings.userId.nunique(), len(data.movies))
    assert users.column("user_id").to_pylist() == list(range(shape.num_users))
    # dense ids map back to the user's ids, row for row
    back = (users.column("key").to_numpy(zero_copy_only=False)[imp.column("user_id").to_numpy()],
            items.column("key").to_numpy(zero_copy_only=False)[imp.column("item_id").to_numpy()])
    expected = set(zip(data.ratings.userId.astype(str), data.ratings.movieId.astype(str),
                       data.ratings.timestamp - data.ratings.timestamp.min()))
    assert set(zip(*back, imp.column("ts").to_numpy())) == expected
    # rating >= 4 is a positive; one category per movie: the first of its genres
    assert imp.column("clicked").to_numpy(zero_copy_only=False).mean() == pytest.approx(
        (data.ratings.rating >= 4).mean())
    first = dict(zip(data.movies.movieId.astype(str), data.movies.genres.str.split("|").str[0]))
    assert dict(zip(items.column("key").to_pylist(), items.column("category_name").to_pylist())) == first
    assert shape.num_categories == len(set(first.values()))
    # a global time split: ~75% / 15% / 10% of the interactions
    ts = imp.column("ts").to_numpy()
    shares = [np.mean(ts < shape.t1), np.mean((ts >= shape.t1) & (ts < shape.t2)), np.mean(ts >= shape.t2)]
    assert shares == pytest.approx([0.75, 0.15, 0.10], abs=0.01)
    assert tables["clicks"].num_rows == imp.column("clicked").to_numpy(zero_copy_only=False).sum()
    assert tables["queries"].num_rows == 0


def test_users_and_items_without_side_features_get_usable_features(movielens):
    """No item side input: one category '(none)', no price, no text; the snapshot still gives
    popularity, CTR and each user's seen items (the exclusions)."""
    _, ratings, _ = movielens
    good, _ = _read(ratings, INTERACTIONS, ["user_id", "item_id", "timestamp"])
    tables, shape = build_tables(good, None, C.load().input)
    items = tables["items"]
    assert shape.num_categories == 1 and set(items.column("category_name").to_pylist()) == {"(none)"}
    assert np.isnan(items.column("price").to_numpy()).all() and set(items.column("title").to_pylist()) == {""}
    static = item_static(items)
    assert not static["price_bucket"].any() and not static["price_z"].any()
    users, feats = snapshot(tables["impressions"], items, shape.num_users, 1, shape.t2, seen=True)
    assert np.isfinite(feats.column("ctr").to_numpy()).all()
    imp = tables["impressions"].to_pandas()
    before = imp[imp.ts < shape.t2]
    u = int(before.user_id.iloc[0])
    assert sorted(users.column("seen_items")[u].as_py()) == sorted(before[before.user_id == u].item_id.unique())
    assert sorted(users.column("clicked_items")[u].as_py()) == sorted(
        before[(before.user_id == u) & before.clicked].item_id.unique())


def test_implicit_feedback_click_wins_over_rating_and_no_feedback_is_positive():
    t = pa.table({"rating": pa.array([5.0, 2.0, None, 4.0, None]),
                  "click": pa.array([False, None, None, None, True])})
    assert positives(t, 4.0).tolist() == [False, False, True, True, True]
    assert positives(t.drop_columns(["click"]), 4.5).tolist() == [True, False, True, False, True]
    assert positives(pa.table({"x": [1, 2]}), 4.0).tolist() == [True, True]


def test_time_split_needs_distinct_times_and_positives_in_every_slice():
    assert time_split(np.arange(100), 0.1, 0.15) == (75, 90, 100)
    with pytest.raises(InputError, match="cannot be split in time"):
        time_split(np.zeros(50, dtype=np.int64), 0.1, 0.15)
    inter = pa.table({"user_id": ["a", "b"] * 50, "item_id": ["x", "y"] * 50,
                      "timestamp": pa.array(np.arange(100) * 1_000_000, pa.timestamp("us")),
                      "rating": pa.array([5.0] * 80 + [1.0] * 20)})
    with pytest.raises(InputError, match="no positive interaction in the test slice"):
        build_tables(inter, None, C.load().input)


@pytest.mark.parametrize("exact_max_items", [1000, 0])
def test_exclusions_never_return_seen_items(exact_max_items):
    """Exact and IVF alike: a row's excluded items are skipped, the rest keep their order; when the
    catalogue runs out the slots are empty (id -1, score -inf), so nothing seen fills them."""
    vecs = np.eye(6, dtype=np.float32)[::-1] + np.linspace(0, 0.5, 6, dtype=np.float32)[:, None]
    index = VectorIndex(vecs / np.linalg.norm(vecs, axis=1, keepdims=True), exact_max_items=exact_max_items)
    q = np.ones((2, 6), dtype=np.float32)
    plain, _ = index.search(q, 6)
    ids, scores = index.search(q, 6, excluded=[np.array([5, 1]), np.array([], dtype=np.int64)])
    assert ids[0, :4].tolist() == [i for i in plain[0] if i not in (5, 1)] and ids[0, 4:].tolist() == [-1, -1]
    assert np.isneginf(scores[0, 4:]).all() and np.isfinite(scores[0, :4]).all()
    assert (ids[1] == plain[1]).all()


def test_input_section_is_checked_before_any_cluster_work(movielens, monkeypatch):
    """Unmapped columns: a one-line error naming the column and the file; a bad split: the field."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # a local file is readable by in-process Ray
    _, ratings, movies = movielens
    cfg = C.load(overrides=[f"input.path={ratings}"])
    with pytest.raises(InputError, match=r"input.path .*ratings.csv: no column 'user_id' for the required "
                                         r"'user_id'; map yours with --set input.columns.user_id=YOUR_COLUMN"):
        TEMPLATE.check_inputs(cfg)
    cfg = C.load(overrides=[f"input.path={ratings}", f"input.items_path={movies}", "input.columns.user_id=userId",
                            "input.columns.item_id=movieId", "input.columns.category=genre"])
    TEMPLATE.check_inputs(cfg)  # category is optional: a wrong name for it is not an error...
    with pytest.raises(InputError, match="input.columns maps 'rating_value'"):  # ...an unknown column is
        TEMPLATE.check_inputs(C.load(overrides=[f"input.path={ratings}", "input.columns.rating_value=rating"]))
    with pytest.raises(Exception, match="test_fraction"):
        C.load(overrides=["input.test_fraction=0.45", "input.ranker_fraction=0.45"])


def test_guide_shows_the_input_tables():
    guide = (Path(__file__).resolve().parents[2] / "docs" / "recsys.md").read_text()
    assert schema_markdown(INTERACTIONS) in guide and schema_markdown(ITEMS) in guide
    assert "python -m recsys --input ratings.csv --set input.columns.user_id=userId" in guide


def test_data_shape_round_trips():
    s = DataShape(3, 4, 2, 10, 20, 30, source="oss://b/r.csv", t0=5, exclude_seen=True)
    assert DataShape.from_dict({**s.as_dict(), "extra": 1}) == s and s.own_ids


# one Train worker each: the run's time is Ray's fixed costs (two Train runs, six actor pools), not the
# data (500 users, 24k ratings); fewer epochs leave the ranker below retrieval, so the defaults stay
E2E_SETTINGS = ["retrieval.num_workers=1", "ranker.num_workers=1"]


def test_movielens_ratings_end_to_end_beat_popularity(movielens, adbray_run_dir, run_template):
    """The user's files on object storage (where a cluster reads them), mapped onto the template's
    columns: the bad rows are rejects naming exactly those rows, every later step runs on the
    ingested data, batch rows carry the user's ids, and the ranker beats popularity on NDCG@10."""
    from pipelines.io import read_json, read_table, write_bytes

    data, ratings, movies = movielens
    where = f"{adbray_run_dir}-input"
    ratings_uri = write_bytes(f"{where}/ratings.csv", ratings.read_bytes())
    movies_uri = write_bytes(f"{where}/movies.csv", movies.read_bytes())
    args = ["--input", ratings_uri, "--run-dir", adbray_run_dir]
    for item in ["input.columns.user_id=userId", "input.columns.item_id=movieId", f"input.items_path={movies_uri}",
                 "input.columns.category=genres", *E2E_SETTINGS]:
        args += ["--set", item]
    code, s = run_template(TEMPLATE, args)
    assert code == 0, s
    m = s["metrics"]
    assert s["steps"] == ["data", "retrieval", "ranking", "evaluate", "batch"]
    assert s["outputs"]["interactions_source"] == ratings_uri
    # rejects: exactly the bad rows, each with its reason; every good row is kept
    rejects = read_table(s["outputs"]["interactions_rejects"]).to_pylist()
    assert {r["id"]: r["reason"] for r in rejects} == ML.expected_rejects(data.bad)
    assert s["rejects"] == len(data.bad) and m["interactions_rows"] == len(data.ratings)
    assert read_table(s["outputs"]["catalog"]).num_rows == len(data.movies)
    shape = read_json(s["outputs"]["dataset"])
    assert (shape["num_users"], shape["num_items"]) == (data.ratings.userId.nunique(), len(data.movies))
    # the Done-when: on MovieLens-shaped ratings the ranker beats popularity
    print(f"ndcg10 ranker {m['ndcg10_ranker']:.4f} retrieval {m['ndcg10_retrieval']:.4f} "
          f"popularity {m['ndcg10_popularity']:.4f} ({m['test_users']} test users); step seconds {s['step_seconds']}")
    assert m["test_users"] >= 100
    assert m["ndcg10_ranker"] > m["ndcg10_popularity"], m
    # batch: k rows per user, in the user's own ids, never a movie the user already rated
    recs = read_table(s["outputs"]["recommendations"]).to_pandas()
    assert set(recs.user_id) == set(data.ratings.userId.astype(str))
    assert recs.groupby("user_id").size().eq(C.load().batch.k).all()
    rated = set(zip(data.ratings.userId.astype(str), data.ratings.movieId.astype(str)))
    assert not any(pair in rated for pair in zip(recs.user_id, recs.item_id))
