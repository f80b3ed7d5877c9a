"""Example job for the deploy layer: sums of squares on a bounded actor pool.

    python -m deploy.examples.squares [--config FILE] [--set pool.max_actors=2]

It has a template's shape (config model, ``configs/local.yaml``,
``configs/cluster.yaml``, ``resource_group.yaml``) and stands in for one in the
deploy tests: ``pool`` declares per-actor ``num_cpus`` and ``max_actors``,
``flood.num_tasks`` submits that many tasks at once, unbounded (the
autoscaling pitfall), ``fail`` makes the job raise.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import click
from pydantic import Field

from pipelines.cli import RunFailed, exit_with, template_options
from pipelines.config import StrictModel, load_config
from pipelines.connect import connect
from pipelines.io import run_dir as new_run_dir
from pipelines.report import emit, summary

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "local.yaml"


class Pool(StrictModel):
    """The actor pool: per-actor resources and how many actors."""

    num_cpus: float = Field(1, gt=0)
    num_gpus: float = Field(0, ge=0)
    max_actors: int = Field(2, ge=1)


class Flood(StrictModel):
    """``num_tasks`` tasks of ``num_cpus`` each, all submitted at once (no bound)."""

    num_cpus: float = Field(1, gt=0)
    num_tasks: int = Field(0, ge=0)
    seconds: float = Field(5.0, ge=0)


class SquaresConfig(StrictModel):
    items: int = Field(64, ge=1)
    chunks: int = Field(8, ge=1)
    pool: Pool = Pool()
    flood: Flood = Flood()
    fail: bool = False


class JobFailed(RunFailed):
    """Raised on purpose when ``fail: true``."""


def run(cfg: SquaresConfig) -> dict:
    """Square ``items`` numbers in ``chunks`` on ``max_actors`` actors; optionally flood tasks."""
    import ray

    @ray.remote
    class Squarer:
        def square_sum(self, lo: int, hi: int) -> int:
            return sum(i * i for i in range(lo, hi))

    @ray.remote
    def busy(seconds: float) -> str:
        time.sleep(seconds)
        return ray.get_runtime_context().get_node_id()

    if cfg.fail:
        raise JobFailed("fail: true in the config: this job fails on purpose")
    start = time.time()
    flood = busy.options(num_cpus=cfg.flood.num_cpus)
    flood_refs = [flood.remote(cfg.flood.seconds) for _ in range(cfg.flood.num_tasks)]
    actors = [
        Squarer.options(num_cpus=cfg.pool.num_cpus, num_gpus=cfg.pool.num_gpus).remote()
        for _ in range(cfg.pool.max_actors)
    ]
    pool = ray.util.ActorPool(actors)
    step = -(-cfg.items // cfg.chunks)
    bounds = [(lo, min(lo + step, cfg.items)) for lo in range(0, cfg.items, step)]
    total = sum(pool.map_unordered(lambda a, b: a.square_sum.remote(*b), bounds))
    flood_nodes = len(set(ray.get(flood_refs))) if flood_refs else 0
    expected = (cfg.items - 1) * cfg.items * (2 * cfg.items - 1) // 6
    if total != expected:
        raise JobFailed(f"sum of squares {total} != {expected}")
    return {
        "items": cfg.items,
        "sum_of_squares": total,
        "actors": cfg.pool.max_actors,
        "flood_tasks": cfg.flood.num_tasks,
        "flood_nodes": flood_nodes,
        "seconds": round(time.time() - start, 3),
    }


@click.command()
@template_options
def main(config, overrides, address, run_dir):
    """Run the example job and print its summary line."""
    cfg = load_config(SquaresConfig, config, overrides, default_path=DEFAULT_CONFIG)
    if address or os.environ.get("RAY_ADDRESS"):
        connect(address)
    else:
        connect(None, num_cpus=2, object_store_memory=300 * 1024 * 1024)
    metrics = run(cfg)
    emit(summary("squares", "all", run_dir or new_run_dir("squares"), metrics=metrics))


if __name__ == "__main__":
    exit_with(main)
