"""Group changes that restart or delete nodes, and Ray/Python version checks, on the emulator.

One fixed-size group (two worker groups of one worker each, no autoscaler) backs every test here:
the version checks see it through the emulator's version-reporting dashboard proxy; then a job that
holds an object on worker group ``b`` and a detached actor placed there meet a `group modify` that
changes ``b``'s spec, which the emulator applies to the backing cluster by restarting that worker.
"""

import json
import platform
import re
import shlex
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import ray

from deploy import local
from pipelines.connect import cluster_versions
from tests.deploy.test_emulator_e2e import CLUSTER_ID, CONFIG, ROOT, adbray, emu  # noqa: F401 - fixture

NAME = "changes"
SPEC = """name: changes
category: BASIC
storage: oss://adbray-changes-runs/
head: {spec: small, disk_gb: 100}
worker_groups:
  - {name: a, type: CPU, spec: small, disk_gb: 100, min_workers: 1, max_workers: 1}
  - {name: b, type: CPU, spec: small, disk_gb: 100, min_workers: 1, max_workers: 1}
"""
OTHER = {"ray": "2.59.0", "python": "3.10.14"}

# the job: a detached actor on b, an object in b's object store (no lineage: max_retries=0), then it waits
# for b's worker to go and reads the object
JOB = """
import time, numpy as np, ray
ray.init()
@ray.remote(num_cpus=0, max_restarts=-1, label_selector={"group": "b"})
class Keeper:
    def node(self):
        return ray.get_runtime_context().get_node_id()
keeper = Keeper.options(name="keeper", namespace="changes", lifetime="detached").remote()
node = ray.get(keeper.node.remote())
@ray.remote(num_cpus=1, max_retries=0, label_selector={"group": "b"})
def block():
    return np.ones(2_000_000)
ref = block.remote()
ray.wait([ref], fetch_local=False)
print("READY", node, flush=True)
deadline = time.time() + 180
while time.time() < deadline and any(n["NodeID"] == node and n["Alive"] for n in ray.nodes()):
    time.sleep(0.5)
print("NODE GONE", flush=True)
print("SUM", ray.get(ref, timeout=60).sum(), flush=True)
"""


@pytest.fixture(scope="module")
def fixed_group(emu, tmp_path_factory):  # noqa: F811 - the fixture imported above
    spec = tmp_path_factory.mktemp("changes") / "resource_group.yaml"
    spec.write_text(SPEC)
    proc = adbray(emu, "group", "create", str(spec), "--wait", "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    info["spec_path"] = spec
    yield info
    if emu.groups[(CLUSTER_ID, NAME)].status != "deleted":
        adbray(emu, "group", "delete", NAME, "--yes", "--wait")


def _client(emulator, name):
    from ray.job_submission import JobSubmissionClient

    from deploy import openapi

    info = json.loads(adbray(emulator, "group", "describe", name, "--json").stdout)
    token = openapi.load_token(CLUSTER_ID, name)
    return JobSubmissionClient(info["RayConfig"]["RayDashboardAddress"], headers={"Authorization": f"Bearer {token}"})


def test_versions_ctl_warns_and_ray_client_is_refused_in_one_line(emu, fixed_group):  # noqa: F811
    """The group reports Ray 2.59.0 / Python 3.10.14 (the emulator's dashboard proxy): submit prints both
    and warns, and the job still runs (CTL runs it on the cluster's Python); connect() from here refuses."""
    proxy = emu.report_versions(CLUSTER_ID, NAME, **OTHER)
    try:
        described = json.loads(adbray(emu, "group", "describe", NAME, "--json").stdout)
        assert described["RayConfig"]["RayDashboardAddress"] == proxy
        proc = adbray(emu, "submit", "deploy.examples.squares", "--config", CONFIG, "--group", NAME)
        assert proc.returncode == 0, proc.stderr[-3000:]
        mine = f"here Ray {ray.__version__} / Python {platform.python_version()}"
        assert f"cluster Ray 2.59.0 / Python 3.10.14, {mine}" in proc.stderr
        warning = next(line for line in proc.stderr.splitlines() if line.startswith("warning: version mismatch"))
        assert "the job runs on the cluster's" in warning and "SUCCEEDED" in proc.stderr
        # a ray:// client from here: one line naming both, and no Ray started or joined
        code = ("import ray\nfrom pipelines.connect import VersionMismatch, connect\n"
                f"try:\n    connect({fixed_group['cluster']!r}, dashboard={proxy!r})\n"
                "except VersionMismatch as e:\n    print('refused:', e)\n"
                "print('initialized', ray.is_initialized())\n")
        env = {**emu.cli_env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": fixed_group["token_path"]}
        out = subprocess.run([sys.executable, "-c", code], check=False, cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        refused = [line for line in out.stdout.splitlines() if line.startswith("refused:")]
        assert len(refused) == 1 and f"cluster Ray 2.59.0 / Python 3.10.14, {mine}" in refused[0]
        assert "initialized False" in out.stdout
    finally:
        emu.report_versions(CLUSTER_ID, NAME)
    # the real dashboard again: its versions are this process's
    backing = emu.groups[(CLUSTER_ID, NAME)].cluster
    assert json.loads(adbray(emu, "group", "describe", NAME, "--json").stdout)["RayConfig"][
        "RayDashboardAddress"] == backing.dashboard_url
    assert cluster_versions(backing.dashboard_url, backing.headers()) == {
        "ray": ray.__version__, "python": platform.python_version()}


def test_modify_restarting_a_worker_under_a_job(emu, fixed_group):  # noqa: F811
    """Refused without --yes while the job runs (diff, consequences and the job listed), delete likewise;
    with --yes the emulator restarts b's worker: the detached actor is redeployed on the new node, and
    the job that needed the object on the old one fails with Ray's object-lost error, not a hang."""
    client = _client(emu, NAME)
    job = client.submit_job(entrypoint=f"python -c {shlex.quote(JOB)}")
    deadline = time.time() + 120
    ready = re.compile(r"^READY ([0-9a-f]+)$", re.MULTILINE)
    while not ready.search(client.get_job_logs(job)):
        assert time.time() < deadline and client.get_job_status(job).value in ("PENDING", "RUNNING"), \
            client.get_job_logs(job)[-2000:]
        time.sleep(0.5)
    old_node = ready.search(client.get_job_logs(job)).group(1)
    changed = Path(fixed_group["spec_path"]).with_name("changed.yaml")
    changed.write_text(SPEC.replace("{name: b, type: CPU, spec: small", "{name: b, type: CPU, spec: m.xlarge"))

    refused = adbray(emu, "group", "modify", str(changed))
    assert refused.returncode == 1, refused.stderr
    assert "worker group b: CPU small -> CPU m.xlarge: restarts its workers (1 or more)" in refused.stderr
    assert f"running job {job} (RUNNING)" in refused.stderr and "object store are lost" in refused.stderr
    assert "pass --yes" in refused.stderr.strip().splitlines()[-1]
    kept = adbray(emu, "group", "delete", NAME)
    assert kept.returncode == 1 and "interrupts 1 running job(s)" in kept.stderr
    backing = emu.groups[(CLUSTER_ID, NAME)].cluster
    assert any(n["node_id"] == old_node for n in local.alive_nodes(backing))

    applied = adbray(emu, "group", "modify", str(changed), "--yes")
    assert applied.returncode == 0, applied.stderr
    assert any("b: worker" in line and "restarted (small -> m.xlarge)" in line
               for line in emu.groups[(CLUSTER_ID, NAME)].changes)
    nodes = {n["node_id"]: n for n in local.alive_nodes(backing)}
    assert old_node not in nodes
    new_b = [i for i, n in nodes.items() if (n.get("labels") or {}).get("group") == "b"]
    assert len(new_b) == 1 and nodes[new_b[0]]["resources_total"]["CPU"] == 2  # m.xlarge, capped locally

    deadline = time.time() + 90
    while client.get_job_status(job).value not in ("FAILED", "SUCCEEDED", "STOPPED"):
        assert time.time() < deadline, client.get_job_logs(job)[-2000:]
        time.sleep(0.5)
    info = client.get_job_info(job)
    logs = client.get_job_logs(job)
    assert info.status.value == "FAILED" and re.search(r"^NODE GONE$", logs, re.MULTILINE), logs[-2000:]
    assert not re.search(r"^SUM ", logs, re.MULTILINE)
    assert "ObjectLostError" in logs or "ObjectReconstructionFailed" in logs, logs[-2000:]

    # the detached actor: redeployed by Ray on b's new worker
    deadline = time.time() + 60
    while True:
        req = urllib.request.Request(f"{backing.dashboard_url}/api/v0/actors?detail=1&limit=100",
                                     headers=backing.headers())
        with urllib.request.urlopen(req, timeout=10) as resp:
            actors = json.loads(resp.read())["data"]["result"]["result"]
        keeper = next(a for a in actors if a.get("name") == "keeper")
        if keeper["state"] == "ALIVE" and keeper["node_id"] == new_b[0]:
            break
        assert time.time() < deadline, keeper
        time.sleep(1)
    assert int(keeper["num_restarts"]) >= 1

    gone = adbray(emu, "group", "delete", NAME, "--wait")  # no job runs now: no --yes needed
    assert gone.returncode == 0, gone.stderr
    assert local.processes(backing) == []
