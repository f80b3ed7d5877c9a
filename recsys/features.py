"""Point-in-time feature snapshots, the feature store (in-process or Redis), ranker examples.

A snapshot "as of T" uses only impressions before T: item clicks/impressions/CTR,
user click counts and the share of each user's clicks per category. The ranker
trains on impressions in [t1, t2) with features as of t1, is evaluated on
[t2, end) with features as of t2, and serves with features as of the end.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipelines.io import read_table, reject

from .models import DENSE_FEATURES

PRICE_BUCKETS = 8
CTR_PRIOR_WEIGHT = 20.0


def validate_impressions(table: pa.Table, num_users: int, num_items: int) -> tuple[pa.Table, list[dict]]:
    """Split impressions into valid rows and reject records (unknown ids, bad position/ts)."""
    cols = {c: table.column(c).to_numpy(zero_copy_only=False) for c in
            ("impression_id", "user_id", "item_id", "position", "ts")}
    nulls = np.zeros(table.num_rows, dtype=bool)
    for c in ("user_id", "item_id", "position", "ts", "clicked"):
        nulls |= table.column(c).is_null().to_numpy(zero_copy_only=False)
    reasons = [
        (nulls, "null field"),
        ((cols["user_id"] < 0) | (cols["user_id"] >= num_users), "unknown user_id"),
        ((cols["item_id"] < 0) | (cols["item_id"] >= num_items), "unknown item_id"),
        (cols["position"] < 0, "negative position"),
        (cols["ts"] < 0, "negative timestamp"),
    ]
    bad = np.zeros(table.num_rows, dtype=bool)
    records = []
    for mask, why in reasons:
        new = mask & ~bad
        records += [reject(str(i), "features", why) for i in cols["impression_id"][new]]
        bad |= mask
    return table.filter(pa.array(~bad)), records


def clicked_by_user(impressions: pa.Table, lo: int, hi: int) -> pa.Table:
    """(user_id, clicked: distinct items clicked in lo <= ts < hi) for users with such a click."""
    ts = impressions.column("ts").to_numpy()
    clicked = impressions.column("clicked").to_numpy(zero_copy_only=False)
    keep = (ts >= lo) & (ts < hi) & clicked
    t = pa.table({"user_id": impressions.column("user_id").to_numpy()[keep],
                  "item_id": impressions.column("item_id").to_numpy()[keep]})
    g = t.group_by("user_id").aggregate([("item_id", "distinct")])
    return g.rename_columns(["user_id", "clicked"]).sort_by("user_id")


def item_static(items: pa.Table) -> dict:
    """Per-item arrays that do not change over time: category, price bucket, price z-score."""
    price = items.column("price").to_numpy(zero_copy_only=False).astype(np.float64)
    known = np.isfinite(price)  # the user's items may have no price: bucket 0, z-score 0
    log_price = np.log1p(np.maximum(np.where(known, price, 0), 0))
    if not known.any():
        return {"category": items.column("category").to_numpy().astype(np.int64),
                "price_bucket": np.zeros(len(price), np.int64), "price_z": np.zeros(len(price), np.float32)}
    edges = np.quantile(log_price[known], np.linspace(0, 1, PRICE_BUCKETS + 1)[1:-1])
    mean, std = log_price[known].mean(), log_price[known].std()
    return {"category": items.column("category").to_numpy().astype(np.int64),
            "price_bucket": np.where(known, np.searchsorted(edges, log_price), 0).astype(np.int64),
            "price_z": np.where(known, (log_price - mean) / (std + 1e-9), 0).astype(np.float32)}


def item_lists(users: np.ndarray, items: np.ndarray, num_users: int, num_items: int) -> pa.ListArray:
    """The distinct items of each user 0..num_users-1 (sorted), as one Arrow list per user."""
    pairs = np.unique(users * num_items + items)
    offsets = np.searchsorted(pairs // num_items, np.arange(num_users + 1))
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array((pairs % num_items).astype(np.int32)))


def snapshot(impressions: pa.Table, items: pa.Table, num_users: int, num_categories: int,
             until_ts: int, seen: bool = False) -> tuple[pa.Table, pa.Table]:
    """(user_features, item_features) from impressions with ts < until_ts; ``seen`` adds the user column
    ``seen_items`` (every item the user interacted with, clicked or not: excluded from their candidates)."""
    ts = impressions.column("ts").to_numpy()
    keep = ts < until_ts
    user = impressions.column("user_id").to_numpy()[keep]
    item = impressions.column("item_id").to_numpy()[keep]
    click = impressions.column("clicked").to_numpy(zero_copy_only=False)[keep].astype(np.float64)
    num_items = items.num_rows
    static = item_static(items)
    item_clicks = np.bincount(item, weights=click, minlength=num_items)
    item_imps = np.bincount(item, minlength=num_items).astype(np.float64)
    global_ctr = click.mean() if len(click) else 0.0
    ctr = (item_clicks + CTR_PRIOR_WEIGHT * global_ctr) / (item_imps + CTR_PRIOR_WEIGHT)
    log_clicks = np.log1p(item_clicks)
    cat = static["category"][item]
    uc = np.bincount(user * num_categories + cat, weights=click, minlength=num_users * num_categories)
    uc = uc.reshape(num_users, num_categories)
    user_clicks = uc.sum(1)
    share = uc / np.maximum(user_clicks, 1)[:, None]
    users_t = pa.table({
        "user_id": np.arange(num_users, dtype=np.int64),
        "clicks": user_clicks.astype(np.float32),
        "cat_share": pa.FixedSizeListArray.from_arrays(pa.array(share.astype(np.float32).ravel()),
                                                       num_categories),
        "clicked_items": item_lists(user[click > 0], item[click > 0], num_users, num_items),
    })
    if seen:
        users_t = users_t.append_column("seen_items", item_lists(user, item, num_users, num_items))
    items_t = pa.table({
        "item_id": items.column("item_id").to_numpy().astype(np.int64),
        "category": static["category"], "price_bucket": static["price_bucket"], "price_z": static["price_z"],
        "clicks": item_clicks.astype(np.float32), "impressions": item_imps.astype(np.float32),
        "ctr": ctr.astype(np.float32),
        "log_clicks_z": ((log_clicks - log_clicks.mean()) / (log_clicks.std() + 1e-9)).astype(np.float32),
    })
    return users_t, items_t


def user_arrays(users: pa.Table) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """(clicks [U], cat_share [U, C], clicked item ids per user) from a user_features table by user_id."""
    share = users.column("cat_share").combine_chunks()
    width = share.type.list_size
    lists = users.column("clicked_items").combine_chunks()
    offsets = lists.offsets.to_numpy()
    flat = lists.values.to_numpy().astype(np.int64)
    return (users.column("clicks").to_numpy().astype(np.float32),
            share.flatten().to_numpy().astype(np.float32).reshape(-1, width),
            [flat[offsets[j]:offsets[j + 1]] for j in range(len(offsets) - 1)])


NO_ITEMS = np.zeros(0, dtype=np.int64)


def list_column(table: pa.Table, name: str) -> list[np.ndarray] | None:
    """A list column as one int64 array per row (None when the table has no such column)."""
    if name not in table.column_names:
        return None
    lists = table.column(name).combine_chunks()
    offsets = lists.offsets.to_numpy()
    flat = lists.values.to_numpy().astype(np.int64)
    return [flat[offsets[j]:offsets[j + 1]] for j in range(len(offsets) - 1)]


class InProcessUsers:
    """User features held in memory (arrays indexed by user_id); ``seen`` the items to exclude per user
    (None: nothing is excluded)."""

    def __init__(self, users: pa.Table):
        self.clicks, self.share, self.items = user_arrays(users)
        self.seen = list_column(users, "seen_items")

    def exclusions(self, user_ids: np.ndarray) -> list[np.ndarray] | None:
        """The items each of ``user_ids`` must not be recommended (None when the snapshot has none)."""
        if self.seen is None:
            return None
        return [self.seen[u] if 0 <= u < len(self.seen) else NO_ITEMS for u in np.asarray(user_ids, np.int64)]

    def lookup(self, user_ids: np.ndarray):
        """(known mask, clicks, cat_share, clicked item arrays) for ``user_ids``; unknown users get zeros."""
        ids = np.asarray(user_ids, dtype=np.int64)
        known = (ids >= 0) & (ids < len(self.clicks))
        safe = np.where(known, ids, 0)
        items = [self.items[u] if k else NO_ITEMS for u, k in zip(safe, known)]
        return (known, np.where(known, self.clicks[safe], 0), np.where(known[:, None], self.share[safe], 0),
                items)


class RedisUsers:
    """User features in Redis: one key per user ``<prefix>:u:<id>``: float32 [clicks, cat_share...]
    followed by the int32 ids of the items the user clicked."""

    def __init__(self, url: str, prefix: str, num_categories: int):
        import redis

        self.client = redis.Redis.from_url(url)
        self.prefix = prefix
        self.width = num_categories + 1

    def exclusions(self, user_ids: np.ndarray) -> None:
        return None  # the Redis store carries no seen-items lists

    def publish(self, users: pa.Table, chunk: int = 5000) -> int:
        """Write every user's features (overwrites; idempotent). Returns the number of users."""
        clicks, share, items = user_arrays(users)
        rows = np.concatenate([clicks[:, None], share], axis=1).astype(np.float32)
        ids = users.column("user_id").to_numpy()
        for start in range(0, len(ids), chunk):
            pipe = self.client.pipeline(transaction=False)
            for j in range(start, min(start + chunk, len(ids))):
                pipe.set(f"{self.prefix}:u:{ids[j]}", rows[j].tobytes() + items[j].astype(np.int32).tobytes())
            pipe.execute()
        return len(ids)

    def lookup(self, user_ids: np.ndarray):
        ids = np.asarray(user_ids, dtype=np.int64)
        raw = self.client.mget([f"{self.prefix}:u:{u}" for u in ids]) if len(ids) else []
        out = np.zeros((len(ids), self.width), dtype=np.float32)
        known = np.zeros(len(ids), dtype=bool)
        items = [NO_ITEMS] * len(ids)
        head = self.width * 4
        for j, blob in enumerate(raw):
            if blob is not None:
                out[j] = np.frombuffer(blob[:head], dtype=np.float32)
                items[j] = np.frombuffer(blob[head:], dtype=np.int32).astype(np.int64)
                known[j] = True
        return known, out[:, 0], out[:, 1:], items


def redis_prefix(model_version: str) -> str:
    """Redis key prefix of the user features published for one model version."""
    return f"recsys:{model_version}"


def clicked_before(user_ids: np.ndarray, item_ids: np.ndarray, clicked: list[np.ndarray]) -> np.ndarray:
    """1.0 where the pair's user clicked the item before the snapshot (``clicked`` aligned with pairs)."""
    out = np.zeros(len(item_ids), dtype=np.float32)
    _, first, inverse = np.unique(user_ids, return_index=True, return_inverse=True)
    for g, row in enumerate(first):
        if len(clicked[row]):
            mask = inverse == g
            out[mask] = np.isin(item_ids[mask], clicked[row])
    return out


class FeatureStore:
    """Builds ranker inputs for (user, item) pairs from item arrays and a user-feature backend."""

    def __init__(self, items: pa.Table, users):
        self.users = users
        self.category = items.column("category").to_numpy().astype(np.int64)
        self.price_bucket = items.column("price_bucket").to_numpy().astype(np.int64)
        self.dense_item = np.stack([items.column(c).to_numpy() for c in ("log_clicks_z", "ctr", "price_z")],
                                   axis=1).astype(np.float32)

    @classmethod
    def from_dir(cls, folder: str, backend: str = "inprocess", redis_url: str | None = None,
                 prefix: str | None = None) -> FeatureStore:
        """Load ``<folder>/items`` and ``<folder>/users``; user rows stay in memory or come from Redis."""
        items = read_table(f"{folder}/items")
        if backend == "redis":
            width = read_table(f"{folder}/users").schema.field("cat_share").type.list_size
            users = RedisUsers(redis_url, prefix, width)
        else:
            users = InProcessUsers(read_table(f"{folder}/users"))
        return cls(items, users)

    def ranker_inputs(self, user_ids: np.ndarray, item_ids: np.ndarray,
                      retrieval_scores: np.ndarray, user_rows=None) -> tuple[np.ndarray, np.ndarray]:
        """(sparse [N, 4], dense [N, 7]) for N pairs; ``user_rows`` skips the user lookup."""
        user_ids = np.asarray(user_ids, dtype=np.int64)
        item_ids = np.asarray(item_ids, dtype=np.int64)
        known, clicks, share, clicked = user_rows if user_rows is not None else self.users.lookup(user_ids)
        cat = self.category[item_ids]
        top_cat = np.where(known & (clicks > 0), np.argmax(share, axis=1) + 1, 0)
        sparse = np.stack([top_cat, item_ids, cat, self.price_bucket[item_ids]], axis=1)
        di = self.dense_item[item_ids]
        dense = np.stack([np.asarray(retrieval_scores, dtype=np.float32), di[:, 0], di[:, 1],
                          share[np.arange(len(item_ids)), cat], np.log1p(clicks).astype(np.float32), di[:, 2],
                          clicked_before(user_ids, item_ids, clicked)],
                         axis=1).astype(np.float32)
        assert dense.shape[1] == len(DENSE_FEATURES)
        return sparse.astype(np.int64), dense


def is_validation(keys: np.ndarray, fraction: float) -> np.ndarray:
    """A stable pseudo-random split on integer keys (same key -> same side, every run)."""
    return (np.asarray(keys, dtype=np.int64) * 2654435761 % 1000) < int(fraction * 1000)


class RankerExamples:
    """Ray Data stage: impressions -> ranker rows (sparse, dense, label) as of a snapshot."""

    def __init__(self, features_dir: str, embeddings_dir: str, val_fraction: float = 0.0):
        self.store = FeatureStore.from_dir(features_dir)
        self.user_vec = embedding_matrix(read_table(f"{embeddings_dir}/user_embeddings"), "user_id")
        self.item_vec = embedding_matrix(read_table(f"{embeddings_dir}/item_embeddings"), "item_id")
        self.val_fraction = val_fraction

    def __call__(self, batch: dict) -> dict:
        users = np.asarray(batch["user_id"], dtype=np.int64)
        items = np.asarray(batch["item_id"], dtype=np.int64)
        score = np.einsum("nd,nd->n", self.user_vec[users], self.item_vec[items])
        sparse, dense = self.store.ranker_inputs(users, items, score)
        return {"user_id": users, "item_id": items, "sparse": sparse, "dense": dense,
                "label": np.asarray(batch["clicked"], dtype=np.float32),
                "is_val": is_validation(batch["impression_id"], self.val_fraction)}


class CandidateExamples(RankerExamples):
    """Ray Data stage: (user_id, clicked items in the window) -> one row per user holding the
    retriever's top ``candidates`` items as a list: sparse [C, 4], dense [C, 7], label [C]
    (clicked in the window). Users with no clicked item among their candidates are dropped.

    The ranker then learns to re-order exactly what it will see: the retriever's candidates, from
    the same index (``index``: :func:`recsys.index.index_options`), built once per actor.
    """

    def __init__(self, features_dir: str, embeddings_dir: str, candidates: int, index: dict,
                 val_fraction: float = 0.0):
        from .index import VectorIndex

        super().__init__(features_dir, embeddings_dir, val_fraction)
        self.candidates = candidates
        self.index = VectorIndex(self.item_vec, **index)

    def __call__(self, batch: dict) -> dict:
        users = np.asarray(batch["user_id"], dtype=np.int64)
        top, scores = self.index.search(self.user_vec[users], self.candidates,
                                        excluded=self.store.users.exclusions(users))
        k = top.shape[1]
        label = np.stack([np.isin(cand, np.asarray(clicked, dtype=np.int64))
                          for cand, clicked in zip(top, batch["clicked"])]).astype(np.float32)
        keep = label.sum(1) > 0
        users, top, label = users[keep], top[keep], label[keep]
        u = np.repeat(users, k)
        top = np.maximum(top, 0)  # empty slots (id -1, never labelled): item 0 at the cosine floor
        cand_scores = np.maximum(scores[keep], -1.0)
        sparse, dense = self.store.ranker_inputs(u, top.ravel(), cand_scores.ravel())
        return {"user_id": users, "items": top, "sparse": sparse.reshape(len(users), k, -1),
                "dense": dense.reshape(len(users), k, -1), "label": label,
                "is_val": is_validation(users, self.val_fraction)}


def column_matrix(column) -> np.ndarray:
    """A tensor-extension or fixed-size-list Arrow column -> 2-D float32 array."""
    arr = column.combine_chunks() if hasattr(column, "combine_chunks") else column
    if isinstance(arr.type, pa.ExtensionType):
        arr = arr.storage
    flat = arr.flatten().to_numpy(zero_copy_only=False)
    return flat.astype(np.float32).reshape(len(arr), -1)


def embedding_matrix(table: pa.Table, id_col: str) -> np.ndarray:
    """An embeddings table (id, embedding) -> [max_id + 1, d] float32, rows by id."""
    ids = table.column(id_col).to_numpy()
    flat = column_matrix(table.column("embedding"))
    out = np.zeros((int(ids.max()) + 1 if len(ids) else 0, flat.shape[1]), dtype=np.float32)
    out[ids] = flat
    return out
