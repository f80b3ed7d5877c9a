"""``adbray submit`` of registered templates: ``python -m T STEP`` with a run folder, and a team repo's
template uploads its own project and brings adbray along (unless the group's image has it)."""
from __future__ import annotations

from importlib.metadata import EntryPoint

import pytest

import pipelines.template as T
from deploy import jobs
from deploy.scaffold import new_template
from deploy.spec import REPO_ROOT


def test_a_built_in_step_maps_to_the_contract_and_needs_a_run_dir():
    with pytest.raises(jobs.SubmitError, match="give --run-dir"):
        jobs.prepare("riskcontrol", step="train")
    with pytest.raises(jobs.SubmitError, match="has no step 'trian'"):
        jobs.prepare("riskcontrol", step="trian", run_dir="oss://bucket/rc")
    plan = jobs.prepare("riskcontrol", step="train", run_dir="oss://bucket/rc")
    assert plan.entrypoint.startswith("python -m riskcontrol train --config riskcontrol/configs/cluster.yaml")
    assert plan.entrypoint.endswith("--run-dir oss://bucket/rc")
    assert plan.runtime_env["working_dir"] == str(REPO_ROOT.resolve())
    assert "adbray" not in plan.runtime_env.get("pip", [])


def test_a_team_repo_template_uploads_its_project_and_adds_adbray(tmp_path, monkeypatch):
    project = new_template("teamx", "squares", tmp_path)
    monkeypatch.syspath_prepend(str(project))
    installed = T.discover()
    ep = EntryPoint(name="teamx", value="teamx.template:TEMPLATE", group=T.ENTRY_POINT_GROUP)
    monkeypatch.setattr(T, "discover", lambda: {**installed, "teamx": ep})

    plan = jobs.prepare("teamx", step="teamx")  # the scaffold renames squares (template and step) to teamx
    assert plan.runtime_env["working_dir"] == str(project)
    assert plan.entrypoint.startswith("python -m teamx teamx --config teamx/configs/")
    assert "adbray" in plan.runtime_env["pip"]
    plan = jobs.prepare("teamx", image_has_adbray=True)
    assert "adbray" not in plan.runtime_env.get("pip", [])
