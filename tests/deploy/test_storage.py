"""The rehearsal behaves like a real group at storage: each worker its own disk, an OSS stand-in,
local run folders refused on a cluster, and jobs whose outputs land in the cluster's storage."""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from deploy import isolate, jobs, local, openapi
from deploy.spec import ResourceGroupSpec, load_spec
from pipelines import io
from pipelines.config import ConfigError
from pipelines.template import prepare_run_dir, shared_disk_problem

ROOT = Path(__file__).resolve().parents[2]


def _workers(state) -> list[str]:
    return sorted(n["node_id"] for n in local.alive_nodes(state) if not n.get("is_head_node"))


@ray.remote(num_cpus=0)
def _write(paths: list[str]) -> None:
    for p in paths:
        Path(p).parent.mkdir(parents=True, exist_ok=True)
        Path(p).write_text("written on one worker")


@ray.remote(num_cpus=0)
def _seen(paths: list[str]) -> list[bool]:
    return [os.path.exists(p) for p in paths]


def test_a_file_a_task_writes_is_seen_on_its_worker_only(ray_connected, ray_cluster, tmp_path):
    if ray_cluster.disks != "isolated":
        problem = isolate.unshare_problem() or "the cluster was started with shared disks"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI=true: disks must be isolated here: {problem}")
        pytest.skip(problem)
    a, b = _workers(ray_cluster)[:2]
    tag = uuid.uuid4().hex[:8]
    runs_root = ray_cluster.private_paths[1]  # the driver's run-folder root (./runs or $ADBRAY_RUNS)
    paths = [f"/tmp/adbray-isolation-{tag}", f"{runs_root}/isolation-{tag}/part-0", str(tmp_path / tag)]
    on = {n: NodeAffinitySchedulingStrategy(n, soft=False) for n in (a, b)}
    ray.get(_write.options(scheduling_strategy=on[a]).remote(paths))

    assert ray.get(_seen.options(scheduling_strategy=on[a]).remote(paths)) == [True, True, True]
    assert ray.get(_seen.options(scheduling_strategy=on[b]).remote(paths)) == [False, False, False]
    assert [os.path.exists(p) for p in paths] == [False, False, False]  # the driver
    # the code and the venv stay visible on the workers
    assert ray.get(_seen.options(scheduling_strategy=on[a]).remote([sys.executable, str(ROOT / "pipelines")])) \
        == [True, True]


def test_status_reports_disks_and_storage_that_tasks_and_the_driver_share(ray_connected, ray_cluster):
    info = local.status(ray_cluster.name)
    assert info["disks"] == ray_cluster.disks and info["disks"] in ("isolated", "shared")
    assert info["storage"]["uri"].startswith("oss://") and info["storage"]["endpoint"].startswith("http://127.0.0.1:")
    assert os.environ["ADBRAY_STORAGE"] == info["storage"]["uri"]
    uri = io.join(info["storage"]["uri"], "tests", f"shared-{uuid.uuid4().hex[:6]}.txt")

    @ray.remote(num_cpus=0)
    def put(u):
        return io.write_bytes(u, b"from a worker")

    ray.get(put.remote(uri))
    assert io.read_bytes(uri) == b"from a worker"


def test_cluster_env_prints_what_a_driver_needs(ray_cluster, monkeypatch):
    monkeypatch.setenv("ADBRAY_STATE", os.environ["ADBRAY_STATE"])
    proc = subprocess.run([sys.executable, "-m", "deploy.cli", "cluster", "env", "--name", ray_cluster.name],
                          capture_output=True, text=True, check=False, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    exported = dict(line.removeprefix("export ").split("=", 1) for line in proc.stdout.splitlines())
    assert exported["RAY_ADDRESS"] == ray_cluster.gcs_address
    assert exported["ADBRAY_STORAGE"].strip("'") == ray_cluster.storage["uri"]
    assert exported["OSS_ENDPOINT"].strip("'") == ray_cluster.storage["endpoint"]
    assert exported["ADBRAY_DISKS"] == ray_cluster.disks


# ------------------------------------------------------------ local run folders on a cluster
def test_a_local_run_folder_on_a_cluster_is_refused_unless_shared(monkeypatch, tmp_path):
    monkeypatch.delenv("ADBRAY_SHARED_MOUNT", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("ADBRAY_DISKS", "isolated")
    assert shared_disk_problem(str(tmp_path / "run"), None) is None  # in-process Ray: one machine
    problem = shared_disk_problem(str(tmp_path / "run"), "127.0.0.1:1")
    assert problem and "--run-dir oss://" in problem and "\n" not in problem
    assert shared_disk_problem("oss://bucket/run", "127.0.0.1:1") is None
    monkeypatch.setenv("ADBRAY_SHARED_MOUNT", str(tmp_path))
    assert shared_disk_problem(str(tmp_path / "run"), "127.0.0.1:1") is None
    assert shared_disk_problem("/elsewhere/run", "127.0.0.1:1")
    monkeypatch.delenv("ADBRAY_SHARED_MOUNT")
    monkeypatch.setenv("ADBRAY_DISKS", "shared")  # a local cluster started with shared disks
    assert shared_disk_problem(str(tmp_path / "run"), "127.0.0.1:1") is None


def test_without_run_dir_a_cluster_run_goes_to_its_storage(monkeypatch):
    monkeypatch.setenv("ADBRAY_STORAGE", "oss://team-bucket/prefix/")
    monkeypatch.setenv("ADBRAY_DISKS", "isolated")
    out = prepare_run_dir("riskcontrol", None, "127.0.0.1:1")
    assert out.startswith("oss://team-bucket/prefix/runs/riskcontrol/")


# ------------------------------------------------------------ the storage resolver
def test_oss_addressing_region_and_keys(monkeypatch):
    monkeypatch.delenv("OSS_REGION", raising=False)
    monkeypatch.setenv("OSS_ENDPOINT", "oss-cn-shanghai-internal.aliyuncs.com")
    monkeypatch.delenv("OSS_ACCESS_KEY_ID", raising=False)
    monkeypatch.delenv("ALIBABA_CLOUD_ACCESS_KEY_ID", raising=False)
    with pytest.raises(io.StorageError, match="OSS_ACCESS_KEY_ID"):
        io.filesystem_for("oss://bucket/x")
    monkeypatch.setenv("OSS_ACCESS_KEY_ID", "id")
    monkeypatch.setenv("OSS_ACCESS_KEY_SECRET", "secret")
    fs, path = io.filesystem_for("oss://bucket/x/")
    kwargs = fs.__reduce__()[1][0]
    assert path == "bucket/x" and kwargs["region"] == "cn-shanghai" and kwargs["force_virtual_addressing"]
    assert kwargs["access_key"] == "id" and kwargs["scheme"] == "https"
    monkeypatch.setenv("OSS_ENDPOINT", "http://127.0.0.1:9000")  # a stand-in: path style, plain http
    kwargs = io.filesystem_for("oss://bucket/x")[0].__reduce__()[1][0]
    assert not kwargs["force_virtual_addressing"] and kwargs["scheme"] == "http"
    assert kwargs["endpoint_override"] == "127.0.0.1:9000" and kwargs["region"] == "us-east-1"
    assert os.environ["AWS_EC2_METADATA_DISABLED"] == "true"


def _no_keys_in_env(monkeypatch):
    for name in ("OSS_ACCESS_KEY_ID", "OSS_ACCESS_KEY_SECRET", "OSS_SESSION_TOKEN", "ALIBABA_CLOUD_ACCESS_KEY_ID",
                 "ALIBABA_CLOUD_ACCESS_KEY_SECRET", "ALIBABA_CLOUD_SECURITY_TOKEN", "ALIBABA_CLOUD_CREDENTIALS_FILE",
                 "ALIBABA_CLOUD_OIDC_TOKEN_FILE", "ALIBABA_CLOUD_ECS_METADATA", "ALIBABA_CLOUD_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", "/nonexistent-home")


def test_oss_keys_come_from_the_alibaba_credential_chain_without_a_metadata_probe(monkeypatch, tmp_path):
    _no_keys_in_env(monkeypatch)
    monkeypatch.setenv("OSS_ENDPOINT", "oss-cn-shanghai-internal.aliyuncs.com")
    with pytest.raises(io.StorageError, match="OSS_ACCESS_KEY_ID") as err:  # nothing asked the metadata address
        io.filesystem_for("oss://bucket/x")
    assert "EcsRamRole" not in str(err.value) and "\n" not in str(err.value)
    creds = tmp_path / "credentials.ini"
    creds.write_text("[default]\ntype = access_key\naccess_key_id = file-id\naccess_key_secret = file-secret\n"
                     "[team]\ntype = access_key\naccess_key_id = team-id\naccess_key_secret = team-secret\n")
    monkeypatch.setenv("ALIBABA_CLOUD_CREDENTIALS_FILE", str(creds))
    assert io.oss_credentials() == ("file-id", "file-secret", None)
    monkeypatch.setenv("ALIBABA_CLOUD_PROFILE", "team")
    kwargs = io.filesystem_for("oss://bucket/x")[0].__reduce__()[1][0]
    assert (kwargs["access_key"], kwargs["secret_key"], kwargs["session_token"]) == ("team-id", "team-secret", "")
    # keys in the environment come first; an STS token travels with them
    monkeypatch.setenv("ALIBABA_CLOUD_ACCESS_KEY_ID", "sts-id")
    monkeypatch.setenv("ALIBABA_CLOUD_ACCESS_KEY_SECRET", "sts-secret")
    monkeypatch.setenv("ALIBABA_CLOUD_SECURITY_TOKEN", "sts-token")
    kwargs = io.filesystem_for("oss://bucket/x")[0].__reduce__()[1][0]
    assert (kwargs["access_key"], kwargs["session_token"]) == ("sts-id", "sts-token")
    # a broken source is named in the error, not raised from inside the SDK
    _no_keys_in_env(monkeypatch)
    monkeypatch.setenv("ALIBABA_CLOUD_CREDENTIALS_FILE", str(tmp_path / "missing.ini"))
    with pytest.raises(io.StorageError, match="ProfileCredentialsProvider"):
        io.oss_credentials("oss://bucket/x")


def test_a_job_on_a_real_group_is_told_its_regions_oss_endpoint_and_no_keys():
    env = openapi.job_storage_env("cn-beijing", None)
    assert env == {"OSS_ENDPOINT": "oss-cn-beijing-internal.aliyuncs.com", "OSS_REGION": "cn-beijing"}
    assert openapi.job_storage_env("cn-beijing", "http://127.0.0.1:8080") == {}  # the emulator's nodes know theirs
    plan = jobs.prepare("riskcontrol", default_run_dir="oss://team/runs/riskcontrol/new", job_env=env)
    assert plan.runtime_env["env_vars"] == env
    assert not any("KEY" in k or "SECRET" in k for k in plan.runtime_env["env_vars"])


def test_train_storage_gives_ray_train_a_filesystem_for_object_storage(monkeypatch, tmp_path):
    monkeypatch.setenv("OSS_ENDPOINT", "http://127.0.0.1:9000")
    monkeypatch.setenv("OSS_ACCESS_KEY_ID", "id")
    monkeypatch.setenv("OSS_ACCESS_KEY_SECRET", "secret")
    path, fs = io.train_storage("oss://bucket/run/train")
    assert path == "bucket/run/train" and fs.type_name == "s3"
    assert io.train_storage(str(tmp_path)) == (str(tmp_path), None)


# ------------------------------------------------------------ the group's storage
def test_the_spec_storage_key_travels_as_the_groups_storage_mount(tmp_path):
    spec = load_spec("riskcontrol")
    assert spec.storage and spec.storage.startswith("oss://")
    rc = openapi.ray_config(spec, None)
    assert rc["StorageMounts"] == [{"StorageName": spec.storage, "MountPath": openapi.STORAGE_MOUNT_PATH}]
    request = openapi.build_request(spec, "amv-x", token="t")  # the real SDK keeps it
    assert request.ray_config.storage_mounts[0].storage_name == spec.storage
    assert openapi.spec_from_ray_config("g", rc).storage == spec.storage
    with pytest.raises(ValueError, match="storage must be oss://"):
        ResourceGroupSpec.model_validate({**spec.model_dump(), "storage": "/mnt/nas"})
    with pytest.raises((ValueError, ConfigError)):
        ResourceGroupSpec.model_validate({**spec.model_dump(), "storage": "oss://Bad_Bucket/"})


def test_submit_defaults_to_the_clusters_storage_and_refuses_a_cluster_without_one():
    target = jobs.Target("http://127.0.0.1:1", "ray://127.0.0.1:2", None, storage="oss://team/runs-root/")
    assert jobs.default_run_dir(target, "riskcontrol").startswith("oss://team/runs-root/runs/riskcontrol/")
    assert jobs.default_run_dir(jobs.Target("http://x:1", "ray://x:2", None, disks="shared"), "squares") is None
    with pytest.raises(jobs.SubmitError, match="give --run-dir oss://"):
        jobs.default_run_dir(jobs.Target("http://x:1", "ray://x:2", None), "squares")


def test_submit_to_a_local_cluster_writes_the_summary_to_its_storage(ray_connected, ray_cluster):
    env = {**os.environ, "ADBRAY_STATE": os.environ["ADBRAY_STATE"]}
    proc = subprocess.run([sys.executable, "-m", "deploy.cli", "submit", "deploy.examples.squares",
                           "--config", "deploy/examples/squares/configs/local.yaml",
                           "--address", ray_cluster.dashboard_url, "--token-file", ray_cluster.token_path],
                          capture_output=True, text=True, check=False, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run_dir = next(line.split()[3] for line in proc.stderr.splitlines() if line.startswith("outputs go to "))
    assert run_dir.startswith(ray_cluster.storage["uri"] + "runs/squares/")
    summary = io.read_json(io.join(run_dir, "summary.json"))
    assert summary["run_dir"] == run_dir and summary["metrics"]["sum_of_squares"] == 63 * 64 * 127 // 6
    assert f'"run_dir": "{run_dir}"' in proc.stdout  # the job's logs name where its outputs are


def test_a_step_that_reads_an_earlier_run_never_gets_the_default_run_dir():
    with pytest.raises(jobs.SubmitError, match="give --run-dir"):
        jobs.prepare("riskcontrol", step="train", default_run_dir="oss://team/runs/riskcontrol/new")
    plan = jobs.prepare("riskcontrol", default_run_dir="oss://team/runs/riskcontrol/new")
    assert plan.entrypoint.endswith("--run-dir oss://team/runs/riskcontrol/new")


def test_region_from_alibabas_oss_and_s3_endpoints():
    assert io._oss_region("oss-cn-hangzhou-internal.aliyuncs.com") == "cn-hangzhou"
    assert io._oss_region("s3.oss-cn-beijing.aliyuncs.com") == "cn-beijing"
    assert io._oss_region("127.0.0.1:9000") == "us-east-1"


def test_an_autoscaling_rehearsal_refuses_local_folders_like_its_group(tmp_path):
    state = local.ClusterState(name="a", category="BASIC", gcs_port=1, dashboard_port=2, client_port=3,
                               temp_dir="/tmp/x", token_path="/t", disks="shared")
    assert state.storage_env()["ADBRAY_DISKS"] == "shared"
    state.autoscaling_config = str(tmp_path / "autoscaling.json")
    assert state.storage_env()["ADBRAY_DISKS"] == "isolated"


def test_a_local_cluster_is_found_by_its_dashboard_or_ray_address(ray_cluster):
    for address in (ray_cluster.dashboard_url, ray_cluster.client_address,
                    ray_cluster.dashboard_url.replace("127.0.0.1", "localhost") + "/"):
        assert local.find_by_address(address).name == ray_cluster.name
    assert local.find_by_address("http://127.0.0.1:1") is None


def test_a_preflight_sees_the_address_flag(tmp_path):
    """A local --input with --address (no RAY_ADDRESS) is refused before any Ray work."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "ADBRAY_DISKS", "ADBRAY_SHARED_MOUNT")}
    proc = subprocess.run([sys.executable, "-m", "multimodal", "--input", str(tmp_path), "--address", "127.0.0.1:1",
                           "--run-dir", "oss://bucket/run"], env=env, cwd=ROOT, capture_output=True, text=True,
                          check=False, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and "give --input oss://" in lines[0], proc.stderr


def test_follow_streams_a_jobs_log_instead_of_downloading_it_every_second(ray_cluster):
    """`adbray submit`/`jobs logs --follow` print the job's log through Ray's tail_job_logs stream: each
    line once, in order, and the whole log is fetched once at the end (to catch up), not once a second."""
    import io as textio

    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(ray_cluster.dashboard_url, headers={"Authorization": f"Bearer {ray_cluster.token()}"})
    code = "import time\nfor i in range(6):\n    print('line', i, flush=True)\n    time.sleep(0.5)"
    job = client.submit_job(entrypoint=f"python -c {shlex.quote(code)}")
    downloads = []

    class Counting:
        def __getattr__(self, name):
            return getattr(client, name)

        def get_job_logs(self, job_id):
            downloads.append(job_id)
            return client.get_job_logs(job_id)

    out = textio.StringIO()
    info = jobs.follow(Counting(), job, out=out, timeout=120)
    assert jobs.status_name(info) == "SUCCEEDED"
    assert [line for line in out.getvalue().splitlines() if line.startswith("line ")] == [f"line {i}" for i in range(6)]
    assert len(downloads) == 1, downloads
