"""The local provider: a real multi-node cluster with token auth (session fixture)."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deploy import local

ROOT = Path(__file__).resolve().parents[2]


def test_head_has_no_cpus_and_workers_are_labelled(ray_cluster):
    info = local.status(ray_cluster.name)
    heads = [n for n in info["nodes"] if n["head"]]
    workers = [n for n in info["nodes"] if not n["head"]]
    assert len(heads) == 1 and heads[0]["resources"].get("CPU", 0) == 0
    assert len(workers) == 2
    assert all(w["labels"] == {"group": "cpu", "type": "CPU", "serve-port": w["labels"]["serve-port"]}
               and w["resources"]["CPU"] == 2 for w in workers)
    assert len({int(w["labels"]["serve-port"]) for w in workers}) == len(workers)  # a Serve proxy port each


def test_ray_nodes_seen_by_a_driver(ray_connected):
    import ray

    nodes = [n for n in ray.nodes() if n["Alive"]]
    assert sorted(n["Resources"].get("CPU", 0) for n in nodes) == [0, 2, 2]

    @ray.remote(num_cpus=1)
    def where():
        return ray.get_runtime_context().get_node_id()

    head_id = next(n["NodeID"] for n in nodes if n["Resources"].get("CPU", 0) == 0)
    assert head_id not in set(ray.get([where.remote() for _ in range(6)]))


def _job_env(token: str | None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_AUTH_TOKEN"] = token or "wrong-token-" + "0" * 20
    return env


def test_stock_ray_job_submit_with_token(ray_cluster, tmp_path):
    (tmp_path / "job.py").write_text("import ray\nray.init()\nprint('nodes', len(ray.nodes()))\n")
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("ray")), "job", "submit", "--address", ray_cluster.dashboard_url,
         "--working-dir", str(tmp_path), "--", "python", "job.py"],
        env=_job_env(ray_cluster.token()), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "nodes 3" in proc.stdout and "succeeded" in proc.stdout.lower()


def test_job_submit_without_the_token_is_refused(ray_cluster, tmp_path):
    (tmp_path / "job.py").write_text("print('should not run')\n")
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("ray")), "job", "submit", "--address", ray_cluster.dashboard_url,
         "--working-dir", str(tmp_path), "--", "python", "job.py"],
        env=_job_env(None), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "should not run" not in proc.stdout
    assert "uthentication" in proc.stdout + proc.stderr


def test_cli_status_json(ray_cluster):
    import json

    proc = subprocess.run([sys.executable, "-m", "deploy.cli", "cluster", "status", "--name", ray_cluster.name,
                           "--json"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    info = json.loads(proc.stdout)
    assert info["up"] and len(info["nodes"]) == 3
    assert info["ray_address"].startswith("ray://127.0.0.1:") and info["token_path"].endswith("auth_token")
    assert oct(os.stat(info["token_path"]).st_mode & 0o777) == "0o600"


@pytest.mark.slow
def test_up_two_groups_then_down_leaves_no_process(tmp_path):
    """A 2-group spec (CPU + GPU) through the CLI; `down` removes all of its processes and only those."""
    spec = tmp_path / "rg.yaml"
    spec.write_text(
        "name: twogroups\nworker_groups:\n"
        "  - {name: cpu, type: CPU, spec: m.xlarge, min_workers: 1, max_workers: 3}\n"
        "  - {name: gpu, type: GPU, spec: gpu.t4, min_workers: 1, max_workers: 1, distribution_unit: 1/3}\n")
    run = lambda *a: subprocess.run([sys.executable, "-m", "deploy.cli", "cluster", *a], check=False, cwd=ROOT,
                                    capture_output=True, text=True, timeout=240)
    up = run("up", "--spec", str(spec), "--json")
    assert up.returncode == 0, up.stderr
    assert "scaling gpu" in up.stderr
    state = local.load_state("twogroups")
    try:
        info = local.status("twogroups")
        groups = sorted((n["labels"]["group"], n["resources"].get("CPU", 0), n["resources"].get("GPU", 0))
                        for n in info["nodes"])
        assert groups == [("cpu", 2, 0), ("gpu", 2, 1), ("head", 0, 0)]
        assert local.processes(state)
    finally:
        down = run("down", "--name", "twogroups")
    assert down.returncode == 0, down.stderr
    time.sleep(1)
    assert local.processes(state) == []
