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
        import time
        deadline = time.monotonic() + float(sys.argv[3])
        while True:  # a restarted GCS may take a moment to serve its restored actor table
            try:
                c = ray.get_actor("counter")
                break
            except ValueError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        print("value", ray.get(c.incr.remote(), timeout=float(sys.argv[3])))
""")


def _drive(state, mode, wait_s=60):
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": state.token_path}
    env.pop("RAY_AUTH_TOKEN", None)
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-c", DRIVER, state.gcs_address, mode, str(wait_s)], env=env,
                          capture_output=True, text=True, timeout=wait_s + 180, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_head_restart_keeps_detached_actor(redis_url):
    spec = ResourceGroupSpec(name=f"ha-{os.getpid()}", category="HIGH_AVAILABILITY",
                             worker_groups=[{"name": "cpu", "type": "CPU", "spec": "small"}])
    state = local.up(spec, log=lambda *_: None)
    try:
        assert "value 1" in _drive(state, "create")
        before = local.alive_nodes(state)
        old_head = next(n["node_id"] for n in before if n.get("is_head_node"))
        worker = next(n["node_id"] for n in before if not n.get("is_head_node"))
        head = local.head_processes(state)
        assert any("gcs_server" in " ".join(p.cmdline()) for p in head)
        worker_raylets = [p for p in local.processes(state) if p.name() == "raylet" and p not in head]
        assert len(worker_raylets) == 1
        took = local.restart_head(state, log=lambda *_: None)
        # a new head node, the same worker node (it reconnected, not re-registered); a worker raylet waits
        # ~60 s for its GCS: the head must be back before then
        assert took["old_head"] == old_head and took["new_head"] != old_head and took["workers"] == [worker]
        assert took["started_s"] < 60, took
        assert not any(p.is_running() for p in head)  # exactly those processes were stopped ...
        assert all(p.is_running() for p in worker_raylets)
        assert set(local.head_processes(state)).isdisjoint(head)  # ... and new ones started
        assert "value 2" in _drive(state, "get", wait_s=120)  # the detached actor kept its state
    finally:
        local.down(state.name, log=lambda *_: None)


def test_restart_head_refuses_a_basic_cluster():
    state = local.ClusterState(name="basic", category="BASIC", gcs_port=1, dashboard_port=2, client_port=3,
                               temp_dir="/nonexistent", token_path="")
    with pytest.raises(local.LocalClusterError, match="BASIC: a head restart needs HIGH_AVAILABILITY"):
        local.restart_head(state)


def test_emulator_restart_head_is_a_test_only_action_on_ha_groups(monkeypatch):
    """Emulator.restart_head (no RPC action: the service has none) restarts an HA group's backing head, refuses a
    BASIC group, and the group refuses modify/delete meanwhile."""
    from deploy.emulator import ACTIONS, ApiFault, Emulator, Group

    assert not any("Restart" in a for a in ACTIONS)
    emu = Emulator("k", "s", log=lambda *_: None)
    cluster = local.ClusterState(name="emu-x", category="HIGH_AVAILABILITY", gcs_port=1, dashboard_port=2,
                                 client_port=3, temp_dir="/nonexistent", token_path="")
    groups = [{"name": "cpu", "type": "CPU", "spec": "small"}]
    ha = Group("amv-x", ResourceGroupSpec(name="ha", category="HIGH_AVAILABILITY", worker_groups=groups), "",
               status="ok", cluster=cluster)
    basic = Group("amv-x", ResourceGroupSpec(name="basic", worker_groups=groups), "", status="ok", cluster=cluster)
    emu.groups = {("amv-x", "ha"): ha, ("amv-x", "basic"): basic}
    seen = []

    def fake_restart(state, timeout, log):
        for call in (emu.delete_group, emu.modify_group):
            with pytest.raises(ApiFault, match="restarting its head"):
                call({"DBClusterId": "amv-x", "GroupName": "ha", "RayConfig": "{}"})
        seen.append(state.name)
        return {"recovered_s": 1.0}

    monkeypatch.setattr(local, "restart_head", fake_restart)
    assert emu.restart_head("amv-x", "ha") == {"recovered_s": 1.0} and seen == ["emu-x"]
    assert not ha.restarting and ha.status == "ok"
    with pytest.raises(ApiFault, match="BASIC: a head restart keeps its state only with HIGH_AVAILABILITY"):
        emu.restart_head("amv-x", "basic")
