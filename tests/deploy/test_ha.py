"""HIGH_AVAILABILITY: GCS state in the local Redis; a head restart keeps a detached actor."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from deploy import local
from deploy.spec import ResourceGroupSpec

ROOT = Path(__file__).resolve().parents[2]

DRIVER = textwrap.dedent("""
    import sys, ray
    ray.init(address=sys.argv[1], namespace="ha")
    if sys.argv[2] == "create":
        @ray.remote(num_cpus=0.1, max_restarts=-1)
        class Counter:
            def __init__(self):
                self.n = 0
            def incr(self):
                self.n += 1
                return self.n
        c = Counter.options(name="counter", lifetime="detached").remote()
        print("value", ray.get(c.incr.remote()))
    else:
        c = ray.get_actor("counter")
        print("value", ray.get(c.incr.remote(), timeout=60))
""")


def _drive(state, mode):
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": state.token_path}
    env.pop("RAY_AUTH_TOKEN", None)
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-c", DRIVER, state.gcs_address, mode], env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_head_restart_keeps_detached_actor(redis_url):
    spec = ResourceGroupSpec(name=f"ha-{os.getpid()}", category="HIGH_AVAILABILITY",
                             worker_groups=[{"name": "cpu", "type": "CPU", "spec": "small"}])
    state = local.up(spec, log=lambda *_: None)
    try:
        assert "value 1" in _drive(state, "create")
        head = local.head_processes(state)
        assert any("gcs_server" in " ".join(p.cmdline()) for p in head)
        local.kill_processes(head, grace=3)
        local.start_head(state)
        local.wait_for_nodes(state, 2, timeout=120)
        assert "value 2" in _drive(state, "get")
    finally:
        local.down(state.name, log=lambda *_: None)
