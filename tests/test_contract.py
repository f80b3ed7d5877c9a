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
import yaml

from pipelines.html_report import config_yaml
from pipelines.template import discover, load_template
from pipelines.testing import local_run_traces

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
    keys = help_text.split("CONFIG KEYS", 1)[1]  # every config key with its default value
    for section, value in yaml.safe_load(config_yaml(template.load_config(None, []))).items():
        assert (f"  {section}." if isinstance(value, dict) and value else f"  {section} = ") in keys, section
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


def _parquet_rows(run_dir: str) -> dict[str, int]:
    """Row counts of every Parquet dataset (a folder holding .parquet files) under ``run_dir``."""
    from pipelines import io

    folders: dict[str, list[str]] = {}
    for uri in io.list_files(run_dir):
        if uri.endswith(".parquet"):  # a LeRobot meta/ also holds JSON
            folders.setdefault(uri.rsplit("/", 1)[0], []).append(uri)
    rows = {}
    for folder, files in sorted(folders.items()):
        fs, _ = io.filesystem_for(folder)
        paths = [io.filesystem_for(f)[1] for f in files]
        rows[folder[len(run_dir) + 1:]] = pads.dataset(paths, format="parquet", filesystem=fs).count_rows()
    return rows


@pytest.mark.parametrize("name", NAMES)
def test_summary_keys_and_step_by_step_equals_all_in_one(name, run_template, adbray_run_dir, tmp_path):
    """On the session cluster (each worker its own disk), into run folders on its OSS stand-in. The
    all-in-one run's report opens in a real browser (headless Chromium) as a person would see it."""
    template = load_template(name)
    small = [x for item in template.test_overrides for x in ("--set", item)]
    whole, by_step = f"{adbray_run_dir}/all", f"{adbray_run_dir}/steps"
    local_before = local_run_traces()

    code, s = run_template(template, ["--run-dir", whole, *small])
    assert code == 0 and s, f"{name} all-in-one failed"
    assert s["template"] == name and s["step"] == "all" and s["run_dir"] == whole
    assert isinstance(s["rows"], int) and isinstance(s["rejects"], int)
    assert isinstance(s["metrics"], dict) and template.key_metric in s["metrics"], template.key_metric
    assert list(s["step_seconds"]) == s["steps"] and all(isinstance(v, float) for v in s["step_seconds"].values())
    assert all(isinstance(v, str) for v in s["outputs"].values())
    for step in template.steps:
        if step.name in s["steps"]:
            assert set(step.makes) <= set(s["outputs"]), (step.name, set(step.makes) - set(s["outputs"]))
    assert _read_json(f"{whole}/summary.json")["metrics"] == s["metrics"]
    _check_report_in_a_browser(template, s, tmp_path)

    rows = 0
    for step in s["steps"]:
        code, one = run_template(template, [step, "--run-dir", by_step, *small])
        assert code == 0 and one and one["step"] == step, f"{name} step {step} failed"
        rows += one["rows"]
    assert rows == s["rows"]
    assert sorted(_relative(s["outputs"], whole)) == sorted(_relative(_manifest(by_step), by_step))
    parquet = _parquet_rows(whole)
    assert parquet == _parquet_rows(by_step) and (parquet or name == "squares")
    # every output is in the object store, none on this machine's disk
    assert not [v for v in s["outputs"].values() if v.startswith("/")], s["outputs"]
    assert local_run_traces() == local_before


@pytest.mark.parametrize("name", NAMES)
def test_a_local_run_dir_on_a_cluster_fails_in_one_line_before_ray(name, ray_cluster, tmp_path):
    """Attached to a cluster whose nodes share no disk, a local run folder is refused before any work."""
    template = load_template(name)
    env = {**os.environ, **ray_cluster.env(), "ADBRAY_DISKS": "isolated"}
    env.pop("ADBRAY_SHARED_MOUNT", None)
    proc = subprocess.run([sys.executable, "-m", template.package, "--run-dir", str(tmp_path / "run")], cwd=ROOT,
                          env=env, check=False, capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: run folder"), proc.stderr
    assert "--run-dir oss://" in lines[0] and "Ray" not in proc.stderr
    assert not (tmp_path / "run").exists()


def _check_report_in_a_browser(template, s: dict, tmp_path: Path) -> None:
    """index.html from the object store, opened in Chromium: no console errors, no network, every plot
    loaded, the key metric's value and the cluster's dashboard on the page, a screenshot that is not blank."""
    from pipelines import io
    from pipelines.html_report import _fmt, check_bar
    from pipelines.testing import blank_image, open_in_browser

    assert s["report"] == f"{s['run_dir']}/index.html"
    page = tmp_path / "index.html"
    page.write_bytes(io.read_bytes(s["report"]))
    seen = open_in_browser(page, tmp_path / "report.png")
    assert seen["errors"] == [] and seen["requests"] == [], seen
    plots = [n for n, uri in s["outputs"].items() if uri.endswith(".png")]
    assert sorted(alt for alt, _ in seen["images"]) == sorted(plots), seen["images"]
    assert all(width > 0 for _, width in seen["images"]), seen["images"]
    for metric, bar in template.quality_bars.items():  # every bar can be judged on this run's metrics
        assert check_bar(s["metrics"].get(metric), bar, s["metrics"]) is not None, (metric, bar)
    value = _fmt(s["metrics"][template.key_metric])
    assert f"{template.key_metric} = {value}" in seen["text"], seen["text"][:500]
    assert s["cluster"]["dashboard"] and s["cluster"]["dashboard"] in seen["text"]
    assert not blank_image(tmp_path / "report.png")


def _read_json(uri: str) -> dict:
    from pipelines import io

    return io.read_json(uri)


def _relative(outputs: dict, run_dir: str) -> list[str]:
    return [f"{k}={v.replace(run_dir, '<run>')}" for k, v in outputs.items()]


def _manifest(run_dir: str) -> dict:
    from pipelines.template import read_manifest

    return read_manifest(run_dir)


BUILT_IN = ["multimodal", "recsys", "riskcontrol", "embodied"]


@pytest.mark.parametrize("name", BUILT_IN)
def test_your_data_the_input_section_and_the_guides_tables(name):
    """Every built-in template reads the user's data through the shared ``input`` section, declares what
    it reads (pyarrow schemas), and its guide shows those schemas exactly as the code has them."""
    from pipelines.input import InputConfig, schema_markdown

    template = load_template(name)
    cfg = template.load_config(None, [])
    assert isinstance(cfg.input, InputConfig) and template.inputs, name
    assert template.options.get("input") == "input.path" or "input.path" in template.options.values()
    guide = (ROOT / "docs" / f"{name}.md").read_text()
    for key, schema in template.inputs.items():
        assert hasattr(cfg.input, key), (name, key)
        assert schema_markdown(schema) in guide, f"docs/{name}.md lacks the table of input.{key}"
