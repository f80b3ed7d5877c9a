"""Unit tests of the recsys stages on small in-memory data (no Ray)."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipelines.config import ConfigError
from recsys import config as C
from recsys import data as D
from recsys.features import (
    FeatureStore,
    InProcessUsers,
    RedisUsers,
    clicked_by_user,
    snapshot,
    validate_impressions,
)
from recsys.index import VectorIndex
from recsys.models import DeepFM, TwoTower, in_batch_softmax_loss, listwise_loss, tokenize
from recsys.training import history_outputs


def small_cfg(**data) -> C.RecsysConfig:
    return C.load(overrides=[f"data.{k}={v}" for k, v in {"num_users": 300, "num_items": 80, **data}.items()])


def impressions_for(cfg) -> pa.Table:
    batch = D.ImpressionGenerator(cfg.data.model_dump())({"id": np.arange(cfg.data.num_users)})
    return pa.table(batch)


def test_generator_is_seeded_and_has_position_bias():
    cfg = small_cfg()
    a, b = impressions_for(cfg), impressions_for(cfg)
    assert a.equals(b)
    other = impressions_for(small_cfg(seed=8))
    assert not a.equals(other)
    df = a.to_pandas()
    assert df.impression_id.is_unique
    ctr = df.groupby("position").clicked.mean()
    assert ctr.iloc[0] > 2 * ctr.iloc[-1]  # position bias
    assert df.item_id.between(0, cfg.data.num_items - 1).all()


def test_clicks_follow_latent_affinity_and_popularity():
    cfg = small_cfg(num_users=1000)
    w = D.make_world(cfg.data)
    df = impressions_for(cfg).to_pandas()
    aff = np.einsum("nd,nd->n", w["user_u"][df.user_id], w["item_v"][df.item_id])
    hi = df[aff > np.median(aff)].clicked.mean()
    lo = df[aff <= np.median(aff)].clicked.mean()
    assert hi > 1.5 * lo
    def skew(frame):
        counts = frame.item_id.value_counts()
        return counts.iloc[0] / counts.median()

    flat = impressions_for(small_cfg(num_users=1000, popularity_alpha=0)).to_pandas()
    assert skew(df) > 3 and skew(df) > 2 * skew(flat)  # popularity skew comes from popularity_alpha


def test_queries_name_their_item():
    cfg = small_cfg()
    w = D.make_world(cfg.data)
    q = D.QueryGenerator(cfg.data.model_dump())({"id": np.arange(100)})
    assert len(q["query"]) > 50
    for text, item in zip(q["query"], q["item_id"]):
        assert text and set(text.split()) <= set(w["titles"][item].split())


def test_validate_impressions_rejects_bad_rows_and_keeps_good():
    t = pa.table({"impression_id": [1, 2, 3, 4, 5], "user_id": [0, 1, 99, 2, None],
                  "item_id": [0, -1, 1, 2, 3], "position": [0, 1, 2, -3, 0], "ts": [5, 6, 7, 8, 9],
                  "clicked": [True, False, False, True, False]})
    good, bad = validate_impressions(t, num_users=10, num_items=10)
    assert good.column("impression_id").to_pylist() == [1]
    reasons = {r["id"]: r["reason"] for r in bad}
    assert reasons == {"2": "unknown item_id", "3": "unknown user_id", "4": "negative position", "5": "null field"}
    assert all(r["stage"] == "features" for r in bad)


def test_snapshot_uses_only_the_past():
    items = pa.table({"item_id": [0, 1, 2], "category": [0, 1, 1], "price": [1.0, 2.0, 3.0]})
    imp = pa.table({"user_id": [0, 0, 1, 1], "item_id": [0, 1, 2, 2], "ts": [10, 20, 30, 40],
                    "clicked": [True, True, True, False]})
    users, its = snapshot(imp, items, num_users=2, num_categories=2, until_ts=25)
    assert its.column("clicks").to_pylist() == [1, 1, 0]
    assert users.column("clicks").to_pylist() == [2, 0]
    assert users.column("cat_share").to_pylist()[0] == [0.5, 0.5]
    assert users.column("clicked_items").to_pylist() == [[0, 1], []]
    later = clicked_by_user(imp, 25, 100)
    assert later.to_pylist() == [{"user_id": 1, "clicked": [2]}]


def test_feature_store_inputs_and_unknown_users():
    items = pa.table({"item_id": [0, 1, 2], "category": [0, 1, 1], "price": [1.0, 2.0, 3.0]})
    imp = pa.table({"user_id": [0, 0, 0], "item_id": [0, 1, 2], "ts": [1, 2, 3], "clicked": [True, True, True]})
    users, its = snapshot(imp, items, num_users=1, num_categories=2, until_ts=10)
    store = FeatureStore(its, InProcessUsers(users))
    sparse, dense = store.ranker_inputs(np.array([0, 7, 0]), np.array([1, 1, 2]), np.array([0.5, 0.1, 0.2]))
    assert sparse[:, 0].tolist() == [2, 0, 2]  # user's top category (1) + 1; unknown user -> 0
    assert sparse[:, 1].tolist() == [1, 1, 2]
    assert dense[:, 0].tolist() == pytest.approx([0.5, 0.1, 0.2])
    assert dense[0, 3] == pytest.approx(2 / 3) and dense[1, 3] == 0  # share of clicks in the item's category
    assert dense[:, 6].tolist() == [1, 0, 1]  # clicked this item before (unknown user: never)


def test_redis_feature_store_matches_in_process(redis_url):
    cfg = small_cfg()
    imp = impressions_for(cfg)
    items = D.items_table(cfg.data, D.make_world(cfg.data))
    users, _ = snapshot(imp, items, cfg.data.num_users, cfg.data.num_categories, 10 ** 9)
    remote = RedisUsers(redis_url, "recsys-test-units", cfg.data.num_categories)
    assert remote.publish(users) == cfg.data.num_users
    ids = np.array([0, 5, 299, 300, -1])
    got, want = remote.lookup(ids), InProcessUsers(users).lookup(ids)
    for a, b in zip(got[:3], want[:3]):
        np.testing.assert_allclose(a, b)
    assert [x.tolist() for x in got[3]] == [x.tolist() for x in want[3]]
    assert any(len(x) for x in got[3])


def unit_rows(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_exact_index_matches_brute_force_with_filters():
    rng = np.random.default_rng(0)
    vecs = unit_rows(rng.normal(size=(400, 16)))
    q = vecs[:20] + 0.05 * rng.normal(size=(20, 16)).astype(np.float32)
    index = VectorIndex(vecs)
    assert index.kind == "exact"
    ids, scores = index.search(q, 5)
    brute = np.argsort(-(q @ vecs.T), axis=1)[:, :5]
    assert (ids == brute).all() and (np.diff(scores, axis=1) <= 0).all()
    allowed = np.arange(400) % 2 == 0
    ids_f, _ = index.search(q, 5, allowed)
    assert allowed[ids_f].all()
    assert (ids_f == np.argsort(-np.where(allowed, q @ vecs.T, -np.inf), axis=1)[:, :5]).all()
    few, few_scores = index.search(q[:1], 4, np.isin(np.arange(400), [3, 9]))  # fewer allowed than k
    assert sorted(few[0, :2]) == [3, 9] and (few[0, 2:] == -1).all() and np.isneginf(few_scores[0, 2:]).all()


@pytest.fixture
def one_faiss_thread():
    """One search thread, as in a Ray actor with num_cpus=1 (OMP_NUM_THREADS): timings on a shared
    machine then measure the index, not OpenMP threads waiting for a core."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def test_ivf_beyond_the_threshold_keeps_recall_and_beats_exact(one_faiss_thread):
    """50k clustered item vectors over ``exact_max_items``: the IVF index (default cells and probes)
    finds >= 90% of the exact top 100 and searches a batch of 256 queries faster than exact search."""
    import time

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(200, 32))
    vecs = unit_rows(centers[rng.integers(0, 200, 50_000)] + 0.5 * rng.normal(size=(50_000, 32)))
    q = unit_rows(vecs[rng.choice(50_000, 256)] + 0.3 * rng.normal(size=(256, 32)))
    exact, ivf = VectorIndex(vecs, exact_max_items=50_000), VectorIndex(vecs, exact_max_items=49_999)
    assert (exact.kind, ivf.kind, ivf.probe, ivf.index.nlist) == ("exact", "ivf", 14, 224)

    def best_of(index, reps=5):
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            ids, _ = index.search(q, 100)
            times.append(time.perf_counter() - t0)
        return ids, min(times)

    want, exact_s = best_of(exact)
    got, ivf_s = best_of(ivf)
    recall = np.mean([len(set(a) & set(b)) / 100 for a, b in zip(got, want)])
    assert recall >= 0.9, recall
    assert ivf_s < exact_s, (ivf_s, exact_s)


def test_tokenize_pads_and_hashes_stably():
    t = tokenize(["Red Shoes", "", None], buckets=100, max_tokens=3)
    assert t.shape == (3, 3) and (t[1:] == 0).all() and (t[0, :2] > 0).all() and t[0, 2] == 0
    assert (tokenize(["red shoes"], 100, 3) == t[:1]).all()


def test_models_learn_their_objectives():
    torch.manual_seed(0)
    tt = TwoTower(num_users=4, num_items=6, num_categories=2, item_category=np.array([0, 1] * 3),
                  item_tokens=np.zeros((6, 2), dtype=np.int64), vocab_buckets=8, embed_dim=8, hidden=8)
    opt = torch.optim.Adam(tt.parameters(), lr=0.05)
    users, items = torch.arange(1, 5), torch.tensor([0, 2, 4, 5])
    for _ in range(100):
        q, v = tt(users, torch.zeros((4, 2), dtype=torch.long), items)
        loss = in_batch_softmax_loss(q, v, items, 0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
    q = tt.query_vec(users, torch.zeros((4, 2), dtype=torch.long))
    assert ((q @ tt.item_vec(torch.arange(6)).T).argmax(1) == items).all()
    fm = DeepFM([3, 5], num_dense=2, embed_dim=4, hidden=[8])
    sparse = torch.randint(0, 3, (6, 5, 2))
    dense = torch.randn(6, 5, 2)
    dense[:, 2, 1] += 3
    labels = torch.zeros(6, 5)
    labels[:, 2] = 1
    opt = torch.optim.Adam(fm.parameters(), lr=0.05)
    for _ in range(60):
        loss = listwise_loss(fm(sparse, dense), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert (fm(sparse, dense).argmax(1) == 2).all()


def test_config_errors_are_one_line():
    with pytest.raises(ConfigError) as e:
        C.load(overrides=["data.days=3", "data.test_days=2"])
    assert "ranker_days + test_days" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="retrieval.exact_max_items"):
        C.load(overrides=["retrieval.exact_max_items=-1"])


def test_snapshot_loop_shows_progress_on_a_terminal_only(tmp_path, monkeypatch, capsys):
    from pipelines.io import write_table
    from recsys.ranking import SNAPSHOTS, write_snapshots

    cfg = small_cfg()
    write_table(D.items_table(cfg.data, D.make_world(cfg.data)), f"{tmp_path}/items")
    write_table(impressions_for(cfg), f"{tmp_path}/impressions")
    monkeypatch.setenv("ADBRAY_PROGRESS", "0")
    write_snapshots(cfg, str(tmp_path))
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("ADBRAY_PROGRESS", "1")
    write_snapshots(cfg, str(tmp_path))
    assert f"[snapshots] {len(SNAPSHOTS)}/{len(SNAPSHOTS)} snapshots" in capsys.readouterr().err
    assert all((tmp_path / "features" / name / "users").is_dir() for name in SNAPSHOTS)


def test_history_outputs_write_the_loss_curve_and_its_history(tmp_path):
    history = [{"epoch": 0, "loss": 2.5}, {"epoch": 1, "loss": 1.5}]
    outputs = history_outputs(str(tmp_path), "ranker", history)
    assert outputs == {"ranker_history": f"{tmp_path}/ranker_history.json",
                       "plot_ranker_loss": f"{tmp_path}/ranker_loss.png"}
    assert (tmp_path / "ranker_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "ranker_history.json").read_text()) == history


def test_a_serve_config_app_uses_the_runs_own_config(tmp_path):
    """`adbray serve recsys --run-dir R` must query with what R was trained with (vocabulary buckets,
    candidates), not the defaults; the serve section comes from the Serve config's args."""
    from pipelines.html_report import config_yaml
    from recsys import config as C
    from recsys.serve import app_config

    trained = C.load(None, ["retrieval.vocab_buckets=4321", "retrieval.candidates=77"])
    (tmp_path / "config.yaml").write_text(config_yaml(trained))
    serve = {**trained.serve.model_dump(), "max_batch_size": 5}
    cfg = app_config({"run_dir": str(tmp_path), "serve": serve})
    assert (cfg.retrieval.vocab_buckets, cfg.retrieval.candidates, cfg.serve.max_batch_size) == (4321, 77, 5)
    assert app_config({"run_dir": str(tmp_path / "none")}).retrieval.vocab_buckets == C.load().retrieval.vocab_buckets


def test_fast_serve_reaches_the_in_process_rays_environment_and_an_explicit_env_wins():
    from pipelines.config import FAST_SERVE_ENV

    assert C.load().local_ray.env == FAST_SERVE_ENV
    assert C.load(None, ["serve.fast_serve=false"]).local_ray.env == {}
    mine = C.load(None, ["local_ray.env.RAY_SERVE_ENABLE_HA_PROXY='0'"]).local_ray.env
    assert mine == {**FAST_SERVE_ENV, "RAY_SERVE_ENABLE_HA_PROXY": "0"}
