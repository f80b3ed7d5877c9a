"""Example job for the deploy layer: sums of squares on a bounded actor pool (the job itself).

``pool`` declares per-actor ``num_cpus`` and ``max_actors``, ``flood.num_tasks``
submits that many tasks at once, unbounded (the autoscaling pitfall), ``fail``
makes the job raise.
"""
from __future__ import annotations

import time
from pathlib import Path

from pydantic import Field

from pipelines.cli import RunFailed
from pipelines.config import LocalRayConfig, StrictModel, load_config
from pipelines.template import Run, StepResult

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
    local_ray: LocalRayConfig = LocalRayConfig(cpus=2)


def load(path: str | None = None, overrides=()) -> SquaresConfig:
    """``configs/local.yaml`` (or ``path``) plus ``--set`` overrides."""
    return load_config(SquaresConfig, path, overrides, default_path=DEFAULT_CONFIG)


class JobFailed(RunFailed):
    """Raised on purpose when ``fail: true``."""


def run(cfg: SquaresConfig, run: Run) -> StepResult:
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
    return StepResult(metrics={
        "items": cfg.items,
        "sum_of_squares": total,
        "actors": cfg.pool.max_actors,
        "flood_tasks": cfg.flood.num_tasks,
        "flood_nodes": flood_nodes,
        "seconds": round(time.time() - start, 3),
    }, rows=len(bounds))
