"""Preflight: what a template config will ask Ray for, against the resource group it goes to.

Template configs declare per-task/actor resources with ``num_cpus`` /
``num_gpus`` and, next to them, their parallelism as ``num_workers`` (Train
workers), ``max_actors`` (actor pools), ``num_tasks`` (tasks in flight at
once) or a Ray Data stage's ``shards`` / ``blocks`` / ``num_blocks`` (its task count). :func:`resource_asks` walks the whole YAML tree for those sections;
:func:`check` compares them with the group's spec: an ask no single worker
can satisfy (``num_gpus: 1`` on a ``1/3`` GPU unit, 16 CPUs on an 8-core
spec) is an error, before anything is uploaded; parallelism
that needs more than the min workers is a warning that the group will autoscale
towards its max.
"""

from __future__ import annotations

from dataclasses import dataclass

from .spec import ResourceGroupSpec

# how many of a section's tasks/actors can run at once: Train workers, actor pools, tasks in flight, and
# Ray Data stages' task counts (a stage of N blocks/shards submits N tasks: a flood the autoscaler follows)
PARALLEL_KEYS = ("num_workers", "max_actors", "num_tasks", "shards", "blocks", "num_blocks")


@dataclass
class Ask:
    """One config section's per-task/actor resources and how many run at once."""

    path: str
    num_cpus: float = 0.0
    num_gpus: float = 0.0
    parallel: int | None = None

    def describe(self) -> str:
        res = ", ".join(
            f"{k}={v:g}" for k, v in (("num_cpus", self.num_cpus), ("num_gpus", self.num_gpus)) if v
        )
        par = f" x{self.parallel}" if self.parallel else ""
        return f"{self.path or '<root>'} ({res or 'no resources'}{par})"


@dataclass
class Finding:
    level: str  # "error" | "warning" | "ok"
    message: str


def _number(value, where: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {value!r} is not a number") from None
    if number < 0:
        raise ValueError(f"{where}: {value!r} must be >= 0")
    return number


def resource_asks(config: dict, path: str = "") -> list[Ask]:
    """Every mapping in the config tree that sets num_cpus or num_gpus, with its parallelism."""
    asks = []
    if isinstance(config, dict):
        if "num_cpus" in config or "num_gpus" in config:
            parallel = next((config[k] for k in PARALLEL_KEYS if isinstance(config.get(k), int)), None)
            asks.append(
                Ask(
                    path,
                    _number(config.get("num_cpus", 0) or 0, f"{path}.num_cpus"),
                    _number(config.get("num_gpus", 0) or 0, f"{path}.num_gpus"),
                    parallel,
                )
            )
        for key, value in config.items():
            asks += resource_asks(value, f"{path}.{key}" if path else str(key))
    elif isinstance(config, list):
        for i, value in enumerate(config):
            asks += resource_asks(value, f"{path}.{i}")
    return asks


def _fits(ask: Ask, spec: ResourceGroupSpec):
    """Worker groups on which one task/actor of ``ask`` can be scheduled."""
    return [
        g
        for g in spec.worker_groups
        if ask.num_cpus <= g.cores
        and (ask.num_gpus == 0 or (g.type == "GPU" and ask.num_gpus <= g.gpus + 1e-9))
    ]


def check(asks: list[Ask], spec: ResourceGroupSpec) -> list[Finding]:
    """Errors for asks no worker can hold; warnings where parallelism drives autoscaling or queues."""
    findings = []
    for ask in asks:
        fits = _fits(ask, spec)
        if not fits:
            if ask.num_gpus and not any(g.type == "GPU" for g in spec.worker_groups):
                why = f"group {spec.name} has no GPU worker group"
            elif ask.num_gpus:
                units = ", ".join(
                    f"{g.name}: {g.distribution_unit or 1} GPU/worker"
                    for g in spec.worker_groups
                    if g.type == "GPU"
                )
                why = f"no GPU worker group offers {ask.num_gpus:g} GPU per worker ({units})"
            else:
                cores = ", ".join(f"{g.name}: {g.spec} {g.cores} cores" for g in spec.worker_groups)
                why = f"no worker spec has {ask.num_cpus:g} cores ({cores})"
            findings.append(Finding("error", f"{ask.describe()} can never be scheduled: {why}"))
            continue
        if not ask.parallel:
            continue
        for resource, per in (("CPU", ask.num_cpus), ("GPU", ask.num_gpus)):
            if not per:
                continue
            need = per * ask.parallel
            per_worker = {g.name: (g.cores if resource == "CPU" else g.gpus) for g in fits}
            at_min = sum(per_worker[g.name] * g.min_workers for g in fits)
            at_max = sum(per_worker[g.name] * g.max_workers for g in fits)
            groups = "+".join(g.name for g in fits)
            if need > at_max + 1e-9:
                findings.append(
                    Finding(
                        "warning",
                        f"{ask.describe()} asks {need:.3g} {resource}s at once: it "
                        f"drives {groups} of group {spec.name} to its max ({at_max:.3g}) and "
                        "the rest will queue; bound its parallelism (num_workers/max_actors/num_tasks/shards/blocks)",
                    )
                )
            elif need > at_min + 1e-9:
                findings.append(
                    Finding(
                        "warning",
                        f"{ask.describe()} asks {need:.3g} {resource}s at once: it will "
                        f"drive autoscaling of {groups} beyond min ({at_min:.3g}) towards max "
                        f"({at_max:.3g}); bound its parallelism (num_workers/max_actors/num_tasks/shards/blocks) to stay at min",
                    )
                )
    if not any(f.level == "error" for f in findings):
        findings.append(Finding("ok", f"{len(asks)} resource ask(s) fit group {spec.name}" + peak(asks, spec)))
    return findings


def _workers_for(need: float, resource: str, groups) -> int:
    """Workers of ``groups`` (filled in order, each up to its max) that hold ``need`` CPUs or GPUs."""
    workers = 0
    for g in groups:
        per = g.cores if resource == "CPU" else g.gpus
        if need <= 1e-9 or not per:
            break
        n = min(g.max_workers, max(g.min_workers, -(-need // per)))
        workers, need = workers + int(n), need - n * per
    return workers


def peak(asks: list[Ask], spec: ResourceGroupSpec) -> str:
    """``; at peak ...``: the most workers one ask of the run needs at once, against the group's min/max."""
    best = None
    for ask in asks:
        fits = _fits(ask, spec)
        for resource, per in (("CPU", ask.num_cpus), ("GPU", ask.num_gpus)):
            if fits and per and ask.parallel:
                n = _workers_for(per * ask.parallel, resource, fits)
                if best is None or n > best[0]:
                    best = (n, ask, fits)
    if best is None:
        return ""
    n, ask, fits = best
    bounds = ", ".join(f"{g.name} min {g.min_workers} max {g.max_workers}" for g in fits)
    return f"; at peak the run asks for {n} worker(s) ({bounds}): {ask.describe()}"
