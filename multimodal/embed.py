"""Embedding stages: one transformers encoder per modality, run in a Ray Data actor pool.

``model: builtin`` builds a small encoder from a transformers config with a fixed seed, so
the template runs offline with deterministic (untrained) weights, fed by hand-made inputs
(pixels scaled to [-1, 1], the decoder's log-mel, a hashing tokenizer). Set ``model`` to a hub
id, a local path or an ``oss://``/``s3://`` folder for production (see docs/multimodal.md): the
model then gets its own preprocessing (``AutoImageProcessor``, ``AutoFeatureExtractor`` over
the 16 kHz wave, ``AutoTokenizer``) and its own pooling (:func:`pooling_of`). On CUDA the
encoder runs in bf16/fp16 under ``torch.inference_mode``; on CPU the same code runs in fp32.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
import time
import zlib

import numpy as np

from .batches import ok_mask
from .config import EmbedConfig

INPUT_COLUMNS = {"images": "pixels", "video": "frames", "audio": "logmel", "text": "text"}
HUB_INPUT_COLUMNS = {**INPUT_COLUMNS, "audio": "wave"}  # a hub audio model's extractor reads the wave
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


def input_column(modality: str, model: str) -> str:
    """The column the decoder fills with the encoder's input (``wave`` for a hub audio model)."""
    return (INPUT_COLUMNS if model == "builtin" else HUB_INPUT_COLUMNS)[modality]


def pool(output, mode: str, mask=None):
    """One vector per input from a model's output: ``pooler`` (its ``pooler_output``; without one,
    CLS), ``pooler_or_mean`` (without one, the mean), ``cls`` (the first token) or ``mean`` (over
    the ``mask``'s tokens, or all)."""
    pooled = getattr(output, "pooler_output", None) if mode.startswith("pooler") else None
    if pooled is not None:
        return pooled
    hidden = output.last_hidden_state
    if mode in ("mean", "pooler_or_mean"):
        if mask is None:
            return hidden.mean(1)
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1)
    return hidden[:, 0]


def _model_json(model: str, name: str):
    """A JSON file of a model folder or hub id (from the hub cache), or None when it has none."""
    if os.path.isdir(model):
        path = os.path.join(model, name)
        path = path if os.path.isfile(path) else None
    else:
        from transformers.utils import cached_file

        path = cached_file(model, name, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False)
    if path is None:
        return None
    with open(path) as f:
        return json.load(f)


def pooling_of(model: str, modality: str) -> tuple[str, bool]:
    """``(mode, l2_normalise)`` of a pretrained model (see :func:`pool`). Text: the model's
    sentence-transformers config when it ships one (``modules.json``: its Pooling module's
    ``pooling_mode_cls_token``/``pooling_mode_mean_tokens``, and a Normalize module means L2), else
    mean over the tokens, not normalised. Images, video, audio: the model's ``pooler_output`` when it
    has one, else CLS (vision) or the mean over time (audio); not normalised."""
    if modality != "text":
        return ("pooler" if modality in ("images", "video") else "pooler_or_mean"), False
    modules = _model_json(model, "modules.json") or []
    normalise = any(str(m.get("type", "")).endswith("Normalize") for m in modules)
    folder = next((m.get("path") for m in modules if str(m.get("type", "")).endswith("Pooling")), None)
    cfg = (_model_json(model, f"{folder}/config.json") if folder else None) or {}
    if cfg.get("pooling_mode_cls_token"):
        return "cls", normalise
    if cfg.get("pooling_mode_mean_tokens", True):
        return "mean", normalise
    used = [k for k, v in cfg.items() if k.startswith("pooling_mode") and v]
    raise ValueError(f"model {model!r}: sentence-transformers pooling {used} is not supported "
                     "(cls or mean tokens are): set text.embed.pooling")


def pixel_scaling(processor) -> tuple[float, list, list] | None:
    """``(rescale_factor, mean, std)`` an image processor applies (identity where its flags are off),
    or None when it has no such attributes."""
    if not hasattr(processor, "do_normalize") or not hasattr(processor, "do_rescale"):
        return None
    scale = float(processor.rescale_factor) if processor.do_rescale else 1.0
    mean, std = (processor.image_mean, processor.image_std) if processor.do_normalize else (0.0, 1.0)
    mean, std = (np.broadcast_to(np.asarray(v, np.float32), (3,)).tolist() for v in (mean, std))
    return scale, mean, std


def scale_pixels(pixels: np.ndarray, scale: float, mean: list, std: list, device):
    """uint8 NHWC pixels -> float32 NCHW ``(x * scale - mean) / std`` on ``device``."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(pixels)).to(device).permute(0, 3, 1, 2).float()
    m, sd = (torch.tensor(v, dtype=torch.float32, device=device).view(1, 3, 1, 1) for v in (mean, std))
    return (t * scale - m) / sd


def load_pretrained(model: str, modality: str):
    """``(model, preprocessor, (pooling, normalise))`` from a hub id, a local folder, or an
    ``oss://``/``s3://`` folder (copied through :mod:`pipelines.io` into a temp folder on this node,
    the actor's, and loaded from there: a folder on the driver's disk is not visible to the workers).
    The preprocessor is the model's own: tokenizer (text), image processor (images, video), feature
    extractor (audio). An encoder-decoder (Whisper) gives its encoder."""
    from transformers import AutoFeatureExtractor, AutoImageProcessor, AutoModel, AutoTokenizer

    from pipelines.io import download_dir, is_remote

    if is_remote(model):
        with tempfile.TemporaryDirectory(prefix="mm-model-") as tmp:
            return load_pretrained(download_dir(model, tmp), modality)
    loader = {"text": AutoTokenizer, "audio": AutoFeatureExtractor}.get(modality, AutoImageProcessor)
    net = AutoModel.from_pretrained(model)
    if getattr(net.config, "is_encoder_decoder", False):
        net = net.get_encoder()
    try:
        processor = loader.from_pretrained(model)
    except (OSError, ValueError):
        raise ValueError(f"{modality}.embed.model {model!r} has no {loader.__name__[4:]} of its own: save "
                         "the model's processor (save_pretrained) next to its weights") from None
    return net, processor, pooling_of(model, modality)


class Embedder:
    """``map_batches`` actor: replaces the modality's input column with ``embedding``.

    Rows with a non-empty ``reason`` (already rejected) get a zero vector and no model time.
    ``sample_rate`` is the rate of the decoder's ``wave`` (a hub audio model's input).
    """

    def __init__(self, modality: str, cfg: dict, input_shape: tuple, max_tokens: int = 128,
                 num_threads: int = 1, sample_rate: int = 16000):
        import torch

        self.modality, self.cfg = modality, EmbedConfig(**cfg)
        self.column = input_column(modality, self.cfg.model)
        self.max_tokens, self.rate = max_tokens, sample_rate
        self.device, self.dtype = pick_device_dtype(self.cfg.dtype)
        if self.device == "cpu":
            torch.set_num_threads(max(1, num_threads))
        self.processor, self.scaling = None, None
        if self.cfg.model == "builtin":
            self.model = builtin_model(modality, self.cfg, input_shape)
            pooling = ("mean" if modality == "text" else "pooler"), False
        else:
            self.model, self.processor, pooling = load_pretrained(self.cfg.model, modality)
        self.pooling = pooling[0] if self.cfg.pooling == "auto" else self.cfg.pooling
        self.normalise = pooling[1] if self.cfg.normalize is None else self.cfg.normalize
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
                emb = self._encode_text(list(x))
            elif self.modality == "video":  # (n, k, s, s, 3): embed frames, mean per clip
                arr = np.asarray(x)
                n, k = arr.shape[:2]
                emb = self._encode_pixels(arr.reshape((n * k,) + arr.shape[2:])).reshape(n, k, -1).mean(1)
            elif self.modality == "images":
                emb = self._encode_pixels(np.asarray(x))
            else:
                emb = self._encode_audio(np.asarray(x))
            if self.normalise:
                emb = torch.nn.functional.normalize(emb, dim=-1)
            return emb.float().cpu().numpy()

    def _inputs(self, features) -> dict:
        """A preprocessor's tensors on this device (floating ones in the model's dtype)."""
        return {k: v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device)
                for k, v in features.items()}

    def _encode_pixels(self, pixels: np.ndarray):
        import torch

        if self.processor is not None:  # the model's own resize, rescale and mean/std
            return pool(self.model(pixel_values=self._pixel_values(pixels)), self.pooling)
        t = torch.from_numpy(np.ascontiguousarray(pixels)).to(self.device)
        t = t.permute(0, 3, 1, 2).to(self.dtype).div_(127.5).sub_(1.0)  # [-1, 1], NCHW
        return pool(self.model(pixel_values=t), self.pooling)

    def _pixel_values(self, pixels: np.ndarray):
        """The image processor's ``pixel_values``. When, on the first batch, the processor turns out to
        only rescale and normalise (the decoder already made the model's input size), later batches
        get that same arithmetic on the device instead of the processor's per-image CPU work."""
        if self.scaling:
            return scale_pixels(pixels, *self.scaling, self.device).to(self.dtype)
        ref = self.processor(images=list(pixels), return_tensors="pt")["pixel_values"]
        if self.scaling is None:
            guess = pixel_scaling(self.processor)
            same = guess is not None and tuple(ref.shape[-2:]) == pixels.shape[1:3] and \
                np.allclose(scale_pixels(pixels, *guess, "cpu").numpy(), ref.float().numpy(), atol=1e-4)
            self.scaling = guess if same else False
        return ref.to(self.device, self.dtype)

    def _encode_audio(self, x: np.ndarray):
        import torch

        if self.processor is None:  # builtin: the decoder's log-mel
            values = torch.from_numpy(np.ascontiguousarray(x, np.float32)).to(self.device, self.dtype)
            return pool(self.model(input_values=values), self.pooling)
        from .audio import to_mono_16k

        rate = getattr(self.processor, "sampling_rate", None) or self.rate
        waves = [w if rate == self.rate else to_mono_16k(w, self.rate, rate) for w in x.astype(np.float32)]
        inputs = self._inputs(self.processor(waves, sampling_rate=rate, return_tensors="pt"))
        return pool(self.model(**inputs), self.pooling)

    def _encode_text(self, texts: list[str]):
        import torch

        if self.processor is not None:
            enc = self.processor(texts, padding=True, truncation=True, max_length=self.max_tokens,
                                 return_tensors="pt")
            ids, mask = enc["input_ids"], enc["attention_mask"]
        else:
            ids_np, mask_np = hash_tokenize(texts, self.max_tokens)
            ids, mask = torch.from_numpy(ids_np), torch.from_numpy(mask_np)
        ids, mask = ids.to(self.device), mask.to(self.device)
        return pool(self.model(input_ids=ids, attention_mask=mask), self.pooling, mask)

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


def embed_stage(ds, modality: str, cfg: EmbedConfig, input_shape: tuple, max_tokens: int = 128,
                sample_rate: int = 16000):
    """Append the embedding actor-pool stage for ``modality`` to a lazy dataset (unchanged when
    embedding is disabled: the decoders then do not emit the model input)."""
    import ray

    if not cfg.enabled:
        return ds
    return ds.map_batches(
        Embedder,
        fn_constructor_kwargs={"modality": modality, "cfg": cfg.model_dump(), "input_shape": tuple(input_shape),
                               "max_tokens": max_tokens, "num_threads": max(1, int(cfg.num_cpus)),
                               "sample_rate": sample_rate},
        compute=ray.data.ActorPoolStrategy(min_size=cfg.min_actors, max_size=max(cfg.min_actors, cfg.max_actors)),
        batch_size=cfg.batch_size, batch_format="numpy",
        num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus or None,
    )
