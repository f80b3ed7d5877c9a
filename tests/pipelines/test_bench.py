"""Benchmarks tell the truth about themselves: a busy machine is refused before any work, every result is
recorded with its commit, machine, time and load, and one table compares the latest results with the targets.
No Ray: the load average is faked and the records are written by hand."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipelines import bench

ROOT = Path(__file__).resolve().parents[2]


def fake_load(monkeypatch, *loads, cores=2):
    """os.getloadavg returns each of ``loads`` in turn (1-minute value); ``cores`` cores."""
    seq = iter(loads)
    monkeypatch.setattr(os, "getloadavg", lambda: (next(seq), 0.0, 0.0))
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)


def test_a_load_above_the_core_count_is_refused_in_one_line(monkeypatch, capsys):
    fake_load(monkeypatch, 2.5, 2.0)
    with pytest.raises(SystemExit) as e:
        bench.guard("riskcontrol")
    message = str(e.value.code)
    assert "\n" not in message and "riskcontrol benchmark refused" in message, message
    assert "load average 2.50 is above the 2 cores" in message, message
    run = bench.guard("riskcontrol")  # at the core count: allowed, and the load is printed
    assert run["load_before"] == 2.0 and run["template"] == "riskcontrol"
    assert "load average before: 2.00 (2 cores)" in capsys.readouterr().err


def test_every_benchmark_refuses_a_busy_machine_before_any_work(tmp_path):
    """Each benchmarks/*.py run as a script on a machine at load 99: exit with the one-line refusal, before
    Ray or a subprocess starts (both raise here) and without a record."""
    script = f"""
import json, os, runpy, subprocess, sys
os.getloadavg = lambda: (99.0, 99.0, 99.0)
def no_work(*a, **k):
    raise RuntimeError("work started before the load check")
class NoProcess(subprocess.Popen):
    __init__ = no_work
subprocess.Popen = NoProcess
import ray
ray.init = no_work
import pipelines.bench
pipelines.bench.RESULTS = __import__("pathlib").Path({str(tmp_path)!r})
codes = {{}}
for path in sorted(__import__("glob").glob("benchmarks/*.py")):
    sys.argv = [path]
    try:
        runpy.run_path(path, run_name="__main__")
        codes[path] = "ran"
    except SystemExit as e:
        codes[path] = str(e.code)
    except Exception as e:
        codes[path] = repr(e)
print(json.dumps(codes))
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    codes = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(codes) == 4, codes
    for path, code in codes.items():
        name = Path(path).stem
        assert code.startswith(f"{name} benchmark refused: load average 99.00 is above"), (path, code)
    assert not list(tmp_path.iterdir())


def test_emit_prints_the_load_and_appends_the_record(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "RESULTS", tmp_path / "results")
    fake_load(monkeypatch, 0.5, 1.75, 0.25, 0.4, cores=os.cpu_count())
    run = bench.guard("demo")
    record = bench.emit({"ratio": 0.91}, run)
    out, err = capsys.readouterr()
    assert json.loads(out.strip().splitlines()[-1]) == record
    assert "load average before: 0.50" in err and "load average after: 1.75 (before: 0.50)" in err
    lines = (tmp_path / "results" / "demo.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == [record]
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    assert record["commit"] == head and isinstance(record["dirty"], bool)
    assert record["ratio"] == 0.91 and record["template"] == "demo"
    assert record["load_before"] == 0.5 and record["load_after"] == 1.75
    assert record["machine"]["cores"] == os.cpu_count() and record["machine"]["host"]
    when = datetime.fromisoformat(record["timestamp"])
    assert when.utcoffset() == timedelta(0) and abs(datetime.now(timezone.utc) - when) < timedelta(minutes=1)
    second = bench.emit({"ratio": 0.8}, bench.guard("demo"))  # a later run appends; the first line stays
    lines = (tmp_path / "results" / "demo.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == [record, second]


def write(folder: Path, template: str, *records: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{template}.jsonl", "a") as f:
        f.writelines(json.dumps({"timestamp": f"2026-12-0{i + 1}T10:00:00+00:00", "commit": f"{i}" * 40,
                                 "dirty": False, "load_before": 0.3, "load_after": 1.9, **r}) + "\n"
                     for i, r in enumerate(records))


def table_rows(folder: Path) -> dict[str, str]:
    """``python -m pipelines.bench table --results folder``: each target's line, by what it measures."""
    result = CliRunner().invoke(bench.main, ["table", "--results", str(folder)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split()[:3] == ["template", "target", "value"]
    assert len(lines) == 1 + len(bench.TARGETS)
    return {t.what: next(x for x in lines[1:] if t.what in x) for t in bench.TARGETS}


def test_the_table_shows_the_latest_result_of_each_target(tmp_path):
    write(tmp_path, "riskcontrol",
          {"rows": 2_000_000, "train_wall_ratio": 1.2, "auprc_gap": 0.002, "batch_ratio": 0.5,
           "online_p99_ms": 8.0, "online_valid": True, "online_target_rps": 100, "online_achieved_rps": 99.9},
          {"rows": 1000, "train_wall_ratio": 3.0, "auprc_gap": 0.02, "batch_ratio": 0.7,  # a small run, later
           "online_p99_ms": 5.0, "online_valid": False, "online_target_rps": 100, "online_achieved_rps": 80.2})
    write(tmp_path, "recsys", {"online_p99_ms": 45.0, "online_valid": True, "online_target_rps": 50,
                               "online_achieved_rps": 50.0, "train_ratio": 0.85})
    rows = table_rows(tmp_path)
    train = rows["train 2M rows, 2 workers / in-process (wall)"]
    assert " 1.2 " in train and " ok " in train and "000000000" in train  # the 2M-row run, not the later one
    assert "MISS" not in rows["train AUPRC equal (|ray - in-process|)"]
    batch = rows["batch scoring / bare pyarrow+lightgbm"]
    assert " 0.7 " in batch and " ok " in batch and "111111111" in batch  # the latest run
    assert "INVALID (sent 80 of 100 req/s)" in rows["online p99 ms at 100 req/s (memory store)"]
    assert " 45 " in rows["/recommend p99 ms at 50 req/s"] and "MISS" in rows["/recommend p99 ms at 50 req/s"]
    assert " ok " in rows["DDP training / bare loop"] and "0.3/1.9" in rows["DDP training / bare loop"]
    assert "no result" in rows["image path / bare 2-process pool"]
    assert "no result (GPU only)" in rows["GPU embedding / bare PyTorch loop"]
    assert "no result" in rows["rollout steps/s / bare vector env"]


def test_failed_requests_or_no_answer_never_show_an_older_good_result(tmp_path):
    """p99 of the few answered requests is no result: a run with failed requests is INVALID, and a newer run
    whose measurement got no answer is shown as such, not skipped in favour of an older passing one."""
    good = {"online_p99_ms": 8.0, "online_valid": True, "online_target_rps": 100, "online_achieved_rps": 100}
    write(tmp_path, "riskcontrol", good, {**good, "online_valid": False, "online_errors": 37})
    assert "INVALID (37 failed requests)" in table_rows(tmp_path)["online p99 ms at 100 req/s (memory store)"]
    write(tmp_path, "recsys", {"online_p99_ms": 20.0, "online_valid": True, "online_target_rps": 50,
                               "online_achieved_rps": 50}, {"online_p99_ms": None, "online_valid": True,
                                                             "online_target_rps": 50})
    row = table_rows(tmp_path)["/recommend p99 ms at 50 req/s"]
    assert "no value" in row and " ok " not in row, row


def test_a_corrupt_results_file_is_one_line(tmp_path):
    write(tmp_path, "embodied", {"ratio": 0.9})
    with open(tmp_path / "embodied.jsonl", "a") as f:
        f.write('{"ratio": 0.8\n')
    result = CliRunner().invoke(bench.main, ["table", "--results", str(tmp_path)])
    assert result.exit_code == 1
    assert result.output.strip() == f"Error: {tmp_path / 'embodied.jsonl'}: line 2 is not JSON"


def test_make_bench_runs_every_benchmark_then_the_table_and_bench_table_only_prints():
    def dry(target):
        env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}  # under make test
        out = subprocess.run(["make", "--no-print-directory", "-n", target], cwd=ROOT, env=env,
                             capture_output=True, text=True, check=True).stdout
        return [x for x in out.splitlines() if "pip install" not in x and "import torch" not in x
                and not x.startswith("touch")]

    run_all = dry("bench")
    assert len(run_all) == 2, run_all
    assert "for b in benchmarks/*.py" in run_all[0] and "pipelines.bench wait-quiet" in run_all[0]
    assert run_all[1].endswith("-m pipelines.bench table")
    assert [x.split("python ", 1)[-1] for x in dry("bench-table")] == ["-m pipelines.bench table"]


def test_wait_quiet_waits_for_the_load_to_fade_and_gives_up_in_one_line(monkeypatch):
    monkeypatch.setattr(bench.time, "sleep", lambda s: None)
    fake_load(monkeypatch, 3.1, 2.4, 1.9)
    assert CliRunner().invoke(bench.main, ["wait-quiet"]).exit_code == 0
    fake_load(monkeypatch, *[2.6] * 3)
    result = CliRunner().invoke(bench.main, ["wait-quiet", "--timeout", "0"])
    assert result.exit_code == 1
    assert result.output == ("machine still busy after 0s: load average 2.60 is above the 2 cores; "
                             "run benchmarks alone\n")
