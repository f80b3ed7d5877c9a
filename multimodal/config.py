"""Config models for the multimodal ETL template (loaded from ``configs/*.yaml``)."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from pipelines.config import LocalRayConfig, StrictModel, load_config

PKG_DIR = Path(__file__).resolve().parent
DEFAULT_CONFIG = PKG_DIR / "configs" / "local.yaml"
MODALITIES = ("images", "video", "audio", "text")


class SourceConfig(StrictModel):
    """Where the files come from: a folder, an ``oss://``/``s3://`` prefix or a manifest."""

    input: str | None = None          # folder or oss:// / s3:// prefix; None -> generate the sample
    manifest: str | None = None       # Parquet/CSV with a `path` column (local or object store)
    endpoint: str | None = None       # object-store endpoint (else $OSS_ENDPOINT)
    files_per_block: int = Field(16, ge=1)   # paths per Ray Data block (bounds per-task memory)
    sniff_bytes: int = Field(64, ge=16, le=4096)
    num_cpus: float = Field(0.5, gt=0)


class EmbedConfig(StrictModel):
    """One embedding stage: a transformers encoder in an actor pool."""

    enabled: bool = True
    model: str = "builtin"            # "builtin" (small model from config, offline) or hub id / local path
    dim: int = Field(64, ge=8)        # hidden size of the builtin model (= embedding size)
    layers: int = Field(2, ge=1)
    heads: int = Field(2, ge=1)
    seed: int = 0
    batch_size: int = Field(16, ge=1)
    num_cpus: float = Field(1, ge=0)
    num_gpus: float = Field(0, ge=0)
    min_actors: int = Field(1, ge=1)
    max_actors: int = Field(1, ge=1)
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"   # auto: bf16 on CUDA, fp32 on CPU


class ImageConfig(StrictModel):
    decoder: Literal["pillow", "opencv"] = "pillow"
    size: int = Field(64, ge=8)             # output square side (resize shorter side + center crop)
    analysis_size: int = Field(256, ge=32)  # longest side used for blur/brightness
    near_dup_hamming: int = Field(6, ge=0, le=32)  # phash Hamming distance counted as near-duplicate
    batch_size: int = Field(16, ge=1)
    num_cpus: float = Field(1, gt=0)
    memory_mb: int = Field(256, ge=16)      # memory reserved per decode task
    embed: EmbedConfig = EmbedConfig()


class VideoConfig(StrictModel):
    sample_fps: float = Field(2.0, gt=0)
    frame_size: int = Field(64, ge=8)
    frames_per_clip: int = Field(4, ge=1)   # frames kept per clip for the embedding
    max_clip_s: float = Field(10.0, gt=0)  # clips longer than this are split
    shot_threshold: float = Field(0.5, gt=0, le=2)  # histogram distance that starts a new shot
    max_seconds: float = Field(3600.0, gt=0)  # decode at most this much of one video
    num_cpus: float = Field(1, gt=0)
    memory_mb: int = Field(512, ge=16)
    embed: EmbedConfig = EmbedConfig(batch_size=4)


class AudioConfig(StrictModel):
    sample_rate: int = Field(16000, ge=8000)
    n_mels: int = Field(64, ge=8)
    silence_db: float = -40.0               # frames quieter than this (dBFS) count as silence
    max_seconds: float = Field(600.0, gt=0)  # decode at most this much of one file
    embed_seconds: float = Field(10.0, gt=0)  # log-mel window fed to the encoder
    batch_size: int = Field(8, ge=1)
    num_cpus: float = Field(1, gt=0)
    memory_mb: int = Field(512, ge=16)
    embed: EmbedConfig = EmbedConfig(batch_size=8)


class TextConfig(StrictModel):
    encodings: list[str] = Field(default_factory=lambda: ["utf-8", "gb18030", "cp1252"])  # break detection ties
    min_chars: int = Field(1, ge=0)
    max_chars: int = Field(100_000, ge=1)
    max_file_mb: float = Field(10, gt=0)  # files are decoded whole: larger ones are rejects (too_large)
    jsonl_field: str = "text"
    near_dup_jaccard: float = Field(0.7, gt=0, le=1)
    shingle: int = Field(3, ge=1)
    max_tokens: int = Field(128, ge=8)
    batch_size: int = Field(64, ge=1)
    num_cpus: float = Field(1, gt=0)
    memory_mb: int = Field(256, ge=16)
    embed: EmbedConfig = EmbedConfig(batch_size=32)


class SampleConfig(StrictModel):
    images: int = Field(12, ge=0)
    videos: int = Field(2, ge=0)
    audio: int = Field(3, ge=0)
    texts: int = Field(4, ge=0)
    broken: bool = True
    seed: int = 0


class MultimodalConfig(StrictModel):
    modalities: list[Literal["images", "video", "audio", "text"]] = Field(default_factory=lambda: list(MODALITIES))
    local_ray: LocalRayConfig = LocalRayConfig(cpus=2)  # only for a local in-process Ray
    max_reject_ratio: float = Field(0.5, ge=0, le=1)
    source: SourceConfig = SourceConfig()
    images: ImageConfig = ImageConfig()
    video: VideoConfig = VideoConfig()
    audio: AudioConfig = AudioConfig()
    text: TextConfig = TextConfig()
    sample: SampleConfig = SampleConfig()


def load(path: str | None = None, overrides=()) -> MultimodalConfig:
    """Load the config (default ``configs/local.yaml``) with ``--set`` overrides."""
    return load_config(MultimodalConfig, path, overrides, default_path=DEFAULT_CONFIG)
