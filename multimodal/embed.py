"""Embedding stages: one transformers encoder per modality, run in a Ray Data actor pool.

``model: builtin`` builds a small encoder from a transformers config with a fixed seed, so
the template runs offline with deterministic (untrained) weights; set ``model`` to a hub id,
a local path or an ``oss://``/``s3://`` folder for production (see docs/multimodal.md). On CUDA the encoder runs in
bf16/fp16 under ``torch.inference_mode``; on CPU the same code runs in fp32.
"""
from __future__ import annotations

import re
import tempfile
import time
import zlib

import numpy as np

from .batches import ok_mask
from .config import EmbedConfig

INPUT_COLUMNS = {"images": "pixels", "video": "frames", "audio": "logmel", "text": "text"}
TOKEN_RE = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af]|\w+", re.UNICODE)
VOCAB = 30522


def hash_tokenize(texts: list[str], max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Offline tokenizer for the builtin text model: words (CJK: characters) hashed with
    CRC32 into a fixed vocabulary; id 1 is [CLS], 0 is padding. Returns ids and mask."""
    ids = np.zeros((len(texts), max_tokens), np.int64)
    for i, text in enumerate(texts):
        toks = [1] + [2 + zlib.crc32(t.lower().encode()) % (VOCAB - 2) for t in TOKEN_RE.findall(text)]
        toks = toks[:max_tokens]
        ids[i, :len(toks)] = toks
    return ids, (ids > 0).astype(np.int64)


def builtin_model(modality: str, cfg: EmbedConfig, input_shape: tuple):
    """A small randomly initialised (seeded) transformers encoder for ``modality``."""
    import torch
    from transformers import ASTConfig, ASTModel, BertConfig, BertModel, ViTConfig, ViTModel

    torch.manual_seed(cfg.seed)
    common = {"hidden_size": cfg.dim, "num_hidden_layers": cfg.layers, "num_attention_heads": cfg.heads,
              "intermediate_size": cfg.dim * 2}
    if modality in ("images", "video"):
        size = input_shape[-2]
        patch = 16 if size % 16 == 0 else 8
        return ViTModel(ViTConfig(image_size=size, patch_size=patch, **common), add_pooling_layer=False)
    if modality == "audio":
        frames, mels = input_shape[-2], input_shape[-1]
        return ASTModel(ASTConfig(num_mel_bins=mels, max_length=frames, **common))
    if modality == "text":
        return BertModel(BertConfig(vocab_size=VOCAB, max_position_embeddings=input_shape[-1] + 2,
                                    **common), add_pooling_layer=False)
    raise ValueError(f"no builtin encoder for modality {modality!r}")


def pick_device_dtype(setting: str):
    """CUDA when available (bf16 by default), else CPU in float32."""
    import torch

    if torch.cuda.is_available():
        dtypes = {"auto": torch.bfloat16, "float16": torch.float16, "bfloat16": torch.bfloat16,
                  "float32": torch.float32}
        return "cuda", dtypes[setting]
    return "cpu", torch.float32


def _pool(output, mask=None):
    """Pooled vector: ``pooler_output`` when the model has one, else CLS / masked mean."""
    pooled = getattr(output, "pooler_output", None)
    if pooled is not None:
        return pooled
    hidden = output.last_hidden_state
    if mask is not None:
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1)
    return hidden[:, 0]


def load_pretrained(model: str, tokenizer: bool):
    """``(model, tokenizer or None)`` from a hub id, a local folder, or an ``oss://``/``s3://``
    folder (copied through :mod:`pipelines.io` into a temp folder on this node, the actor's,
    and loaded from there: a folder on the driver's disk is not visible to the workers)."""
    from transformers import AutoModel, AutoTokenizer

    from pipelines.io import download_dir, is_remote

    if is_remote(model):
        with tempfile.TemporaryDirectory(prefix="mm-model-") as tmp:
            return load_pretrained(download_dir(model, tmp), tokenizer)
    return AutoModel.from_pretrained(model), AutoTokenizer.from_pretrained(model) if tokenizer else None


class Embedder:
    """``map_batches`` actor: replaces the modality's input column with ``embedding``.

    Rows with a non-empty ``reason`` (already rejected) get a zero vector and no model time.
    """

    def __init__(self, modality: str, cfg: dict, input_shape: tuple, max_tokens: int = 128,
                 num_threads: int = 1):
        import torch

        self.modality, self.cfg = modality, EmbedConfig(**cfg)
        self.column = INPUT_COLUMNS[modality]
        self.max_tokens = max_tokens
        self.device, self.dtype = pick_device_dtype(self.cfg.dtype)
        if self.device == "cpu":
            torch.set_num_threads(max(1, num_threads))
        self.tokenizer = None
        if self.cfg.model == "builtin":
            self.model = builtin_model(modality, self.cfg, input_shape)
        else:
            self.model, self.tokenizer = load_pretrained(self.cfg.model, modality == "text")
        self.model = self.model.to(self.device, self.dtype).eval()
        self.dim = int(self.model.config.hidden_size)
        if self.dim != self.cfg.dim:
            raise ValueError(f"{modality}.embed.dim is {self.cfg.dim} but model {self.cfg.model!r} "
                             f"gives {self.dim}-dim embeddings: set {modality}.embed.dim={self.dim}")

    def encode(self, x) -> np.ndarray:
        """Embed a list/array of inputs of this modality -> ``(n, dim)`` float32."""
        import torch

        with torch.inference_mode():
            if self.modality == "text":
                return self._encode_text(list(x))
            arr = np.asarray(x)
            if self.modality == "video":  # (n, k, s, s, 3): embed frames, mean per clip
                n, k = arr.shape[:2]
                frames = self._encode_pixels(arr.reshape((n * k,) + arr.shape[2:]))
                return frames.reshape(n, k, -1).mean(1)
            if self.modality == "images":
                return self._encode_pixels(arr)
            values = torch.from_numpy(np.ascontiguousarray(arr, np.float32)).to(self.device, self.dtype)
            return _pool(self.model(input_values=values)).float().cpu().numpy()

    def _encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        import torch

        t = torch.from_numpy(np.ascontiguousarray(pixels)).to(self.device)
        t = t.permute(0, 3, 1, 2).to(self.dtype).div_(127.5).sub_(1.0)  # [-1, 1], NCHW
        return _pool(self.model(pixel_values=t)).float().cpu().numpy()

    def _encode_text(self, texts: list[str]) -> np.ndarray:
        import torch

        if self.tokenizer is not None:
            enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_tokens,
                                 return_tensors="pt")
            ids, mask = enc["input_ids"], enc["attention_mask"]
        else:
            ids_np, mask_np = hash_tokenize(texts, self.max_tokens)
            ids, mask = torch.from_numpy(ids_np), torch.from_numpy(mask_np)
        ids, mask = ids.to(self.device), mask.to(self.device)
        return _pool(self.model(input_ids=ids, attention_mask=mask), mask).float().cpu().numpy()

    def __call__(self, batch: dict) -> dict:
        start = time.perf_counter()
        x = batch[self.column] if self.modality == "text" else batch.pop(self.column)
        n = len(x)
        ok = ok_mask(batch["reason"]) if "reason" in batch else np.ones(n, bool)
        emb = np.zeros((n, self.dim), np.float32)
        if ok.any():
            idx = np.flatnonzero(ok)
            emb[idx] = self.encode([x[i] for i in idx] if self.modality == "text" else np.asarray(x)[idx])
        batch["embedding"] = emb
        batch["embed_s"] = np.full(n, (time.perf_counter() - start) / max(n, 1), np.float32)
        return batch


def embed_stage(ds, modality: str, cfg: EmbedConfig, input_shape: tuple, max_tokens: int = 128):
    """Append the embedding actor-pool stage for ``modality`` to a lazy dataset (unchanged when
    embedding is disabled: the decoders then do not emit the model input)."""
    import ray

    if not cfg.enabled:
        return ds
    return ds.map_batches(
        Embedder,
        fn_constructor_kwargs={"modality": modality, "cfg": cfg.model_dump(), "input_shape": tuple(input_shape),
                               "max_tokens": max_tokens, "num_threads": max(1, int(cfg.num_cpus))},
        compute=ray.data.ActorPoolStrategy(min_size=cfg.min_actors, max_size=max(cfg.min_actors, cfg.max_actors)),
        batch_size=cfg.batch_size, batch_format="numpy",
        num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus or None,
    )
