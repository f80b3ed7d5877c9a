"""``python -m embodied``: collect expert episodes -> behaviour cloning -> evaluation, end to end."""
from __future__ import annotations

import time

import click

from pipelines.cli import exit_with, template_options
from pipelines.io import run_dir as make_run_dir
from pipelines.report import emit, summary

from . import config as config_mod
from .config import TEMPLATE
from .evaluate import evaluate
from .policies import policy_spec
from .rollout import collect, connect_cluster
from .train import train


@click.command()
@template_options
def main(config, overrides, address, run_dir):
    """Collect, train and evaluate on configs/local.yaml (or --config)."""
    cfg = config_mod.load(config, overrides)
    policy_spec("expert", cfg.env.id)  # evaluation compares against the expert: fail before cluster work
    policy_spec(cfg.collect.policy, cfg.env.id)
    connect_cluster(cfg, address)
    out = run_dir or make_run_dir(TEMPLATE, root=cfg.run_root)
    timings = {}
    start = time.perf_counter()
    metrics = collect(cfg, out)
    timings["collect_s"] = time.perf_counter() - start
    start = time.perf_counter()
    trained = train(cfg, f"{out}/episodes", out)
    timings["train_s"] = time.perf_counter() - start
    start = time.perf_counter()
    metrics.update(trained["metrics"])
    metrics.update(evaluate(cfg, trained["weights"], out))
    timings["evaluate_s"] = time.perf_counter() - start
    metrics.update(timings)
    emit(summary(TEMPLATE, "all", out, steps=["collect", "train", "evaluate"],
                 outputs={"episodes": f"{out}/episodes", "rejects": f"{out}/rejects",
                          "checkpoint": trained["checkpoint"], "evaluation": f"{out}/evaluation.json",
                          "plot": f"{out}/evaluation.png"},
                 metrics=metrics, rejects=metrics["rejected_episodes"]))


if __name__ == "__main__":
    exit_with(main)
