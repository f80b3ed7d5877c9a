"""Autoscaling rehearsal: Ray's autoscaler (fake multi-node provider) on a group with min != max.

A job with bounded parallelism keeps the group at min; an unbounded task flood drives it to max
(the service's documented pitfall), `adbray submit` warns about it beforehand, and idle workers are
removed again.
"""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deploy import local
from deploy.spec import ResourceGroupSpec

ROOT = Path(__file__).resolve().parents[2]
CONFIG = "deploy/examples/squares/configs/local.yaml"


def workers(state):
    return [n for n in local.alive_nodes(state) if not n.get("is_head_node")]


@pytest.mark.slow
def test_bounded_job_stays_at_min_flood_scales_to_max_then_back(monkeypatch, tmp_path):
    monkeypatch.setattr(local, "AUTOSCALE_IDLE_S", 4.0)
    spec = ResourceGroupSpec(name=f"scale-{os.getpid()}", worker_groups=[
        {"name": "cpu", "type": "CPU", "spec": "small", "min_workers": 1, "max_workers": 3}])
    spec_file = tmp_path / "rg.yaml"
    spec_file.write_text(f"name: {spec.name}\nworker_groups:\n"
                         "  - {name: cpu, type: CPU, spec: small, min_workers: 1, max_workers: 3}\n")
    state = local.up(spec, log=lambda *_: None, autoscale=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}

    def submit(*sets, wait=True):
        args = [sys.executable, "-m", "deploy.cli", "submit", "deploy.examples.squares", "--config", CONFIG,
                "--address", state.dashboard_url, "--token-file", state.token_path, "--spec", str(spec_file)]
        for s in sets:
            args += ["--set", s]
        if not wait:
            return subprocess.Popen(args + ["--no-wait"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
        return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)

    try:
        assert [n["resources_total"]["CPU"] for n in workers(state)] == [1]
        bounded = submit("pool.max_actors=1", "chunks=4")
        assert bounded.returncode == 0, bounded.stderr[-2000:]
        assert "drive autoscaling" not in bounded.stderr and "preflight ok" in bounded.stderr
        assert len(workers(state)) == 1, "a bounded job must not scale the group"

        flood = submit("flood.num_tasks=6", "flood.seconds=6", "pool.max_actors=1", wait=False)
        _, err = flood.communicate(timeout=120)
        assert flood.returncode == 0, err[-2000:]
        assert "asks 6 CPUs at once" in err and "the rest will queue" in err  # 6 > 3 workers x 1 CPU
        peak, deadline = 1, time.time() + 90
        while time.time() < deadline and peak < 3:
            peak = max(peak, len(workers(state)))
            time.sleep(1)
        assert peak == 3, f"the flood should drive the group to max (3), saw {peak}"
        deadline = time.time() + 120
        while time.time() < deadline and len(workers(state)) > 1:
            time.sleep(2)
        assert len(workers(state)) == 1, "idle workers should be removed back to min"
    finally:
        local.down(state.name, log=lambda *_: None)
    assert local.processes(state) == []
