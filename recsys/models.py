"""The two PyTorch models (two-tower retriever, DeepFM ranker), tokens, and model files."""
from __future__ import annotations

import io
import re
import zlib

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipelines.io import read_bytes, write_bytes

TOKEN_RE = re.compile(r"[a-z0-9]+")


def tokenize(texts, buckets: int, max_tokens: int) -> np.ndarray:
    """Texts -> [n, max_tokens] hashed token ids in 1..buckets-1 (0 pads)."""
    out = np.zeros((len(texts), max_tokens), dtype=np.int64)
    for row, text in enumerate(texts):
        toks = TOKEN_RE.findall(str(text or "").lower())[:max_tokens]
        for j, t in enumerate(toks):
            out[row, j] = 1 + zlib.crc32(t.encode()) % (buckets - 1)
    return out


def device() -> torch.device:
    """CUDA when present, else CPU (same code path)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class TwoTower(nn.Module):
    """User/query tower and item tower sharing the token embedding; outputs are unit vectors.

    User index 0 is the anonymous user (search without a user id).
    """

    def __init__(self, num_users: int, num_items: int, num_categories: int, item_category: np.ndarray,
                 item_tokens: np.ndarray, vocab_buckets: int, embed_dim: int, hidden: int):
        super().__init__()
        self.user_emb = nn.Embedding(num_users + 1, embed_dim)
        self.tok_emb = nn.EmbeddingBag(vocab_buckets, embed_dim, mode="mean", padding_idx=0)
        self.item_emb = nn.Embedding(num_items, embed_dim)
        self.cat_emb = nn.Embedding(num_categories, embed_dim)
        self.query_mlp = nn.Sequential(nn.Linear(2 * embed_dim, hidden), nn.ReLU(), nn.Linear(hidden, embed_dim))
        self.item_mlp = nn.Sequential(nn.Linear(3 * embed_dim, hidden), nn.ReLU(), nn.Linear(hidden, embed_dim))
        self.register_buffer("item_category", torch.as_tensor(item_category, dtype=torch.long))
        self.register_buffer("item_tokens", torch.as_tensor(item_tokens, dtype=torch.long))

    def query_vec(self, user_index: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """``user_index`` is user_id + 1 (0 = anonymous); ``tokens`` [B, L] (all 0 = no query)."""
        x = torch.cat([self.user_emb(user_index), self.tok_emb(tokens)], dim=1)
        return F.normalize(self.query_mlp(x), dim=1)

    def forward(self, user_index: torch.Tensor, tokens: torch.Tensor, item_ids: torch.Tensor):
        """(query vectors, item vectors) for a batch of positive pairs (DDP runs through forward)."""
        return self.query_vec(user_index, tokens), self.item_vec(item_ids)

    def item_vec(self, item_ids: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.item_emb(item_ids), self.cat_emb(self.item_category[item_ids]),
                       self.tok_emb(self.item_tokens[item_ids])], dim=1)
        return F.normalize(self.item_mlp(x), dim=1)


def in_batch_softmax_loss(q: torch.Tensor, v: torch.Tensor, item_ids: torch.Tensor, temperature: float,
                          log_q: torch.Tensor | None = None) -> torch.Tensor:
    """Sampled softmax with the batch's other items as negatives (same item masked).

    ``log_q`` (log sampling probability per item in the batch) applies the logQ correction.
    """
    logits = q @ v.T / temperature
    if log_q is not None:
        logits = logits - log_q[None, :]
    same = item_ids[:, None] == item_ids[None, :]
    eye = torch.eye(len(item_ids), dtype=torch.bool, device=q.device)
    logits = logits.masked_fill(same & ~eye, float("-inf"))
    return F.cross_entropy(logits, torch.arange(len(item_ids), device=q.device))


# ----------------------------------------------------------------- ranker
SPARSE_FIELDS = ("user_top_category", "item", "category", "price_bucket")
DENSE_FEATURES = ("retrieval_score", "item_log_clicks_z", "item_ctr", "user_cat_share", "user_log_clicks",
                  "price_z", "user_clicked_item")


class DeepFM(nn.Module):
    """DeepFM: first-order + FM pairwise crosses over sparse field embeddings + an MLP over
    the embeddings and dense features; one logit per (user, item) row."""

    def __init__(self, field_sizes: list[int], num_dense: int, embed_dim: int, hidden: list[int]):
        super().__init__()
        offsets = np.concatenate([[0], np.cumsum(field_sizes)[:-1]])
        self.register_buffer("offsets", torch.as_tensor(offsets, dtype=torch.long))
        total = int(sum(field_sizes))
        self.emb = nn.Embedding(total, embed_dim)
        self.first = nn.Embedding(total, 1)
        self.dense_linear = nn.Linear(num_dense, 1)
        layers, width = [], len(field_sizes) * embed_dim + num_dense
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.mlp = nn.Sequential(*layers, nn.Linear(width, 1))
        nn.init.normal_(self.emb.weight, std=0.05)
        nn.init.zeros_(self.first.weight)

    def forward(self, sparse: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """``sparse`` [..., F] field ids, ``dense`` [..., D] -> logits [...]."""
        lead = sparse.shape[:-1]
        sparse, dense = sparse.reshape(-1, sparse.shape[-1]), dense.reshape(-1, dense.shape[-1])
        idx = sparse + self.offsets
        e = self.emb(idx)  # [B, F, k]
        fm = 0.5 * (e.sum(1).pow(2) - e.pow(2).sum(1)).sum(1)
        logit = self.first(idx).sum((1, 2)) + self.dense_linear(dense).squeeze(1) + fm
        logit = logit + self.mlp(torch.cat([e.flatten(1), dense], dim=1)).squeeze(1)
        return logit.reshape(lead)


def listwise_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy over each user's candidate list [B, C], positives sharing the target."""
    target = labels / labels.sum(1, keepdim=True).clamp_min(1e-9)
    return -(target * torch.log_softmax(logits, dim=1)).sum(1).mean()


# ------------------------------------------------------------- model files
def save_model(model: nn.Module, kwargs: dict, uri: str, **meta) -> str:
    """Save ``{"kwargs", "state", **meta}`` to a local path or object-store URI."""
    buf = io.BytesIO()
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"kwargs": kwargs, "state": state, **meta}, buf)
    return write_bytes(uri, buf.getvalue())


def load_model(cls, uri: str, map_location="cpu") -> tuple[nn.Module, dict]:
    """Load a model saved by :func:`save_model` from a local path or object-store URI (read where this
    runs: a Ray worker reads the URI itself); returns (model in eval mode, the saved dict)."""
    blob = torch.load(io.BytesIO(read_bytes(uri)), map_location=map_location, weights_only=False)
    model = cls(**blob["kwargs"])
    model.load_state_dict(blob["state"])
    return model.eval(), blob
