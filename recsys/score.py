"""Retrieve-then-rank for a batch of users: used by evaluation, batch recommendations and Serve.

``Retriever`` holds the item index, user vectors and the query tower; ``RankerScorer``
holds the DeepFM ranker; ``Recommender`` chains them with a ``FeatureStore``.
"""
from __future__ import annotations

import numpy as np

from pipelines.io import read_table

from .config import RetrievalConfig
from .features import FeatureStore, embedding_matrix
from .index import VectorIndex, index_options
from .models import DeepFM, TwoTower, device, load_model, tokenize
from .ranking import MODEL_FILE as RANKER_FILE
from .retrieval import MODEL_FILE as RETRIEVER_FILE


class Retriever:
    """Candidates for users (precomputed user vectors) or queries (query tower), with item filters."""

    def __init__(self, run_dir: str, r: RetrievalConfig):
        import torch

        self.torch = torch
        self.item_vec = embedding_matrix(read_table(f"{run_dir}/item_embeddings"), "item_id")
        self.user_vec = embedding_matrix(read_table(f"{run_dir}/user_embeddings"), "user_id")
        self.index = VectorIndex(self.item_vec, **index_options(r))  # built once per actor / replica
        self.model = load_model(TwoTower, f"{run_dir}/{RETRIEVER_FILE}")[0]
        self.buckets, self.max_tokens = r.vocab_buckets, r.max_tokens
        items = read_table(f"{run_dir}/items", columns=["category", "price"])
        self.category = items.column("category").to_numpy()
        self.price = items.column("price").to_numpy()

    def known(self, user_ids) -> np.ndarray:
        ids = np.asarray(user_ids, dtype=np.int64)
        return (ids >= 0) & (ids < len(self.user_vec))

    def query_vectors(self, user_ids, queries) -> np.ndarray:
        """Query-tower vectors for texts; unknown or missing users search anonymously."""
        ids = np.asarray([u if u is not None else -1 for u in user_ids], dtype=np.int64)
        index = np.where(self.known(ids), ids + 1, 0)
        toks = tokenize(queries, self.buckets, self.max_tokens)
        with self.torch.no_grad():
            vec = self.model.query_vec(self.torch.as_tensor(index), self.torch.as_tensor(toks))
        return vec.numpy()

    def allowed(self, categories=None, max_price=None) -> np.ndarray | None:
        """Item mask for filters (None when no filter is set)."""
        if not categories and max_price is None:
            return None
        mask = np.ones(len(self.category), dtype=bool)
        if categories:
            mask &= np.isin(self.category, list(categories))
        if max_price is not None:
            mask &= self.price <= max_price
        return mask

    def for_users(self, user_ids, n: int, allowed=None, excluded=None):
        """(item ids [B, n], cosine scores [B, n]) for known user ids; ``excluded``: item ids per user
        never returned (items the user already interacted with). Empty slots: id -1, score -inf."""
        return self.index.search(self.user_vec[np.asarray(user_ids, dtype=np.int64)], n, allowed, excluded)

    def for_queries(self, user_ids, queries, n: int, allowed=None):
        return self.index.search(self.query_vectors(user_ids, queries), n, allowed)


class RankerScorer:
    """DeepFM logits for (sparse, dense) rows; no position term (serving sees no slate position)."""

    def __init__(self, run_dir: str):
        import torch

        self.torch, self.dev = torch, device()
        self.model, blob = load_model(DeepFM, f"{run_dir}/{RANKER_FILE}")
        self.model.to(self.dev)
        self.version = blob.get("version", "unknown")

    def __call__(self, sparse: np.ndarray, dense: np.ndarray) -> np.ndarray:
        with self.torch.no_grad():
            out = self.model(self.torch.as_tensor(sparse, device=self.dev),
                             self.torch.as_tensor(dense, device=self.dev))
        return out.float().cpu().numpy()


class Recommender:
    """Top-k per user: retrieve ``candidates`` items, score them with the ranker, sort."""

    def __init__(self, run_dir: str, r: RetrievalConfig, features: str = "serve"):
        self.retriever = Retriever(run_dir, r)
        self.store = FeatureStore.from_dir(f"{run_dir}/features/{features}")
        self.ranker = RankerScorer(run_dir)
        self.candidates = r.candidates

    def rank(self, user_ids, cand: np.ndarray, cand_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Re-order candidate rows [B, C] by ranker score; returns (ids, scores) best first."""
        b, c = cand.shape
        users = np.repeat(np.asarray(user_ids, dtype=np.int64), c)
        sparse, dense = self.store.ranker_inputs(users, np.maximum(cand, 0).ravel(), cand_scores.ravel())
        scores = self.ranker(sparse, dense).reshape(b, c)
        scores = np.where(np.isfinite(cand_scores), scores, -np.inf)  # empty slots (id -1) stay last
        order = np.argsort(-scores, axis=1, kind="stable")
        return np.take_along_axis(cand, order, axis=1), np.take_along_axis(scores, order, axis=1)

    def exclusions(self, user_ids) -> list[np.ndarray] | None:
        """Items each user must not get (seen before the snapshot; None when the data allows repeats)."""
        return self.store.users.exclusions(user_ids) if hasattr(self.store.users, "exclusions") else None

    def recommend(self, user_ids, k: int) -> tuple[np.ndarray, np.ndarray]:
        cand, cs = self.retriever.for_users(user_ids, max(self.candidates, k), excluded=self.exclusions(user_ids))
        ids, scores = self.rank(user_ids, cand, cs)
        return ids[:, :k], scores[:, :k]
