"""The template contract, checked on every registered template (entry points ``adbray.templates``).

For each: the CLI has the common options and lists its steps, a step that needs an earlier
step's outputs fails in one line before any Ray work, the summary has the contract's keys and
types, and running the steps one by one gives the same outputs as the all-in-one run.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as pads
import pytest

from pipelines.template import discover, load_template

ROOT = Path(__file__).resolve().parent.parent
NAMES = sorted(discover())


def _first_step_with_needs(template):
    cfg = template.load_config(None, [])
    return next((s for s in template.steps if template.needs(s, cfg)), None)


# templates where some step reads an earlier step's outputs (squares has one step)
WITH_NEEDS = [n for n in NAMES if _first_step_with_needs(load_template(n))]


def test_the_built_in_templates_are_registered():
    assert {"multimodal", "recsys", "riskcontrol", "embodied", "squares"} <= set(NAMES)
    assert {"multimodal", "recsys", "riskcontrol", "embodied"} <= set(WITH_NEEDS)


@pytest.mark.parametrize("name", NAMES)
def test_help_lists_the_steps_and_common_options(name):
    template = load_template(name)
    help_text = template.command().get_help(__import__("click").Context(template.command()))
    for option in ("--config", "--set", "--address", "--run-dir"):
        assert option in help_text, option
    for step in template.steps:
        assert step.name in help_text, step.name
    assert (template.root / "configs" / "local.yaml").is_file()
    assert template.resource_group.is_file()


@pytest.mark.parametrize("name", WITH_NEEDS)
def test_a_step_without_its_inputs_fails_in_one_line_before_ray(name, tmp_path):
    template = load_template(name)
    later = _first_step_with_needs(template)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    for args in ([later.name], [later.name, "--run-dir", str(tmp_path / "empty")]):
        proc = subprocess.run([sys.executable, "-m", template.package, *args], cwd=ROOT, env=env,
                              check=False, capture_output=True, text=True, timeout=120)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode != 0 and len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
        assert "Ray" not in proc.stderr


def _parquet_rows(run_dir: Path) -> dict[str, int]:
    """Row counts of every Parquet dataset (a folder holding .parquet files) under ``run_dir``."""
    rows = {}
    for folder in sorted({p.parent for p in run_dir.rglob("*.parquet")}):
        files = sorted(str(p) for p in folder.glob("*.parquet"))  # a LeRobot meta/ also holds JSON
        rows[str(folder.relative_to(run_dir))] = pads.dataset(files, format="parquet").count_rows()
    return rows


@pytest.mark.parametrize("name", NAMES)
def test_summary_keys_and_step_by_step_equals_all_in_one(name, ray_connected, run_template, tmp_path):
    template = load_template(name)
    small = [x for item in template.test_overrides for x in ("--set", item)]
    whole, by_step = tmp_path / "all", tmp_path / "steps"

    code, s = run_template(template, ["--run-dir", whole, *small])
    assert code == 0 and s, f"{name} all-in-one failed"
    assert s["template"] == name and s["step"] == "all" and s["run_dir"] == str(whole)
    assert isinstance(s["rows"], int) and isinstance(s["rejects"], int)
    assert isinstance(s["metrics"], dict) and template.key_metric in s["metrics"], template.key_metric
    assert list(s["step_seconds"]) == s["steps"] and all(isinstance(v, float) for v in s["step_seconds"].values())
    assert all(isinstance(v, str) for v in s["outputs"].values())
    for step in template.steps:
        if step.name in s["steps"]:
            assert set(step.makes) <= set(s["outputs"]), (step.name, set(step.makes) - set(s["outputs"]))

    rows = 0
    for step in s["steps"]:
        code, one = run_template(template, [step, "--run-dir", by_step, *small])
        assert code == 0 and one and one["step"] == step, f"{name} step {step} failed"
        rows += one["rows"]
    assert rows == s["rows"]
    assert sorted(_relative(s["outputs"], whole)) == sorted(_relative(_manifest(by_step), by_step))
    assert _parquet_rows(whole) == _parquet_rows(by_step)


def _relative(outputs: dict, run_dir: Path) -> list[str]:
    return [f"{k}={v.replace(str(run_dir), '<run>')}" for k, v in outputs.items()]


def _manifest(run_dir: Path) -> dict:
    from pipelines.template import read_manifest

    return read_manifest(str(run_dir))
