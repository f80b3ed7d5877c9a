"""Example job for the deploy layer: sums of squares on a bounded actor pool (the job itself).

``pool`` declares per-actor ``num_cpus`` and ``max_actors``, ``flood.num_tasks``
submits that many tasks at once, unbounded (the autoscaling pitfall), ``fail``
makes the job raise. ``output.mysql`` upserts one row per chunk (key ``lo``), so a
rerun replaces rows instead of adding them; ``chunk_seconds`` makes each chunk last
that long (a long job, e.g. to rehearse a head restart while it runs).
"""
from __future__ import annotations

import time
from pathlib import Path

import pyarrow as pa
from pydantic import Field, field_validator

from pipelines.cli import RunFailed
from pipelines.config import LocalRayConfig, StrictModel, load_config
from pipelines.io import checked_table_name, upsert_mysql
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


class Output(StrictModel):
    """Where each chunk's sum goes, besides the summary: a MySQL table, upserted on ``lo``."""

    mysql: str | None = None  # mysql://user:password@host:port/db
    table: str = "squares"

    @field_validator("table")
    @classmethod
    def _table(cls, value: str) -> str:
        return checked_table_name(value, "output.table")


class SquaresConfig(StrictModel):
    items: int = Field(64, ge=1)
    chunks: int = Field(8, ge=1)
    chunk_seconds: float = Field(0, ge=0)
    pool: Pool = Pool()
    output: Output = Output()
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
        def square_sum(self, lo: int, hi: int, seconds: float) -> tuple[int, int, int]:
            time.sleep(seconds)
            return lo, hi, sum(i * i for i in range(lo, hi))

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
    job_id = ray.get_runtime_context().get_job_id()
    total = 0
    for lo, hi, chunk_sum in pool.map_unordered(lambda a, b: a.square_sum.remote(*b, cfg.chunk_seconds), bounds):
        total += chunk_sum
        if cfg.output.mysql:  # as each chunk ends: a job stopped half-way leaves the rows it finished
            row = pa.table({"lo": [lo], "hi": [hi], "sum_of_squares": [chunk_sum], "job_id": [job_id]})
            upsert_mysql(cfg.output.mysql, cfg.output.table, row, key=["lo"])
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
        "rows_upserted": len(bounds) if cfg.output.mysql else 0,
    }, rows=len(bounds))
