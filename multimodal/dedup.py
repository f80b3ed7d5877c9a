"""Dataset-wide duplicate grouping: exact (content hash) plus near duplicates.

Near-duplicate candidates come from banding (locality-sensitive hashing), so only items
that share a band are compared: perceptual hashes split into ``t + 1`` bands (pigeonhole:
two hashes within Hamming distance ``t`` agree on at least one band), MinHash signatures
split into bands of rows chosen for the Jaccard threshold (:func:`lsh_params`). Every item gets a group; a group's representative is its first
member in sorted key order, so reruns on the same input give the same groups.
"""
from __future__ import annotations

import zlib
from collections import defaultdict
from functools import lru_cache
from itertools import pairwise

import numpy as np

MINHASH_PRIME = 4294967291  # largest prime < 2**32: a * h + b stays below 2**64


class UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:  # the smaller index (earlier in sorted order) stays the root
            self.parent[max(ra, rb)] = min(ra, rb)


def _bucket_pairs(keys: np.ndarray):
    """Yield index arrays of items sharing a band key (buckets of size >= 2)."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    cuts = np.flatnonzero(np.diff(sorted_keys)) + 1
    for bucket in np.split(order, cuts):
        if len(bucket) > 1:
            yield bucket


def group(keys: list[str], content_hashes: list[str], near_pairs) -> dict:
    """Union exact duplicates and the given near pairs; returns per-item columns
    ``dup_group`` (index of the group's representative), ``dup_of`` and ``dup_kind``."""
    order = sorted(range(len(keys)), key=lambda i: keys[i])
    rank = {i: r for r, i in enumerate(order)}
    uf = UnionFind(len(keys))
    first_with_hash: dict[str, int] = {}
    for i in order:
        h = content_hashes[i]
        if h in first_with_hash:
            uf.union(rank[first_with_hash[h]], rank[i])
        else:
            first_with_hash[h] = i
    for a, b in near_pairs:
        uf.union(rank[a], rank[b])
    dup_group, dup_of, dup_kind = [0] * len(keys), [None] * len(keys), [None] * len(keys)
    seen_hashes: dict[int, set] = defaultdict(set)
    for i in order:
        root = uf.find(rank[i])
        dup_group[i] = root
        rep = order[root]
        if rep != i:
            dup_of[i] = keys[rep]
            dup_kind[i] = "exact" if content_hashes[i] in seen_hashes[root] else "near"
        seen_hashes[root].add(content_hashes[i])
    return {"dup_group": dup_group, "dup_of": dup_of, "dup_kind": dup_kind}


# ------------------------------------------------------------------ images (pHash)
def phash_near_pairs(hashes: list[int], max_distance: int):
    """Pairs ``(i, j)`` of 64-bit hashes within ``max_distance`` bits (banded candidates)."""
    if max_distance <= 0 or len(hashes) < 2:
        return []
    arr = np.array(hashes, dtype=np.uint64)
    bands = min(max_distance + 1, 64)
    edges = np.linspace(0, 64, bands + 1).astype(int)
    pairs = set()
    for lo, hi in pairwise(edges):
        mask = np.uint64((1 << (hi - lo)) - 1)
        keys = (arr >> np.uint64(lo)) & mask
        for bucket in _bucket_pairs(keys):
            sub = arr[bucket]
            dist = np.bitwise_count(sub[:, None] ^ sub[None, :])
            ii, jj = np.nonzero(np.triu(dist <= max_distance, k=1))
            pairs.update(zip(bucket[ii].tolist(), bucket[jj].tolist()))
    return sorted(pairs)


def group_images(paths: list[str], sha256: list[str], phashes_hex: list[str], max_distance: int) -> dict:
    """Exact (sha256) and near (pHash Hamming <= ``max_distance``) image groups."""
    hashes = [int(h, 16) for h in phashes_hex]
    return group(paths, sha256, phash_near_pairs(hashes, max_distance))


# ------------------------------------------------------------------ text (MinHash)
def shingles(text: str, k: int) -> set[str]:
    """Word k-shingles (CJK text, which has no spaces: character k-grams)."""
    words = text.split()
    if len(words) <= 1 and len(text) > k:
        return {text[i:i + k] for i in range(len(text) - k + 1)}
    if len(words) < k:
        return {" ".join(words)} if words else set()
    return {" ".join(words[i:i + k]) for i in range(len(words) - k + 1)}


def minhash(text: str, k: int = 3, num_perm: int = 64, seed: int = 1) -> np.ndarray:
    """MinHash signature (``num_perm`` uint64 values) of the text's shingles."""
    rng = np.random.default_rng(seed)
    a = rng.integers(1, MINHASH_PRIME, num_perm, dtype=np.uint64)
    b = rng.integers(0, MINHASH_PRIME, num_perm, dtype=np.uint64)
    sh = shingles(text, k)
    if not sh:
        return np.full(num_perm, MINHASH_PRIME, np.uint64)
    h = np.array([zlib.crc32(s.encode()) for s in sh], dtype=np.uint64)
    h = h % np.uint64(MINHASH_PRIME)
    prod = (a[:, None] * h[None, :] + b[:, None]) % np.uint64(MINHASH_PRIME)
    return prod.min(axis=1)


# Candidates are verified against the threshold, so a false positive costs one comparison while a
# false negative loses a duplicate: misses weigh more (with 64 permutations this keeps the candidate
# probability at the threshold >= 0.95 for thresholds 0.3-0.9, and 16 bands of 4 rows at 0.7).
FALSE_POSITIVE_WEIGHT, FALSE_NEGATIVE_WEIGHT = 0.02, 0.98


@lru_cache
def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """``(bands, rows)`` of MinHash LSH for Jaccard ``threshold``, as datasketch's optimal-param
    search: minimise the weighted false-positive area (candidate probability ``1 - (1 - s**rows)
    **bands`` below the threshold) plus false-negative area (its complement above)."""
    below, above = np.linspace(0, threshold, 201), np.linspace(threshold, 1, 201)

    def error(bands: int, rows: int) -> float:
        fp = np.trapezoid(1 - (1 - below**rows) ** bands, below)
        fn = np.trapezoid((1 - above**rows) ** bands, above)
        return FALSE_POSITIVE_WEIGHT * fp + FALSE_NEGATIVE_WEIGHT * fn

    return min(((b, r) for b in range(1, num_perm + 1) for r in range(1, num_perm // b + 1)),
               key=lambda p: error(*p))


def minhash_near_pairs(signatures: np.ndarray, threshold: float):
    """Pairs whose estimated Jaccard similarity (signature agreement) is >= ``threshold``;
    candidates share a band (bands and rows from :func:`lsh_params`)."""
    n, num_perm = signatures.shape if len(signatures) else (0, 0)
    if n < 2:
        return []
    bands, rows = lsh_params(float(threshold), num_perm)
    pairs = set()
    for band in range(bands):
        part = signatures[:, band * rows:(band + 1) * rows]
        keys = np.array([zlib.crc32(r.tobytes()) for r in part], dtype=np.uint64)
        for bucket in _bucket_pairs(keys):
            sub = signatures[bucket]
            sim = (sub[:, None, :] == sub[None, :, :]).mean(-1)
            ii, jj = np.nonzero(np.triu(sim >= threshold, k=1))
            pairs.update(zip(bucket[ii].tolist(), bucket[jj].tolist()))
    return sorted(pairs)
