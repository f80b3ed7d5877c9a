"""End to end against the emulator with the real SDK, the real job API and a real local cluster.

plan -> create -> wait -> submit (SUCCEEDED, logs hold the summary) -> failing job -> wrong token ->
stock `ray job submit` -> delete (cluster gone). One emulator-backed group serves every step.
"""

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from deploy import local
from deploy.emulator import Emulator
from deploy.spec import load_spec
from pipelines import io

ROOT = Path(__file__).resolve().parents[2]
SPEC = "deploy/examples/squares/resource_group.yaml"
CONFIG = "deploy/examples/squares/configs/local.yaml"
CLUSTER_ID = "amv-e2etest"


@pytest.fixture(scope="module")
def emu():
    emulator = Emulator("e2e-key-id", "e2e-key-secret", log=lambda *_: None).start()
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("RAY_AUTH", "ALIBABA_CLOUD")) and k != "RAY_ADDRESS"
    }
    env.update(
        ALIBABA_CLOUD_ACCESS_KEY_ID="e2e-key-id",
        ALIBABA_CLOUD_ACCESS_KEY_SECRET="e2e-key-secret",
        ADBRAY_ENDPOINT=emulator.endpoint,
        ADBRAY_CLUSTER_ID=CLUSTER_ID,
    )
    emulator.cli_env = env
    try:
        yield emulator
    finally:
        emulator.stop(delete_groups=True)


def adbray(emu, *args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "deploy.cli", *args],
        cwd=ROOT,
        env=emu.cli_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def group(emu):
    proc = adbray(emu, "group", "create", SPEC, "--wait", "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    yield info


def test_create_wait_gives_addresses_and_the_token_is_the_clusters(emu, group):
    assert group["status"] == "ok" and group["dashboard"].startswith("http://127.0.0.1:")
    assert group["cluster"].startswith("ray://127.0.0.1:")
    token_path = Path(group["token_path"])
    assert stat.S_IMODE(os.stat(token_path).st_mode) == 0o600
    backing = emu.groups[(CLUSTER_ID, "squares")].cluster
    assert backing.token() == token_path.read_text().strip() and backing.dashboard_url == group["dashboard"]
    again = adbray(emu, "group", "create", SPEC)
    assert again.returncode == 1 and "InvalidDBResourceGroup.Duplicate" in again.stderr


def test_submit_succeeds_and_logs_hold_the_summary(emu, group, monkeypatch):
    proc = adbray(emu, "submit", "deploy.examples.squares", "--config", CONFIG, "--group", "squares")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "preflight ok" in proc.stderr and "matches group squares" in proc.stderr
    job_id = re.search(r"submitted job (\S+):", proc.stderr).group(1)
    assert f"job {job_id} SUCCEEDED" in proc.stderr
    # the group autoscales (min 1, max 2); the job's bounded pool (2 x 1 CPU) keeps it at min
    backing = emu.groups[(CLUSTER_ID, "squares")].cluster
    assert backing.autoscaling_config and "drive autoscaling" not in proc.stderr
    assert len([n for n in local.alive_nodes(backing) if not n.get("is_head_node")]) == 1
    logs = adbray(emu, "jobs", "logs", job_id, "--group", "squares")
    assert logs.returncode == 0, logs.stderr
    summary = json.loads([line for line in logs.stdout.splitlines() if line.startswith('{"template"')][-1])
    assert summary["template"] == "squares" and summary["metrics"]["sum_of_squares"] == 63 * 64 * 127 // 6
    # without --run-dir the outputs go to the group's storage (its spec's `storage:`), printed before upload
    storage = load_spec(SPEC).storage
    assert summary["run_dir"].startswith(f"{storage}runs/squares/")
    assert f"outputs go to {summary['run_dir']} " in proc.stderr
    for key, value in backing.storage_env().items():  # read it back from the group's stand-in
        monkeypatch.setenv(key, value)
    assert io.read_json(io.join(summary["run_dir"], "summary.json"))["metrics"] == summary["metrics"]
    listed = json.loads(adbray(emu, "jobs", "list", "--group", "squares", "--json").stdout)
    assert {"job_id": job_id, "status": "SUCCEEDED"}.items() <= next(
        j for j in listed if j["job_id"] == job_id
    ).items()


def test_failing_job_exits_nonzero_with_its_error(emu, group):
    proc = adbray(
        emu,
        "submit",
        "deploy.examples.squares",
        "--config",
        CONFIG,
        "--set",
        "fail=true",
        "--group",
        "squares",
    )
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert re.match(r"error: job \S+ FAILED: ", last) and "fail: true in the config" in last, proc.stderr[
        -2000:
    ]


def test_wrong_token_is_refused_and_no_job_starts(emu, group, tmp_path):
    before = json.loads(adbray(emu, "jobs", "list", "--group", "squares", "--json").stdout)
    bad = tmp_path / "token"
    bad.write_text("not-the-token-" + "0" * 40)
    proc = adbray(
        emu,
        "submit",
        "deploy.examples.squares",
        "--config",
        CONFIG,
        "--group",
        "squares",
        "--token-file",
        str(bad),
    )
    assert proc.returncode == 1 and "authentication failed" in proc.stderr.strip().splitlines()[-1]
    assert "submitted job" not in proc.stderr
    after = json.loads(adbray(emu, "jobs", "list", "--group", "squares", "--json").stdout)
    assert len(after) == len(before)


def test_stock_ray_job_submit_works_on_the_same_group(emu, group):
    env = {**emu.cli_env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": Path(group["token_path"]).read_text()}
    proc = subprocess.run(
        [
            str(Path(sys.executable).with_name("ray")),
            "job",
            "submit",
            "--address",
            group["dashboard"],
            "--working-dir",
            ".",
            "--",
            "python",
            "-m",
            "deploy.examples.squares",
            "--config",
            CONFIG,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert '"template": "squares"' in proc.stdout and "succeeded" in proc.stdout.lower()


def test_modify_is_validated_and_recorded(emu, group, tmp_path):
    spec = tmp_path / "rg.yaml"
    spec.write_text((ROOT / SPEC).read_text().replace("max_workers: 2", "max_workers: 3"))
    proc = adbray(emu, "group", "modify", str(spec))
    assert proc.returncode == 0, proc.stderr
    info = json.loads(adbray(emu, "group", "describe", "squares", "--json").stdout)
    assert (
        info["RayConfig"]["WorkerGroups"][0]["MaxWorkerQuantity"] == 3
        and "AuthToken" not in info["RayConfig"]
    )
    spec.write_text(spec.read_text().replace("category: BASIC", "category: HIGH_AVAILABILITY"))
    refused = adbray(emu, "group", "modify", str(spec))
    assert refused.returncode == 1 and "OperationDenied.Category" in refused.stderr


def test_delete_stops_the_cluster(emu, group):
    backing = emu.groups[(CLUSTER_ID, "squares")].cluster
    assert local.processes(backing)
    proc = adbray(emu, "group", "delete", "squares", "--wait")
    assert proc.returncode == 0, proc.stderr
    assert local.processes(backing) == []
    assert not Path(group["token_path"]).exists()
    gone = adbray(emu, "group", "describe", "squares")
    assert gone.returncode == 1 and "InvalidDBResourceGroup.NotFound" in gone.stderr


def test_a_group_made_without_a_token_runs_jobs_and_clients_connect_without_one(emu):
    """A group as the console makes it: no AuthToken. submit + run on it work with no token anywhere:
    the job's driver trusts its own environment (connect() inside a job)."""
    created = adbray(emu, "group", "create", SPEC, "--name", "squares-open", "--no-token", "--wait", "--json")
    assert created.returncode == 0, created.stderr
    assert "no Ray token" in created.stderr and json.loads(created.stdout.splitlines()[-1])["token_path"] is None
    backing = emu.groups[(CLUSTER_ID, "squares-open")].cluster
    try:
        assert backing.token() == "" and backing.auth_env() == {"RAY_AUTH_MODE": "disabled"}
        proc = adbray(emu, "submit", "deploy.examples.squares", "--config", CONFIG, "--group", "squares-open")
        assert proc.returncode == 0, proc.stderr[-3000:]
        job_id = re.search(r"submitted job (\S+):", proc.stderr).group(1)
        assert f"job {job_id} SUCCEEDED" in proc.stderr
        logs = adbray(emu, "jobs", "logs", job_id, "--group", "squares-open")
        summary = json.loads([line for line in logs.stdout.splitlines() if line.startswith('{"template"')][-1])
        assert summary["metrics"]["sum_of_squares"] == 63 * 64 * 127 // 6
    finally:
        assert adbray(emu, "group", "delete", "squares-open", "--wait").returncode == 0
    assert local.processes(backing) == []


def test_riskcontrol_jobs_on_its_group_write_to_and_read_from_the_groups_storage(emu, tmp_path, monkeypatch):
    """The template's own group shape (its requirements, storage and worker type; one worker here) on the
    emulator. A first job (the data step) writes to the group's storage by default and `adbray jobs logs`
    shows where; a second job (features) reads it from there: no two jobs share a disk, only the storage.
    (The whole template on an isolated cluster with an oss:// run folder: tests/riskcontrol, test_contract.)"""
    from pipelines.template import load_template, read_manifest

    spec_text = (ROOT / "riskcontrol" / "resource_group.yaml").read_text()
    spec = tmp_path / "resource_group.yaml"
    spec.write_text(re.sub(r"min_workers: \d+, max_workers: \d+", "min_workers: 1, max_workers: 1", spec_text))
    created = adbray(emu, "group", "create", str(spec), "--wait", "--json")
    assert created.returncode == 0, created.stderr
    small = [x for item in load_template("riskcontrol").test_overrides for x in ("--set", item)]
    common = ["--config", "riskcontrol/configs/local.yaml", *small, "--group", "riskcontrol"]
    data = adbray(emu, "submit", "riskcontrol", "--step", "data", *common)
    assert data.returncode == 0, data.stderr[-3000:]
    assert "runtime_env pip" not in data.stderr  # the group was created with what the template needs
    run_dir = re.search(r"^outputs go to (\S+) ", data.stderr, re.MULTILINE).group(1)
    assert run_dir.startswith(f"{load_spec(str(spec)).storage}runs/riskcontrol/")
    job_id = re.search(r"submitted job (\S+):", data.stderr).group(1)
    logs = adbray(emu, "jobs", "logs", job_id, "--group", "riskcontrol")
    summary = json.loads([line for line in logs.stdout.splitlines() if line.startswith('{"template"')][-1])
    assert summary["run_dir"] == run_dir and summary["step"] == "data"
    assert summary["outputs"]["transactions"].startswith(run_dir + "/")

    features = adbray(emu, "submit", "riskcontrol", "--step", "features", *common, "--run-dir", run_dir)
    assert features.returncode == 0, features.stderr[-3000:]
    for key, value in emu.groups[(CLUSTER_ID, "riskcontrol")].cluster.storage_env().items():
        monkeypatch.setenv(key, value)  # read back from the group's stand-in
    outputs = read_manifest(run_dir)  # the run folder's record of what each step wrote
    assert outputs["features"].startswith(run_dir + "/") and outputs["transactions"] == summary["outputs"]["transactions"]
    rows = io.read_table(outputs["transactions"], columns=["transaction_id"]).num_rows
    assert rows == summary["metrics"]["transactions"] > 0
    featured = io.read_table(outputs["features"], columns=["transaction_id"]).num_rows
    assert 0 < featured and featured + io.read_table(outputs["rejects"]).num_rows == rows
    deleted = adbray(emu, "group", "delete", "riskcontrol", "--wait")
    assert deleted.returncode == 0, deleted.stderr
