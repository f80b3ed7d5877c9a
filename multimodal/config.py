"""Config models for the multimodal ETL template (loaded from ``configs/*.yaml``)."""
from __future__ import annotations

from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

from pydantic import Field

from pipelines.config import ConfigError, LocalRayConfig, StrictModel, load_config
from pipelines.input import InputConfig

PKG_DIR = Path(__file__).resolve().parent
DEFAULT_CONFIG = PKG_DIR / "configs" / "local.yaml"
MODALITIES = ("images", "video", "audio", "text")


MANIFEST_SUFFIXES = (".parquet", ".csv", ".csv.gz")


def is_manifest(path: str, fmt: str | None = None) -> bool:
    """A manifest (a table listing the files), not the files themselves: ``input.format`` is set, or
    the path is ``mysql://...``, or a ``.parquet``/``.csv``/``.csv.gz`` file."""
    return bool(fmt) or urlparse(str(path)).scheme in ("mysql", "mysql+pymysql") or \
        str(path).lower().rstrip("/").endswith(MANIFEST_SUFFIXES)


class MediaInput(InputConfig):
    """The shared ``input`` section (:mod:`pipelines.input`): ``path`` is a folder, one media file or an
    ``oss://``/``s3://`` prefix of media files, or a manifest listing them (:func:`is_manifest`), whose
    ``path`` column may be renamed with ``columns`` (``{path: file_uri}``)."""

    path: str | None = Field(None, description="folder, media file, oss:// or s3:// prefix, or a manifest "
                                               "(.parquet/.csv file, mysql://host:port/db + table, or any "
                                               "path with format set); unset: generate the sample")
    endpoint: str | None = Field(None, description="object-store endpoint of the media and the manifest "
                                                   "(else $OSS_ENDPOINT)")
    max_reject_ratio: float = Field(0.05, ge=0, le=1, description="fail the run (after writing) above this "
                                                                   "share of rejected files / manifest rows")

    def is_table(self, path: str) -> bool:
        """Only a manifest has columns to check; a folder of media files has none."""
        return is_manifest(path, self.format)

    def workers_read(self, path: str) -> bool:
        """The driver alone reads a manifest (a local one is fine on a cluster); a local folder of
        media files is checked by the template's preflight (``--input`` hint), without listing it."""
        return False


class RouteConfig(StrictModel):
    """Routing tasks: each reads the first bytes of a block of files and routes them to a modality."""

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
    # auto: the model's own (multimodal.embed.pooling_of); pooler = pooler_output (else CLS)
    pooling: Literal["auto", "pooler", "cls", "mean"] = "auto"
    normalize: bool | None = None     # L2-normalise the embeddings; unset: the model's own (auto)


class ImageConfig(StrictModel):
    decoder: Literal["pillow", "opencv"] = "pillow"
    size: int = Field(64, ge=8)             # output square side (resize shorter side + center crop)
    analysis_size: int = Field(256, ge=32)  # longest side used for blur/brightness
    near_dup_hamming: int = Field(6, ge=0, le=32)  # phash Hamming distance counted as near-duplicate
    batch_size: int = Field(256, ge=1, description="images per decode task: a Ray task costs tens of ms, so few large "
                                                        "tasks (2 cores, 2000 images: 64 -> 365 img/s, 256 -> 465-500 img/s)")
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
    input: MediaInput = MediaInput()
    route: RouteConfig = RouteConfig()
    images: ImageConfig = ImageConfig()
    video: VideoConfig = VideoConfig()
    audio: AudioConfig = AudioConfig()
    text: TextConfig = TextConfig()
    sample: SampleConfig = SampleConfig()


# keys of earlier versions -> where they are now (named in the error when a config still uses them)
MOVED = {"source": "source.input and source.manifest are now input.path (--input), source.endpoint "
                   "input.endpoint, source.files_per_block/sniff_bytes/num_cpus route.*",
         "max_reject_ratio": "max_reject_ratio is now input.max_reject_ratio"}


def load(path: str | None = None, overrides=()) -> MultimodalConfig:
    """Load the config (default ``configs/local.yaml``) with ``--set`` overrides."""
    try:
        return load_config(MultimodalConfig, path, overrides, default_path=DEFAULT_CONFIG)
    except ConfigError as e:
        moved = next((hint for key, hint in MOVED.items() if f": {key}: Extra inputs" in str(e)), None)
        if moved:
            raise ConfigError(f"{str(e).split(': Extra inputs')[0]}: {moved}") from None
        raise
