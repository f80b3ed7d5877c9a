"""What a group change does to nodes (spec_changes) and the emulator's version-reporting proxy: no Ray."""

import json

from deploy.emulator import DashboardProxy
from deploy.spec import ResourceGroupSpec, spec_changes


def spec(**groups) -> ResourceGroupSpec:
    return ResourceGroupSpec(name="g", worker_groups=[{"name": k, **v} for k, v in groups.items()])


def test_spec_and_type_changes_restart_a_groups_workers_and_the_head():
    old = spec(cpu={"spec": "m.xlarge", "min_workers": 2, "max_workers": 4})
    new = old.model_copy(deep=True)
    new.worker_groups[0].spec = "m.2xlarge"
    new.head.spec = "m.xlarge"
    changes = {c.text: c for c in spec_changes(old, new)}
    assert changes["head: spec small -> m.xlarge"].nodes == 1
    assert changes["head: spec small -> m.xlarge"].does == "restarts the head node"
    restart = changes["worker group cpu: CPU m.xlarge -> CPU m.2xlarge"]
    assert restart.nodes == 2 and restart.does == "restarts its workers (2 or more)"


def test_a_max_below_the_old_min_deletes_workers_and_a_lower_max_above_it_does_not():
    old = spec(cpu={"min_workers": 4, "max_workers": 6})
    (below,) = spec_changes(old, spec(cpu={"min_workers": 1, "max_workers": 2}))
    assert below.text == "worker group cpu: workers 4..6 -> 1..2" and below.nodes == 2
    assert below.does == "deletes 2 worker(s): the new max is below the old min"
    (above,) = spec_changes(old, spec(cpu={"min_workers": 4, "max_workers": 5}))
    assert above.nodes == 0 and above.does == ""


def test_removed_and_added_groups_and_changes_that_touch_no_node():
    old = spec(a={"min_workers": 3, "max_workers": 3}, b={})
    new = spec(b={"disk_gb": 200}, c={"type": "GPU", "spec": "A10"})
    new.requirements = ["lightgbm>=4"]
    changes = {c.text: c for c in spec_changes(old, new)}
    assert changes["worker group a: removed (CPU m.xlarge x3..3)"].nodes == 3
    assert changes["worker group b: disk 100 -> 200 GB"].nodes == 0
    assert changes["worker group c: added (GPU A10 x1..1)"].nodes == 0
    assert changes["requirements: +lightgbm>=4"].nodes == 0
    assert spec_changes(old, old) == []


def test_the_proxy_reports_its_versions_on_the_two_version_endpoints_only():
    proxy = DashboardProxy("http://127.0.0.1:1", {"ray": "2.59.0", "python": "3.10.14"})
    meta = {"result": True, "msg": "", "data": {"rayVersion": "2.60.0", "pythonVersion": "3.11.7",
                                                "rayInitCluster": False}}
    got = json.loads(proxy.rewrite("/api/v0/cluster_metadata", json.dumps(meta).encode()))
    assert got["data"] == {"rayVersion": "2.59.0", "pythonVersion": "3.10.14", "rayInitCluster": False}
    version = {"version": "4", "ray_version": "2.60.0", "ray_commit": "x", "session_name": "s"}
    assert json.loads(proxy.rewrite("/api/version?x=1", json.dumps(version).encode()))["ray_version"] == "2.59.0"
    other = b'{"ray_version": "2.60.0"}'
    assert proxy.rewrite("/api/jobs/", other) == other


def test_a_group_cannot_be_deleted_while_a_change_runs_on_its_nodes():
    """Deleting while modifying would race the change (raylets started after the teardown, a deleted group
    set back to ok): the service refuses it, and so does the emulator."""
    import pytest

    from deploy.emulator import ApiFault, Emulator, Group

    emu = Emulator("ak", "sk")
    emu.groups[("amv-1", "g")] = Group("amv-1", spec(cpu={"min_workers": 1, "max_workers": 1}), "", status="modifying")
    with pytest.raises(ApiFault) as refused:
        emu.delete_group({"DBClusterId": "amv-1", "GroupName": "g"})
    assert refused.value.code == "OperationDenied.GroupStatus" and "modifying" in refused.value.message
    assert emu.groups[("amv-1", "g")].status == "modifying"
