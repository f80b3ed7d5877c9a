"""Upload and secrets, local-cluster hygiene (issue 13): symlinks, secret names, .gitignore agreement
with Ray's uploader, secret ``--set`` values, the local cluster's environment, file modes and ``down``."""
import io
import json
import os
import stat
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import psutil
import pytest
from click.testing import CliRunner

from deploy import jobs, local, openapi, workdir
from deploy.spec import ResourceGroupSpec

ROOT = Path(__file__).resolve().parents[2]


def _job_dir(root: Path) -> Path:
    (root / "job" / "configs").mkdir(parents=True)
    (root / "job" / "__main__.py").write_text("print('hi')\n")
    (root / "job" / "configs" / "local.yaml").write_text("stage: {num_cpus: 1, max_actors: 1}\n")
    return root


# -- working dir: symlinks ----------------------------------------------------------------------


@pytest.mark.parametrize("target, link", [
    ("outside/id_rsa", "id_rsa"),          # `ln -s ~/.ssh/id_rsa id_rsa`
    ("outside/notes.txt", "job/notes.txt"),  # any file outside the working dir
    ("outside", "job/shared"),             # a folder outside the working dir
])
def test_workdir_refuses_symlinks_out_of_the_working_dir(tmp_path, target, link):
    root = _job_dir(tmp_path / "wd")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "id_rsa").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    (tmp_path / "outside" / "notes.txt").write_text("hello\n")
    (root / link).symlink_to(tmp_path / target)
    with pytest.raises(workdir.WorkdirError, match=f"symlink {link} -> .*outside the working dir") as e:
        workdir.check(root, allow_secrets=True)
    assert "\n" not in str(e.value)


def test_workdir_refuses_a_link_to_a_secret_and_counts_linked_bytes(tmp_path):
    root = _job_dir(tmp_path)
    (root / ".gitignore").write_text(".env\n")
    (root / ".env").write_text("DB_PASSWORD=x\n")  # ignored by Ray, so not a finding by itself
    assert workdir.check(root)["files"] == 3
    (root / "job" / "settings.txt").symlink_to(root / ".env")  # ... but a link to it is uploaded
    with pytest.raises(workdir.WorkdirError, match=r"look like secrets: job/settings.txt \(-> .env\)"):
        workdir.check(root)
    (root / "job" / "settings.txt").unlink()
    (root / ".gitignore").write_text(".env\n.ssh/\n")
    (root / ".ssh").mkdir()
    (root / ".ssh" / "known_hosts").write_text("host key\n")
    assert workdir.check(root)["files"] == 3
    (root / "job" / "ssh").symlink_to(root / ".ssh")  # a folder link: the real path is what counts
    with pytest.raises(workdir.WorkdirError, match=r"secrets: job/ssh/known_hosts \(-> .ssh/known_hosts\)"):
        workdir.check(root)
    (root / "job" / "ssh").unlink()
    (root / "runs").mkdir()
    (root / "runs" / "big.dat").write_bytes(b"0" * 2_000_000)  # excluded folder
    (root / "job" / "big.dat").symlink_to(root / "runs" / "big.dat")  # Ray uploads the link's target
    with pytest.raises(workdir.WorkdirError, match=r"over the 1 MB upload limit; largest: job/big.dat"):
        workdir.check(root, max_mb=1)


def test_workdir_refuses_a_symlink_loop(tmp_path):
    root = _job_dir(tmp_path)
    (root / "job" / "again").symlink_to(root / "job")
    with pytest.raises(workdir.WorkdirError, match="symlink job/again -> .* loops"):
        workdir.check(root)
    (root / "job" / "again").unlink()
    (root / "t").mkdir()
    (root / "d").mkdir()
    (root / "t" / "m").symlink_to(root / "d")  # t/m -> d, d/l -> t: no link points at its own parent
    (root / "d" / "l").symlink_to(root / "t")
    with pytest.raises(workdir.WorkdirError, match="symlink d/l/m -> .* loops"):
        workdir.check(root)


# -- working dir: secret names, .gitignore -------------------------------------------------------


@pytest.mark.parametrize("name", [
    "ID_RSA", "keys/id_dsa", "prod.env", ".envrc", ".git-credentials", ".pypirc", "job/.aliyun/config.json",
    ".ossutilconfig", "kubeconfig", ".kube/config", "deploy/.docker/config.json", "Server.PEM", ".ENV",
    ".ssh/known_hosts", ".npmrc",
])
def test_secret_names_are_case_insensitive_and_path_aware(tmp_path, name):
    root = _job_dir(tmp_path)
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    (root / name).write_text("x\n")
    with pytest.raises(workdir.WorkdirError, match=f"look like secrets: {name}"):
        workdir.check(root)


@pytest.mark.parametrize("name", ["config.json", "job/keymap.py", "tokenizer.json", "environment.yml",
                                  "docs/aliyun.md", "max_tokens.txt"])
def test_ordinary_names_are_not_secrets(tmp_path, name):
    root = _job_dir(tmp_path)
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    (root / name).write_text("x\n")
    assert workdir.check(root)["files"] == 3


def _layout(root: Path) -> Path:
    """Files Ray keeps and skips: root and nested .gitignore, .rayignore, excludes, links inside."""
    _job_dir(root)
    (root / ".gitignore").write_text("local.env\nweights/\n/top-only.txt\n*.log\n!keep.log\n")
    (root / ".rayignore").write_text("notes/\n")
    (root / "local.env").write_text("SECRET=1\n")
    (root / "weights").mkdir()
    (root / "weights" / "model.w").write_bytes(b"0" * 2_000_000)
    (root / "top-only.txt").write_text("x")
    (root / "job" / "top-only.txt").write_text("kept: the pattern is anchored")
    (root / "job" / "run.log").write_text("x")
    (root / "job" / "keep.log").write_text("x")
    (root / "notes").mkdir()
    (root / "notes" / "a.md").write_text("x")
    (root / "job" / "sub").mkdir()
    (root / "job" / "sub" / ".gitignore").write_text("scratch*\n")
    (root / "job" / "sub" / "scratch1.py").write_text("x")
    (root / "job" / "sub" / "real.py").write_text("x")
    (root / "job" / "link.py").symlink_to(root / "job" / "sub" / "real.py")
    (root / "job" / "linkdir").symlink_to(root / "job" / "sub")
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "x.pyc").write_bytes(b"x")
    (root / "README.MD").write_text("x")
    return root


@pytest.mark.parametrize("ignore_gitignore", [False, True])
def test_listing_agrees_with_what_ray_packages(tmp_path, monkeypatch, ignore_gitignore):
    from ray._private.runtime_env.packaging import _zip_files

    if ignore_gitignore:
        monkeypatch.setenv("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "1")
    root = _layout(tmp_path / "wd")
    package = tmp_path / "pkg.zip"
    _zip_files(str(root), workdir.EXCLUDES, str(package), include_gitignore=not ignore_gitignore)
    with zipfile.ZipFile(package) as z:
        ray_files = {n for n in z.namelist() if not n.endswith("/")}
    ours = {str(p) for p, _ in workdir.files(root)}
    assert ours == ray_files
    assert ("local.env" in ours) == ignore_gitignore and "notes/a.md" not in ours


def test_gitignored_secrets_and_sizes_do_not_count(tmp_path):
    root = _layout(tmp_path)
    info = workdir.check(root, max_mb=1)  # weights/ (2 MB) and local.env are ignored by Ray
    assert info["bytes"] < 10_000


# -- --set values that carry secrets --------------------------------------------------------------

SECRET_SETS = ["io.mysql_url=mysql://adb:s3cr3t-pw@db.example:3306/risk", "db.password=hunter2",
               "oss.access_key_secret=AKSECRET9", "stage.max_actors=2"]


def test_secret_overrides_stay_out_of_the_entrypoint(tmp_path):
    root = _job_dir(tmp_path)
    spec = ResourceGroupSpec(name="g", worker_groups=[{"name": "cpu", "spec": "m.xlarge"}])
    plan = jobs.prepare("job", overrides=SECRET_SETS, spec=spec, root=root)
    for secret in ("s3cr3t-pw", "hunter2", "AKSECRET9"):
        assert secret not in plan.entrypoint
    assert plan.entrypoint.endswith("--set stage.max_actors=2")
    assert json.loads(plan.runtime_env["env_vars"]["ADBRAY_SET"]) == SECRET_SETS[:3]
    shown = json.dumps(jobs.shown_runtime_env(plan.runtime_env))
    assert "hunter2" not in shown and "s3cr3t-pw" not in shown and "AKSECRET9" not in shown
    assert "mysql://adb:***@db.example:3306/risk" in shown and "db.password=***" in shown


def test_a_later_override_of_a_secret_key_keeps_its_order():
    sets = ["db.password=hunter2", "db={password: other, host: h}", "stage.max_actors=2"]
    public, secret = jobs.split_overrides(sets)
    assert public == ["stage.max_actors=2"] and secret == sets[:2]


@pytest.mark.parametrize("item, shown", [
    ("io.url=mysql://u:pw@h/db", "io.url=mysql://u:***@h/db"),
    ("api.token=abc", "api.token=***"),
    ("model.key_metric=auc", "model.key_metric=auc"),
    ("train.max_tokens=64", "train.max_tokens=64"),
    ("oss.access_key_id=LTAI5", "oss.access_key_id=LTAI5"),
    ("db={user: a, password: b}", "db=***"),
])
def test_redaction(item, shown):
    assert jobs.redact_override(item) == shown


def test_submit_dry_run_prints_no_secret(tmp_path, monkeypatch):
    from deploy.cli import cli

    root = _job_dir(tmp_path)
    monkeypatch.chdir(root)
    args = ["submit", "job", "--working-dir", str(root), "--dry-run"]
    for item in SECRET_SETS:
        args += ["--set", item]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    text = result.output + (result.stderr if result.stderr_bytes is not None else "")
    for secret in ("s3cr3t-pw", "hunter2", "AKSECRET9"):
        assert secret not in text
    assert "mysql://adb:***@db.example:3306/risk" in text


@pytest.mark.parametrize("as_json", [False, True])
def test_jobs_list_redacts_entrypoints_of_older_jobs(monkeypatch, as_json):
    from types import SimpleNamespace

    from deploy import cli as cli_module

    job = SimpleNamespace(submission_id="raysubmit_1", job_id=None, status="FAILED", start_time=1,
                          entrypoint="python -m job --set db.password=hunter2 --set 'io.url=mysql://u:s3cr3t-pw@h/db'"
                                     " --set stage.max_actors=2",
                          message="cannot connect to mysql://u:s3cr3t-pw@h/db")
    client = SimpleNamespace(list_jobs=lambda: [job])
    monkeypatch.setattr(cli_module, "_jobs_client", lambda *a: (None, client))
    result = CliRunner().invoke(cli_module.cli, ["jobs", "list", "--address", "http://127.0.0.1:1",
                                                 *(["--json"] if as_json else [])])
    assert result.exit_code == 0, result.output
    assert "hunter2" not in result.output and "s3cr3t-pw" not in result.output
    assert "db.password=***" in result.output and "stage.max_actors=2" in result.output


def test_a_bad_override_error_does_not_echo_a_url_password(tmp_path):
    root = _job_dir(tmp_path)
    with pytest.raises(jobs.SubmitError) as e:
        jobs.prepare("job", overrides=["mysql://adb:s3cr3t-pw@db/x"], root=root)
    assert "s3cr3t-pw" not in str(e.value) and "***" in str(e.value)


def test_template_config_reads_secret_overrides_from_the_environment(monkeypatch, tmp_path):
    from pydantic import BaseModel

    from pipelines.config import ConfigError, load_config

    class Io(BaseModel):
        mysql_url: str = ""
        batch: int = 1

    class Cfg(BaseModel):
        io: Io = Io()

    monkeypatch.setenv("ADBRAY_SET", json.dumps(["io.mysql_url=mysql://u:pw@h/db"]))
    cfg = load_config(Cfg, None, ["io.batch=3", "io.mysql_url=overridden-later-by-the-env"])
    assert cfg.io.mysql_url == "mysql://u:pw@h/db" and cfg.io.batch == 3
    monkeypatch.setenv("ADBRAY_SET", "not json")
    with pytest.raises(ConfigError, match="ADBRAY_SET"):
        load_config(Cfg, None, [])


# -- local cluster: environment, file modes, down ------------------------------------------------


def _state(tmp_path, name="hard", **kw) -> local.ClusterState:
    return local.ClusterState(name=name, category="BASIC", gcs_port=kw.pop("gcs_port", 45999),
                              dashboard_port=1, client_port=2, temp_dir=f"/tmp/adbray-{name}-a1b2c3",
                              token_path=str(tmp_path / "auth_token"), **kw)


def test_start_env_passes_an_allow_list(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIBABA_CLOUD_ACCESS_KEY_SECRET", "cloud-secret")
    monkeypatch.setenv("GITHUB_TOKEN", "gh-secret")
    monkeypatch.setenv("ADBRAY_SET", '["db.password=x"]')
    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-this-clusters")
    for name, value in [("LC_ALL", "C.UTF-8"), ("OSS_ENDPOINT", "http://127.0.0.1:9"), ("AWS_ACCESS_KEY_ID", "k"),
                        ("MUJOCO_GL", "egl"), ("OMP_NUM_THREADS", "1"), ("ADBRAY_RUNS", "/r"),
                        ("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")]:
        monkeypatch.setenv(name, value)
    env = local._start_env(_state(tmp_path, extra_env={"MY_SETTING": "on"}), ha=False)
    assert "ALIBABA_CLOUD_ACCESS_KEY_SECRET" not in env and "GITHUB_TOKEN" not in env
    assert "ADBRAY_SET" not in env and "RAY_AUTH_TOKEN" not in env
    assert env["LC_ALL"] == "C.UTF-8" and env["OSS_ENDPOINT"] and env["AWS_ACCESS_KEY_ID"] == "k"
    assert env["MUJOCO_GL"] == "egl" and env["OMP_NUM_THREADS"] == "1" and env["ADBRAY_RUNS"] == "/r"
    assert env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1" and env["MY_SETTING"] == "on"
    assert env["HOME"] and env["PATH"].startswith(str(Path(sys.executable).parent))
    assert env["RAY_AUTH_MODE"] == "token" and env["ADBRAY_CLUSTER_DIR"] == "/tmp/adbray-hard-a1b2c3"


def test_each_nodes_haproxy_gets_ports_of_its_own():
    """Serve's HAProxy ingress binds a metrics and a stats port on every node (Ray's defaults 9101, 8404):
    on one host a second node's HAProxy would exit and its proxy stay STARTING (seen with FAST_SERVE_ENV)."""
    envs = [local.worker_proxy_env(local.free_port()) for _ in range(2)] + [local.haproxy_ports_env()]
    ports = [int(e[k]) for e in envs for k in ("RAY_SERVE_HAPROXY_METRICS_PORT", "RAY_SERVE_HAPROXY_STATS_PORT")]
    assert len(set(ports)) == len(ports) == 6 and not {9101, 8404} & set(ports), envs


def _only_directories_chmod(monkeypatch):
    """Files must be created with their final mode: a chmod after the write does not count."""
    real = os.chmod
    monkeypatch.setattr(os, "chmod", lambda p, m, *a, **k: real(p, m, *a, **k) if Path(p).is_dir() else None)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_cluster_token_file_and_state_dirs_are_private_from_the_start(tmp_path, monkeypatch):
    monkeypatch.setattr(local, "STATE_ROOT", tmp_path / "state")
    _only_directories_chmod(monkeypatch)
    seen = {}

    def fake_head(state):
        seen.update(token=_mode(state.token_path), sdir=_mode(local.state_dir(state.name)),
                    clusters=_mode(tmp_path / "state" / "clusters"), root=_mode(tmp_path / "state"))
        raise local.LocalClusterError("stop here")

    monkeypatch.setattr(local, "start_head", fake_head)
    old = os.umask(0)
    try:
        with pytest.raises(local.LocalClusterError, match="stop here"):
            local.up(ResourceGroupSpec(name="modes", worker_groups=[{"name": "cpu", "spec": "small"}]),
                     log=lambda *_: None)
    finally:
        os.umask(old)
    assert seen == {"token": 0o600, "sdir": 0o700, "clusters": 0o700, "root": 0o700}


def test_stored_group_token_replaces_a_readable_file_without_exposing_it(tmp_path, monkeypatch):
    monkeypatch.setattr(local, "STATE_ROOT", tmp_path / "state")
    _only_directories_chmod(monkeypatch)
    path = openapi.token_path("amv-1", "g")
    path.parent.mkdir(parents=True)
    path.write_text("old")
    path.parent.chmod(0o755)
    subprocess.run(["chmod", "644", str(path)], check=True)  # an older, world-readable token file
    old = os.umask(0)
    try:
        assert openapi.store_token("amv-1", "g", "new-token") == path
    finally:
        os.umask(old)
    assert path.read_text() == "new-token" and _mode(path) == 0o600
    assert _mode(path.parent) == 0o700 and _mode(tmp_path / "state" / "tokens") == 0o700


def _stranger(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", *args])


def test_down_leaves_a_stranger_that_names_the_gcs_port(tmp_path, monkeypatch):
    monkeypatch.setattr(local, "STATE_ROOT", tmp_path / "state")
    local.state_dir("hard").mkdir(parents=True)
    state = _state(tmp_path)
    local.save_state(state)
    stranger = _stranger(f"--address=127.0.0.1:{state.gcs_port}", f"--gcs_server_port={state.gcs_port}")
    try:
        time.sleep(0.3)
        local.down("hard", log=lambda *_: None)
        assert stranger.poll() is None, "down killed a process that is not the cluster's"
    finally:
        stranger.kill()
        stranger.wait()


def test_down_kills_recorded_processes_only_while_they_are_the_same(tmp_path, monkeypatch):
    monkeypatch.setattr(local, "STATE_ROOT", tmp_path / "state")
    local.state_dir("hard").mkdir(parents=True)
    ours, reused = _stranger(), _stranger()
    try:
        time.sleep(0.3)
        t_ours = psutil.Process(ours.pid).create_time()
        t_reused = psutil.Process(reused.pid).create_time()
        # `reused` stands for a recorded pid that the OS gave to another process since
        state = _state(tmp_path, pids=[[ours.pid, t_ours], [reused.pid, t_reused - 5.0]])
        local.save_state(state)
        assert {p.pid for p in local.processes(state)} == {ours.pid}
        local.down("hard", log=lambda *_: None)
        assert ours.wait(timeout=10) is not None
        assert reused.poll() is None
    finally:
        for p in (ours, reused):
            p.kill()
            p.wait()


# -- one real cluster: its processes do not see the launcher's secrets; secret --set reaches the job;
#    `down` stops the cluster and not a stranger naming its GCS port


PROBE = """
import json, os, ray
from pydantic import BaseModel
from pipelines.config import load_config

class Io(BaseModel):
    mysql_url: str = ""

class Cfg(BaseModel):
    io: Io = Io()

ray.init()

@ray.remote(num_cpus=1)
def task_env():
    return os.environ.get("ALIBABA_CLOUD_ACCESS_KEY_SECRET"), os.environ.get("OSS_ENDPOINT")

print("PROBE", json.dumps({"driver": os.environ.get("ALIBABA_CLOUD_ACCESS_KEY_SECRET"),
                           "task": ray.get(task_env.remote()),
                           "url": load_config(Cfg, None, []).io.mysql_url}))
"""


@pytest.mark.slow
def test_local_cluster_hides_launcher_secrets_and_down_spares_strangers(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIBABA_CLOUD_ACCESS_KEY_SECRET", "launcher-secret")
    monkeypatch.setenv("OSS_ENDPOINT", "http://127.0.0.1:9")
    spec = ResourceGroupSpec(name=f"hard-{os.getpid()}", worker_groups=[{"name": "cpu", "spec": "small"}])
    state = local.up(spec, log=lambda *_: None, storage=False)  # no stand-in: the launcher's OSS_* pass through
    stranger = None
    try:
        assert state.pids and all(psutil.Process(pid).create_time() == t for pid, t in state.pids)
        stranger = _stranger(f"--address=127.0.0.1:{state.gcs_port}")
        root = _job_dir(tmp_path / "wd")
        (root / "job" / "__main__.py").write_text(PROBE)
        plan = jobs.prepare("job", overrides=["io.mysql_url=mysql://u:s3cr3t@h/db"], root=root)
        monkeypatch.delenv("ALIBABA_CLOUD_ACCESS_KEY_SECRET")
        target = jobs.Target(state.dashboard_url, state.client_address, state.token())
        client, job_id = jobs.submit(target, plan)
        info = jobs.follow(client, job_id, out=io.StringIO(), timeout=240)
        logs = client.get_job_logs(job_id)
        assert jobs.status_name(info) == "SUCCEEDED", logs[-3000:]
        probe = json.loads(next(line for line in logs.splitlines() if line.startswith("PROBE "))[6:])
        assert probe == {"driver": None, "task": [None, "http://127.0.0.1:9"], "url": "mysql://u:s3cr3t@h/db"}
        assert "s3cr3t" not in client.get_job_info(job_id).entrypoint
    finally:
        local.down(spec.name, log=lambda *_: None)
        if stranger is not None:
            alive = stranger.poll() is None
            stranger.kill()
            stranger.wait()
    assert alive, "down killed a process that is not the cluster's"
    assert local.processes(state) == []
