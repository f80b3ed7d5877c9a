"""Top-k inner-product search over item vectors with faiss: exact, or IVF beyond a catalogue size.

Up to ``retrieval.exact_max_items`` items the index is exact (``IndexFlatIP``: blocked BLAS with a
top-k heap, memory O(batch x k)); beyond, it is ``IndexIVFFlat`` (``ivf_lists`` k-means cells, the
``ivf_probe`` nearest searched; both default from the catalogue size). Build one per process
(a Ray Data actor, a Serve replica): training the IVF cells costs seconds at a million items.
"""
from __future__ import annotations

import math

import numpy as np

INDEX_KEYS = ("exact_max_items", "ivf_lists", "ivf_probe")


def index_options(r) -> dict:
    """The index settings of a ``RetrievalConfig`` as ``VectorIndex`` keyword arguments."""
    return {key: getattr(r, key) for key in INDEX_KEYS}


def ivf_shape(n: int, lists: int | None = None, probe: int | None = None) -> tuple[int, int]:
    """(cells, cells probed) for ``n`` items: by default ~sqrt(n) cells (at least 39 items each,
    faiss's k-means minimum), a sixteenth of them probed (at least 8)."""
    lists = min(lists, n) if lists else max(1, min(round(math.sqrt(n)), n // 39))
    probe = min(probe or max(8, math.ceil(lists / 16)), lists)
    return lists, probe


class VectorIndex:
    """faiss index over item vectors (row = item id): exact up to ``exact_max_items`` items, IVF beyond."""

    def __init__(self, vectors: np.ndarray, exact_max_items: int = 1_000_000, ivf_lists: int | None = None,
                 ivf_probe: int | None = None, seed: int = 0):
        import faiss

        self.faiss = faiss
        x = np.ascontiguousarray(vectors, dtype=np.float32)
        self.n, d = x.shape
        self.kind = "exact" if self.n <= exact_max_items else "ivf"
        if self.kind == "exact":
            self.index = faiss.IndexFlatIP(d)
        else:
            lists, self.probe = ivf_shape(self.n, ivf_lists, ivf_probe)
            self.index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, lists, faiss.METRIC_INNER_PRODUCT)
            self.index.cp.seed = seed
            self.index.train(x)
            self.index.nprobe = self.probe
        self.index.add(x)

    def _params(self, allowed: np.ndarray | None):
        """Search parameters restricting results to the ``allowed`` items (None: no restriction)."""
        if allowed is None:
            return None, None
        bits = np.packbits(np.asarray(allowed, dtype=bool), bitorder="little")
        sel = self.faiss.IDSelectorBitmap(self.n, self.faiss.swig_ptr(bits))
        if self.kind == "ivf":
            return self.faiss.SearchParametersIVF(sel=sel, nprobe=self.probe), (bits, sel)
        return self.faiss.SearchParameters(sel=sel), (bits, sel)

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None,
               excluded: list[np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids [B, k], scores [B, k]) best first, k capped at the catalogue size. ``allowed`` is a
        bool mask over items, ``excluded`` the item ids each query row must not get. Slots left
        without an item (too few allowed, or IVF's probed cells ran out) hold id -1, score -inf."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        k = min(k, self.n)
        if k == 0 or not len(q):
            return np.zeros((len(q), k), np.int64), np.zeros((len(q), k), np.float32)
        extra = max((len(e) for e in excluded), default=0) if excluded is not None else 0
        params, _keep = self._params(allowed)  # the bitmap must outlive the search
        scores, ids = self.index.search(q, min(k + extra, self.n), params=params)
        drop = ids < 0
        if extra:
            rows = np.repeat(np.arange(len(q)), [len(e) for e in excluded])
            pairs = rows * self.n + np.concatenate(excluded).astype(np.int64)
            drop |= np.isin(np.arange(len(q))[:, None] * self.n + ids, pairs)
            order = np.argsort(drop, axis=1, kind="stable")[:, :k]  # kept results first, still best first
            ids, scores, drop = (np.take_along_axis(a, order, axis=1) for a in (ids, scores, drop))
        return np.where(drop, -1, ids), np.where(drop, -np.inf, scores).astype(np.float32)
