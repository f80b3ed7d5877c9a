"""Benchmark helpers: machine facts, a wall-clock timer (never time lazy calls), the busy-machine guard,
the results record and the table of the latest results against TARGETS.

A benchmark calls ``run = guard("<template>")`` before any work (exit 1 with one line when the load average
is above the core count) and ``emit(result, run)`` last: it prints the load before and after, the JSON line,
and appends the record (result, commit, machine, time, load) to ``benchmarks/results/<template>.jsonl``.

    python -m pipelines.bench table        # the latest results against the targets (make bench-table)
    python -m pipelines.bench wait-quiet   # wait until the load average is at most the core count
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


@dataclass(frozen=True)
class Target:
    """One performance target: ``metric`` (a key of the template's JSON line) ``op`` (<= or >=) ``bound``.
    ``valid`` names a key that must be true for the value to count (an open-loop run that reached its rate);
    ``where`` holds record values the measurement must have been made with (e.g. the row count)."""

    template: str
    what: str
    metric: str
    op: str
    bound: float
    valid: str | None = None
    where: dict = field(default_factory=dict)
    gpu_only: bool = False


# issue 14's targets; the ratios are the template's rate over the bare baseline's (wall ratio: time over time)
TARGETS = (
    Target("riskcontrol", "train 2M rows, 2 workers / in-process (wall)", "train_wall_ratio", "<=", 1.5,
           where={"rows": 2_000_000}),
    Target("riskcontrol", "train AUPRC equal (|ray - in-process|)", "auprc_gap", "<=", 0.005,
           where={"rows": 2_000_000}),
    Target("riskcontrol", "batch scoring / bare pyarrow+lightgbm", "batch_ratio", ">=", 0.6),
    Target("riskcontrol", "online p99 ms at 100 req/s (memory store)", "online_p99_ms", "<=", 10,
           valid="online_valid", where={"online_target_rps": 100}),
    Target("multimodal", "image path / bare 2-process pool", "ratio_vs_2proc", ">=", 0.7),
    Target("multimodal", "GPU embedding / bare PyTorch loop", "gpu_embed_ratio", ">=", 0.8, gpu_only=True),
    Target("recsys", "/recommend p99 ms at 50 req/s", "online_p99_ms", "<=", 30,
           valid="online_valid", where={"online_target_rps": 50}),
    Target("recsys", "DDP training / bare loop", "train_ratio", ">=", 0.8),
    Target("embodied", "rollout steps/s / bare vector env", "ratio", ">=", 0.7),
    Target("embodied", "rollout with cameras / bare vector env rendering them", "camera_ratio", ">=", 0.7),
)


def machine() -> dict:
    """Host, CPU model, cores and GPU name (or None) of this machine, for every benchmark's JSON."""
    gpu = None
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except (ImportError, OSError, RuntimeError):  # no torch, or a broken CUDA install: no GPU to name
        gpu = None
    cpu = platform.processor() or None
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"host": platform.node(), "cpu": cpu, "cores": os.cpu_count(), "gpu": gpu}


@contextmanager
def timer():
    """``with timer() as t: ...`` then ``t()`` is the elapsed seconds."""
    start = time.perf_counter()
    end = []
    yield lambda: (end[0] if end else time.perf_counter()) - start
    end.append(time.perf_counter())


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. a container's cpuset), not the host's."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def load_average() -> float:
    """The 1-minute load average."""
    return os.getloadavg()[0]


def guard(template: str) -> dict:
    """Before any work: exit 1 with one line when the 1-minute load average is above the core count
    (benchmarks run alone: no test suite or other benchmark on the machine); else print the load."""
    cores, load = usable_cores(), load_average()
    if load > cores:
        raise SystemExit(f"{template} benchmark refused: load average {load:.2f} is above the {cores} cores; "
                         "run benchmarks alone (no test suite or other benchmark on this machine)")
    log(f"load average before: {load:.2f} ({cores} cores)")
    return {"template": template, "load_before": round(load, 2), "started": time.time(), "args": sys.argv[1:]}


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def commit() -> dict:
    """The checked-out commit and whether tracked files differ from it."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"commit": _git("rev-parse", "HEAD"), "dirty": None if status is None else bool(status)}


def emit(result: dict, run: dict) -> dict:
    """Print the load after, then the benchmark's JSON line (last), and append it to
    ``RESULTS/<template>.jsonl`` with commit, machine, UTC time, arguments and load before/after."""
    load = load_average()
    log(f"load average after: {load:.2f} (before: {run['load_before']:.2f})")
    record = {"template": run["template"], **result, "machine": machine(), **commit(),
              "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "seconds": round(time.time() - run["started"], 1), "args": run["args"],
              "load_before": run["load_before"], "load_after": round(load, 2)}
    line = json.dumps(record)
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / f"{run['template']}.jsonl", "a") as f:
        f.write(line + "\n")
    print(line, flush=True)
    return record


def read_results(folder: Path) -> dict[str, list[dict]]:
    """Every recorded run per template, oldest first (the order they were appended)."""
    runs = {}
    for path in sorted(Path(folder).glob("*.jsonl")):
        runs[path.stem] = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            try:
                runs[path.stem] += [json.loads(line)] if line.strip() else []
            except json.JSONDecodeError:
                raise click.ClickException(f"{path}: line {n} is not JSON") from None
    return runs


def latest(target: Target, runs: dict[str, list[dict]]) -> dict | None:
    """The newest record of the target's template that measured its metric (a value, or None when that
    measurement got no answer), measured as ``where`` says."""
    for record in reversed(runs.get(target.template, [])):
        if target.metric in record and all(record.get(k) == v for k, v in target.where.items()):
            return record
    return None


def verdict(target: Target, record: dict | None) -> str:
    """ok, MISS, INVALID (the open-loop client did not reach its rate) or no result."""
    if record is None:
        return "no result (GPU only)" if target.gpu_only else "no result"
    if target.valid and record.get(target.valid) is not True:
        prefix = target.valid[: -len("valid")]
        sent, asked = record.get(f"{prefix}achieved_rps"), record.get(f"{prefix}target_rps")
        if record.get(f"{prefix}errors"):
            return f"INVALID ({record[f'{prefix}errors']} failed requests)"
        return f"INVALID (sent {sent:.0f} of {asked:.0f} req/s)" if sent is not None and asked else "INVALID"
    value = record[target.metric]
    if value is None:
        return "no value"
    met = value <= target.bound if target.op == "<=" else value >= target.bound
    return "ok" if met else "MISS"


def table(folder: Path = RESULTS) -> str:
    """One line per target: template, what, latest value, target, verdict, and when/where it was measured."""
    runs = read_results(folder)
    header = ("template", "target", "value", "goal", "verdict", "measured (UTC)", "commit", "load before/after")
    rows = [header]
    for t in TARGETS:
        rec = latest(t, runs)
        value = "-" if rec is None or rec[t.metric] is None else f"{rec[t.metric]:.3g}"
        when = commit_id = load = "-"
        if rec is not None:
            when = str(rec.get("timestamp", "-"))[:16].replace("T", " ")
            commit_id = (rec.get("commit") or "-")[:9] + ("+" if rec.get("dirty") else "")
            load = f"{rec.get('load_before', '-')}/{rec.get('load_after', '-')}"
        rows.append((t.template, t.what, value, f"{t.op} {t.bound:g}", verdict(t, rec), when, commit_id, load))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


@click.group()
def main():
    """Benchmark records: the table of the latest results against the targets."""


@main.command("table")
@click.option("--results", "folder", type=click.Path(file_okay=False, path_type=Path), default=RESULTS,
              show_default=True, help="Folder of <template>.jsonl records.")
def table_cmd(folder):
    """Print the latest recorded result of every target against it."""
    click.echo(table(folder))


@main.command("wait-quiet")
@click.option("--timeout", default=300.0, show_default=True, help="Seconds to wait at most.")
def wait_quiet(timeout):
    """Wait until the 1-minute load average is at most the core count (a finished benchmark's own load
    decays in about a minute); exit 1 with one line after --timeout."""
    cores, deadline = usable_cores(), time.monotonic() + timeout
    while (load := load_average()) > cores:
        if time.monotonic() > deadline:
            raise SystemExit(f"machine still busy after {timeout:.0f}s: load average {load:.2f} is above the "
                             f"{cores} cores; run benchmarks alone")
        time.sleep(5)


if __name__ == "__main__":
    main()
