"""The multimodal template's declaration (see :mod:`pipelines.template`)."""
from pipelines.template import Step, Template

from . import pipeline
from .config import load
from .report import PLOTS

TEMPLATE = Template(
    name="multimodal", load_config=load, key_metric="files_per_s",
    quality_bars={"files_per_s": "> 0"},
    description="Multimodal Ray Data ETL: images, video, audio and text -> features, embeddings, "
                "duplicates and rejects (--input DIR|oss://...|s3://..., or --manifest FILE; "
                "default: a generated sample).",
    options={"input": "source.input", "manifest": "source.manifest"},
    preflight=pipeline.preflight,
    steps=[
        Step("sample", pipeline.generate_sample, makes=("sample",),
             when=lambda cfg: not pipeline.input_configured(cfg),
             help="generate a mixed-media sample with broken files (all-in-one: only when no "
                  "--input/--manifest is set)"),
        Step("process", pipeline.process,
             needs=lambda cfg: () if pipeline.input_configured(cfg) else ("sample",),
             makes=("images", "video", "audio", "text", "rejects", *PLOTS),
             help="route, decode + embed per modality, dedup, write outputs, rejects and plot_* PNGs "
                  "(reads --input/--manifest, else the run folder's sample)"),
    ],
    test_overrides=["sample.images=2", "sample.videos=1", "sample.audio=1", "sample.texts=2"],
)
