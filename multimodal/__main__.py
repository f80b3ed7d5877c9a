"""End to end: ``python -m multimodal`` (generated sample) or ``python -m multimodal --input DIR``.

Lists and routes the files, runs each modality (decode, features, embedding actor pool),
groups duplicates across the dataset, writes ``images``, ``video``, ``audio``, ``text`` and
``rejects`` Parquet folders into the run folder and prints the summary JSON line last.
"""
from __future__ import annotations

import sys
from pathlib import Path

import click
from ray.exceptions import RayError

from pipelines.cli import RunFailed, run_main, template_options
from pipelines.connect import connect
from pipelines.io import is_remote
from pipelines.io import run_dir as new_run_dir
from pipelines.report import emit, summary

from .config import load
from .pipeline import local_sample_dir, run
from .sample import generate

STEPS = ["route", "images", "video", "audio", "text", "dedup", "write"]


def prepare_run_dir(run_dir: str | None) -> str:
    """The given ``--run-dir`` (created when local) or a fresh ``runs/multimodal/<id>``."""
    if not run_dir:
        return new_run_dir("multimodal")
    if is_remote(run_dir):
        return run_dir.rstrip("/")
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    return str(Path(run_dir).resolve())


@click.command()
@template_options
@click.option("--input", "input_path", default=None,
              help="Folder or oss:// / s3:// prefix to process (default: generate a small sample).")
@click.option("--manifest", default=None, help="Parquet/CSV manifest with a `path` column.")
def command(config, overrides, address, run_dir, input_path, manifest):
    """Multimodal Ray Data ETL: images, video, audio and text -> features, embeddings, rejects."""
    cfg = load(config, overrides)
    if manifest:
        cfg.source.manifest = manifest
    out = prepare_run_dir(run_dir)
    source = input_path or cfg.source.input
    if not source and not cfg.source.manifest:
        source = local_sample_dir(out)
        generate(source, cfg.sample)
        print(f"generated a mixed-media sample in {source}", file=sys.stderr)
    connect(address, num_cpus=cfg.num_cpus, object_store_memory=cfg.object_store_mb << 20)
    try:
        result = run(cfg, out, None if cfg.source.manifest else source)
    except RayError as e:  # a stage failed on the cluster: its own error is the last line
        lines = [line for line in str(e).splitlines() if line.strip()]
        raise RunFailed(f"pipeline failed: {lines[-1].strip() if lines else type(e).__name__}") from None
    emit(summary("multimodal", "all", out, steps=STEPS, **result))
    files, bad = result["metrics"]["files"], result["metrics"]["rejected_files"]
    if files and bad / files > cfg.max_reject_ratio:
        raise RunFailed(f"{bad} of {files} files rejected, above max_reject_ratio {cfg.max_reject_ratio}")


def main(argv=None) -> int:
    """Run the command; errors are one stderr line and a non-zero return code."""
    return run_main(command, argv)


if __name__ == "__main__":
    sys.exit(main())
