"""``adbray new``: a template taken into a team repo is found through its entry point, and its own
generated tests pass in a fresh venv that sees adbray (not a reinstall of torch and Ray)."""
from __future__ import annotations

import os
import site
import subprocess
import sys
from pathlib import Path

import pytest

from deploy.scaffold import ScaffoldError, check_name, new_template

ADBRAY = str(Path(sys.executable).with_name("adbray"))


def sh(cmd, **kw):
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, check=False, **kw)
    assert proc.returncode == 0, f"{cmd[:4]} -> {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.parametrize("name", ["Team", "1team", "json", "ray", "team-fraud", "class"])
def test_bad_names_are_refused(name):
    with pytest.raises(ScaffoldError):
        check_name(name)


def test_an_existing_folder_is_not_overwritten(tmp_path):
    (tmp_path / "teamx").mkdir()
    with pytest.raises(ScaffoldError, match="already exists"):
        new_template("teamx", "squares", tmp_path)


def test_new_from_riskcontrol_runs_its_tests_in_a_fresh_venv_and_joins_the_demo(tmp_path):
    project = Path(sh([ADBRAY, "new", "teamfraud", "--from", "riskcontrol", "--dir", tmp_path]).stdout.strip())
    assert (project / "pyproject.toml").is_file() and (project / "teamfraud" / "template.py").is_file()
    assert "riskcontrol" not in (project / "teamfraud" / "template.py").read_text()

    venv = tmp_path / "venv"
    sh([sys.executable, "-m", "venv", "--without-pip", venv])
    py = venv / "bin" / "python"
    purelib = sh([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    # the new venv sees this environment's packages (adbray, Ray, torch, setuptools) behind its own
    Path(purelib, "adbray-env.pth").write_text(f"import site; site.addsitedir({site.getsitepackages()[0]!r})\n")
    sh([sys.executable, "-m", "pip", "--python", py, "install", "-q", "--no-deps", "--no-build-isolation",
        "-e", project])

    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH", "PYTEST"))}
    env["ADBRAY_STATE"] = str(tmp_path / "state")
    found = sh([py, "-c", "from pipelines.template import discover; print(sorted(discover()))"], env=env)
    assert "teamfraud" in found.stdout and "riskcontrol" in found.stdout

    # the demo first, kept up: the project's own tests then run on its (warm) cluster
    demo = sh([py, "-m", "deploy.cli", "demo", "--template", "teamfraud", "--small", "--keep"], cwd=tmp_path,
              env=env, timeout=900)
    try:
        row = next(line for line in demo.stdout.splitlines() if line.startswith("teamfraud"))
        assert " ok " in row and "auprc=" in row, demo.stdout
        # the run went to the demo cluster's OSS stand-in; its summary, plots and report were copied back
        remote, copied = row.split()[-3], tmp_path / row.split()[-1]
        assert remote.startswith("oss://") and (copied / "summary.json").is_file(), row
        assert list(copied.glob("**/*.png")), sorted(copied.rglob("*"))
        assert f"  {row.split()[-1]}/index.html" in demo.stdout and (copied / "index.html").is_file()
        assert (copied / "driver.log").is_file() and (copied / "config.yaml").is_file()
        assert len(demo.stderr.splitlines()) < 60, demo.stderr[-3000:]  # progress lines, not Ray's logs

        tests = sh([py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--timeout=600", project / "tests"],
                   cwd=project, env={**env, "ADBRAY_TEST_CLUSTER": "adbray-demo"}, timeout=900)
        assert "3 passed" in tests.stdout, tests.stdout[-2000:]
    finally:
        sh([py, "-m", "deploy.cli", "cluster", "down", "--name", "adbray-demo"], env=env, timeout=300)
