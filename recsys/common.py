"""Run-folder layout and cluster connection shared by the recsys steps."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from pipelines.cli import template_options
from pipelines.connect import connect
from pipelines.io import run_dir as new_run_dir
from pipelines.report import emit

from . import config as C
from .config import TEMPLATE, RecsysConfig

DAY_S = 86_400


def connect_for(cfg: RecsysConfig, address: str | None) -> None:
    """Attach to ``address`` (or RAY_ADDRESS / the job's cluster); else start a small local Ray."""
    connect(address, num_cpus=cfg.ray.num_cpus, object_store_memory=cfg.ray.object_store_mb * 1024 ** 2)


def output_dir(run_dir: str | None) -> str:
    """The run folder to write: ``run_dir`` if given, else a new ``runs/recsys/<run_id>``."""
    if run_dir:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        return str(Path(run_dir).resolve())
    return new_run_dir(TEMPLATE)


def input_dir(run_dir: str | None, needs: str) -> str:
    """The run folder to read: ``run_dir``, else the newest run under runs/recsys holding ``needs``."""
    if run_dir:
        if not (Path(run_dir) / needs).exists():
            raise FileNotFoundError(f"{run_dir} has no {needs!r}: run the earlier recsys steps first")
        return str(Path(run_dir).resolve())
    root = Path(new_run_dir(TEMPLATE, run_id="_probe")).parent
    Path(root, "_probe").rmdir()
    runs = sorted(p for p in root.iterdir() if (p / needs).exists())
    if not runs:
        raise FileNotFoundError(f"no run under {root} has {needs!r}: run `python -m recsys.data` first")
    print(f"using the newest run with {needs}: {runs[-1]}", file=sys.stderr)
    return str(runs[-1])


def slice_bounds(cfg: RecsysConfig) -> tuple[int, int, int]:
    """Timestamps (s) splitting the data: retriever < t1 <= ranker < t2 <= test < end."""
    d = cfg.data
    t2 = (d.days - d.test_days) * DAY_S
    t1 = t2 - d.ranker_days * DAY_S
    return t1, t2, d.days * DAY_S


def step_command(run, needs: str | None, help_text: str) -> click.Command:
    """The click ``main`` of a step: load config, find the run folder (one holding ``needs``;
    a new one when ``needs`` is None), connect, ``run(cfg, out)``, print the summary last."""

    @click.command(help=help_text)
    @template_options
    def main(config, overrides, address, run_dir):
        cfg = C.load(config, overrides)
        out = output_dir(run_dir) if needs is None else input_dir(run_dir, needs)
        connect_for(cfg, address)
        emit(run(cfg, out))

    return main
