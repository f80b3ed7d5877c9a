"""The multimodal template's declaration (see :mod:`pipelines.template`)."""
from pipelines.template import Step, Template

from . import pipeline
from .config import load
from .report import PLOTS
from .sources import MANIFEST_SCHEMA

TEMPLATE = Template(
    name="multimodal", load_config=load, key_metric="files_per_s",
    quality_bars={"files_per_s": "> 0"},
    description="Multimodal Ray Data ETL: images, video, audio and text -> features, embeddings, "
                "duplicates and rejects (--input DIR|oss://...|s3://... or a manifest .parquet/.csv whose "
                "label/metadata columns are carried into the outputs; default: a generated sample).",
    # input.path is a folder/prefix of media files or a manifest; only a manifest has columns to check
    # (MediaInput.is_table), against this schema, before any cluster work
    inputs={"path": MANIFEST_SCHEMA},
    options={"input": "input.path", "manifest": "input.path"},
    preflight=pipeline.preflight,
    steps=[
        Step("sample", pipeline.generate_sample, makes=("sample",),
             when=lambda cfg: not pipeline.input_configured(cfg),
             help="generate a mixed-media sample with broken files (all-in-one: only when no "
                  "--input is set)"),
        Step("process", pipeline.process,
             needs=lambda cfg: () if pipeline.input_configured(cfg) else ("sample",),
             makes=("images", "video", "audio", "text", "rejects", *PLOTS),
             help="route, decode + embed per modality, dedup, write outputs, rejects and plot_* PNGs "
                  "(reads --input, a folder or a manifest, else the run folder's sample)"),
    ],
    test_overrides=["sample.images=2", "sample.videos=1", "sample.audio=1", "sample.texts=2"],
)
