"""The template contract's mechanics without Ray: manifest, single steps, failures, flag aliases."""
from __future__ import annotations

import json

import pytest

from pipelines.cli import RunFailed
from pipelines.config import StrictModel, apply_overrides, validate
from pipelines.template import Run, Step, StepResult, Template, read_manifest


class Cfg(StrictModel):
    path: str = ""
    max_bad: int = 10


def load(path, overrides):
    return validate(Cfg, apply_overrides({}, overrides))


def make(run: Run) -> StepResult:
    target = run.path("made.txt")
    with open(target, "w") as f:
        f.write("x")
    return StepResult({"made": target}, {"made_rows": 3}, rows=3)


def use(cfg, run: Run) -> StepResult:
    with open(run.input("made")) as f:
        text = f.read()
    bad = 5
    return StepResult({"used": run.path("used")}, {"read": text}, rows=1, rejects=bad,
                      failure=f"{bad} rejected" if bad > cfg.max_bad else None)


def toy(**kw) -> Template:
    steps = [Step("make", lambda cfg, run: make(run), makes=("made",)),
             Step("use", use, needs=("made",), makes=("used",))]
    return Template(name="toy", package="pipelines", load_config=load, steps=steps, key_metric="read", **kw)


def test_all_in_one_records_a_manifest_and_a_later_single_step_reads_it(tmp_path):
    t = toy()
    s = t.run(load(None, []), str(tmp_path))
    assert s["steps"] == ["make", "use"] and s["rows"] == 4 and s["rejects"] == 5 and "failure" not in s
    assert set(read_manifest(str(tmp_path))) == {"made", "used"}
    again = t.run(load(None, []), str(tmp_path), step="use")
    assert again["step"] == "use" and again["metrics"]["read"] == "x" and list(again["step_seconds"]) == ["use"]


def test_a_single_step_without_its_inputs_is_one_line_before_running(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"step use reads made: .*python -m pipelines make --run-dir"):
        toy().plan(load(None, []), str(tmp_path), "use")


def test_a_step_failure_is_reported_after_its_outputs_are_recorded(tmp_path):
    s = toy().run(load(None, ["max_bad=1"]), str(tmp_path))
    assert s["failure"] == "step use: 5 rejected" and s["outputs"]["used"].endswith("/used")
    assert "used" in read_manifest(str(tmp_path))


def test_a_corrupt_manifest_is_one_line(tmp_path):
    (tmp_path / "run.json").write_text("[1, 2")
    with pytest.raises(RunFailed, match="cannot read the run folder's manifest") as e:
        read_manifest(str(tmp_path))
    assert "\n" not in str(e.value)
    (tmp_path / "run.json").write_text(json.dumps({"outputs": [1]}))
    with pytest.raises(RunFailed, match="not a mapping"):
        read_manifest(str(tmp_path))


def test_flag_aliases_pass_plain_strings_and_may_have_hyphens(tmp_path, capsys):
    seen = []

    def stop(cfg):  # the template's preflight: record the config, stop before any cluster work
        seen.append(cfg.path)
        raise RunFailed("stop")

    t = toy(options={"input-path": "path"}, preflight=stop)
    for value in ("/data/batch #1", "2024", "yes", "null"):
        assert t.main(["--input-path", value, "--run-dir", str(tmp_path)]) == 1
    assert seen == ["/data/batch #1", "2024", "yes", "null"]
    assert "error: stop" in capsys.readouterr().err


def test_step_names_must_be_unique_and_not_all():
    with pytest.raises(ValueError, match="unique"):
        Template(name="bad", load_config=load, key_metric="m",
                 steps=[Step("all", lambda c, r: StepResult())])
