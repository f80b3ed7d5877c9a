"""Synthetic recsys data: users, items, timestamped impressions/clicks and search queries.

A latent world (user and item factors around category centres, Zipf item
popularity) drives a logging policy (popularity candidates re-ordered by a noisy
affinity) and clicks ``P = sigmoid(a * <u, v> + b * log pop + c) / (1 + pos)^eta``,
so there is a personal signal, a popularity signal and position bias to learn.
Impressions and queries are generated per block of users with Ray Data.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipelines.io import read_parquet, read_table, upsert_mysql, write_dataset, write_json, write_table
from pipelines.template import Run, StepResult

from . import config as C
from .common import DAY_S, SHAPE_FILE, generated_shape

CATEGORY_WORDS = ["shoes", "shirt", "phone", "laptop", "book", "toy", "kitchen", "garden", "beauty",
                  "sports", "music", "game", "camera", "watch", "bag", "sofa", "lamp", "bike", "coffee",
                  "tea", "jacket", "dress", "tablet", "printer"]
ADJECTIVES = ["red", "blue", "black", "white", "green", "light", "pro", "mini", "classic", "smart",
              "eco", "soft", "fast", "compact", "deluxe", "vintage", "travel", "kids", "premium", "basic"]
SYLLABLES = ["ka", "lo", "mi", "ra", "to", "ne", "su", "vi", "pa", "zo", "be", "du", "fe", "gi", "ho"]


def category_word(c: int) -> str:
    """The word naming category ``c`` (cycled with a suffix past the list)."""
    base = CATEGORY_WORDS[c % len(CATEGORY_WORDS)]
    return base if c < len(CATEGORY_WORDS) else f"{base}{c // len(CATEGORY_WORDS)}"


def make_world(d: C.DataConfig) -> dict:
    """Latent factors and item attributes, a pure function of the data config."""
    rng = np.random.default_rng(d.seed)
    centres = rng.normal(size=(d.num_categories, d.latent_dim))
    item_cat = rng.integers(0, d.num_categories, d.num_items)
    item_v = centres[item_cat] + 0.6 * rng.normal(size=(d.num_items, d.latent_dim))
    item_v /= np.linalg.norm(item_v, axis=1, keepdims=True)
    # each user leans towards one or two categories
    home = rng.integers(0, d.num_categories, (d.num_users, 2))
    mix = rng.uniform(0.5, 1.0, (d.num_users, 1))
    user_u = mix * centres[home[:, 0]] + (1 - mix) * centres[home[:, 1]]
    user_u += 0.5 * rng.normal(size=user_u.shape)
    user_u /= np.linalg.norm(user_u, axis=1, keepdims=True)
    ranks = rng.permutation(d.num_items)
    pop = 1.0 / (1.0 + ranks) ** d.popularity_alpha
    pop /= pop.sum()
    log_pop = np.log(pop)
    log_pop_z = (log_pop - log_pop.mean()) / (log_pop.std() + 1e-9)
    price = np.round(np.exp(rng.normal(3 + 0.3 * (item_cat % 5), 0.5)), 2)
    brands = ["".join(rng.choice(SYLLABLES, 2)) for _ in range(d.num_categories * 4)]
    brand = item_cat * 4 + rng.integers(0, 4, d.num_items)
    adj = rng.integers(0, len(ADJECTIVES), d.num_items)
    titles = [f"{brands[b]} {ADJECTIVES[a]} {category_word(c)} {chr(97 + i % 26)}{i % 97}"
              for i, (b, a, c) in enumerate(zip(brand, adj, item_cat))]
    activity = rng.lognormal(0.0, 0.5, d.num_users)
    cat_order = np.argsort(item_cat, kind="stable")
    cat_count = np.bincount(item_cat, minlength=d.num_categories)
    return {"centres": centres, "cat_order": cat_order, "cat_count": cat_count,
            "cat_start": np.cumsum(cat_count) - cat_count, "user_u": user_u, "item_v": item_v, "item_cat": item_cat, "pop": pop, "cum_pop": np.cumsum(pop),
            "log_pop_z": log_pop_z, "price": price, "titles": titles, "activity": activity / activity.mean()}


def users_table(d: C.DataConfig, w: dict) -> pa.Table:
    rng = np.random.default_rng([d.seed, 3])
    return pa.table({"user_id": np.arange(d.num_users, dtype=np.int64),
                     "region": rng.integers(0, 8, d.num_users).astype(np.int32),
                     "signup_day": rng.integers(-365, 0, d.num_users).astype(np.int32)})


def items_table(d: C.DataConfig, w: dict) -> pa.Table:
    cats = [category_word(int(c)) for c in w["item_cat"]]
    return pa.table({"item_id": np.arange(d.num_items, dtype=np.int64),
                     "category": w["item_cat"].astype(np.int32),
                     "price": w["price"].astype(np.float64),
                     "title": w["titles"],
                     "description": [f"{t}: a {c} item" for t, c in zip(w["titles"], cats)]})


def _pool(rng, w: dict, users: np.ndarray, size: int, d: C.DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """Candidates per row of ``users`` (popularity samples plus items from categories the user
    leans to, ``personal_exposure`` share), duplicates masked, with the user-item affinities."""
    n_personal = round(size * d.personal_exposure)
    cand = np.searchsorted(w["cum_pop"], rng.random((len(users), size - n_personal)) * w["cum_pop"][-1])
    if n_personal:
        cat_logit = 3.0 * w["user_u"][users] @ w["centres"].T
        cat_logit = np.where(w["cat_count"] > 0, cat_logit, -np.inf)
        cats = np.argmax(cat_logit[:, None, :] + rng.gumbel(size=(len(users), n_personal, len(w["cat_count"]))),
                         axis=2)
        within = (rng.random(cats.shape) * w["cat_count"][cats]).astype(np.int64)
        cand = np.concatenate([cand, w["cat_order"][w["cat_start"][cats] + within]], axis=1)
    cand = np.minimum(cand, d.num_items - 1)
    order = np.argsort(cand, axis=1, kind="stable")
    srt = np.take_along_axis(cand, order, axis=1)
    dup_sorted = np.zeros_like(srt, dtype=bool)
    dup_sorted[:, 1:] = srt[:, 1:] == srt[:, :-1]
    dup = np.zeros_like(dup_sorted)
    np.put_along_axis(dup, order, dup_sorted, axis=1)
    aff = np.einsum("nd,nkd->nk", w["user_u"][users], w["item_v"][cand])
    return cand, np.where(dup, -np.inf, aff)


class WorldStage:
    """Base of the Ray Data generator stages: the latent world, built once per actor."""

    stream = 0

    def __init__(self, data_cfg: dict):
        self.d = C.DataConfig(**data_cfg)
        self.w = make_world(self.d)

    def users_and_rng(self, batch: dict) -> tuple[np.ndarray, np.random.Generator]:
        """The batch's user ids and a generator seeded by (seed, stage, first user): reproducible."""
        users = np.asarray(batch["id"], dtype=np.int64)
        return users, np.random.default_rng([self.d.seed, self.stream, int(users.min())])


class ImpressionGenerator(WorldStage):
    """Ray Data stage: a batch of user ids -> their sessions' impressions (with clicks)."""

    stream = 1

    def __call__(self, batch: dict) -> dict:
        d, w = self.d, self.w
        users, rng = self.users_and_rng(batch)
        n_sess = rng.poisson(d.sessions_per_user * w["activity"][users])
        sess_user = np.repeat(users, n_sess)
        s = d.slate_size
        cand, aff = _pool(rng, w, sess_user, 3 * s, d)
        policy = aff + rng.gumbel(size=aff.shape)  # the logging policy's noisy relevance
        top = np.argsort(-policy, axis=1)[:, :s]
        items = np.take_along_axis(cand, top, axis=1)
        item_aff = np.take_along_axis(aff, top, axis=1)
        pos = np.broadcast_to(np.arange(s), items.shape)
        logit = d.affinity_weight * item_aff + d.popularity_weight * w["log_pop_z"][items] - 2.0
        p = 1.0 / (1.0 + np.exp(-logit)) / (1.0 + pos) ** d.position_bias
        clicked = rng.random(items.shape) < p
        ts = rng.integers(0, d.days * DAY_S, len(sess_user))
        return {
            "impression_id": (np.repeat(sess_user * 10_000 + _session_index(n_sess), s) * s
                              + pos.ravel()).astype(np.int64),
            "user_id": np.repeat(sess_user, s).astype(np.int64),
            "item_id": items.ravel().astype(np.int64),
            "position": pos.ravel().astype(np.int32),
            "ts": np.repeat(ts, s).astype(np.int64),
            "clicked": clicked.ravel(),
        }


def _session_index(n_sess: np.ndarray) -> np.ndarray:
    """0..n-1 within each user's sessions."""
    starts = np.repeat(np.cumsum(n_sess) - n_sess, n_sess)
    return np.arange(int(n_sess.sum())) - starts


class QueryGenerator(WorldStage):
    """Ray Data stage: a batch of user ids -> search queries and the item each led to."""

    stream = 2

    def __call__(self, batch: dict) -> dict:
        d, w = self.d, self.w
        users, rng = self.users_and_rng(batch)
        n_q = rng.poisson(d.queries_per_user * w["activity"][users])
        q_user = np.repeat(users, n_q)
        cand, aff = _pool(rng, w, q_user, 3 * d.slate_size, d)
        pick = np.argmax(d.affinity_weight * aff + rng.gumbel(size=aff.shape), axis=1)
        target = cand[np.arange(len(q_user)), pick]
        texts = []
        for item in target:
            words = w["titles"][item].split()[:3]
            keep = rng.random(3) < 0.6
            keep[rng.integers(0, 3)] = True
            texts.append(" ".join(x for x, k in zip(words, keep) if k))
        return {"query_id": (q_user * 10_000 + _session_index(n_q)).astype(np.int64),
                "user_id": q_user, "ts": rng.integers(0, d.days * DAY_S, len(q_user)).astype(np.int64),
                "query": np.array(texts, dtype=object), "item_id": target.astype(np.int64)}


def build_per_user(stage, d: C.DataConfig):
    """Lazy Ray Dataset: ``stage`` (a WorldStage) applied to blocks of user ids on a small actor pool."""
    import ray

    blocks = max(1, -(-d.num_users // d.users_per_block))
    return ray.data.range(d.num_users, override_num_blocks=blocks).map_batches(
        stage, fn_constructor_kwargs={"data_cfg": d.model_dump()},
        batch_size=d.users_per_block, compute=ray.data.ActorPoolStrategy(min_size=1, max_size=2))


def run(cfg: C.RecsysConfig, run: Run) -> StepResult:
    """Generate and write users, items, impressions, clicks and queries; with ``input.path``, ingest the
    user's interactions into the same tables instead (:mod:`recsys.inputs`)."""
    from ray.data.expressions import col

    if cfg.input.path:
        from . import inputs

        return inputs.run(cfg, run)
    out, d = run.dir, cfg.data
    w = make_world(d)
    outputs = {"users": write_table(users_table(d, w), f"{out}/users"),
               "items": write_table(items_table(d, w), f"{out}/items")}
    impressions = build_per_user(ImpressionGenerator, d).materialize()
    outputs["impressions"] = write_dataset(impressions, f"{out}/impressions")
    outputs["clicks"] = write_dataset(impressions.filter(expr=col("clicked") == True), f"{out}/clicks")
    outputs["queries"] = write_dataset(build_per_user(QueryGenerator, d), f"{out}/queries")
    outputs["dataset"] = write_json(f"{out}/{SHAPE_FILE}", generated_shape(cfg).as_dict())
    n_imp = impressions.count()
    n_clicks = read_parquet(f"{out}/clicks").count()
    n_queries = read_parquet(f"{out}/queries").count()
    if d.mysql_url:
        for name, key in (("users", ["user_id"]), ("items", ["item_id"]),
                          ("impressions", ["impression_id"]), ("queries", ["query_id"])):
            upsert_mysql(d.mysql_url, f"recsys_{name}", read_table(f"{out}/{name}"), key)
    metrics = {"users": d.num_users, "items": d.num_items, "impressions": n_imp, "clicks": n_clicks,
               "queries": n_queries, "ctr": n_clicks / max(n_imp, 1)}
    return StepResult(outputs, metrics, rows=d.num_users + d.num_items + n_imp + n_clicks + n_queries)


if __name__ == "__main__":
    from .template import TEMPLATE

    TEMPLATE.step_alias("data")
