"""Preflight, working-dir checks and address handling: no cluster needed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from deploy import jobs, preflight, workdir
from deploy.spec import ResourceGroupSpec

ROOT = Path(__file__).resolve().parents[2]

GROUP = ResourceGroupSpec(
    name="mixed",
    worker_groups=[
        {"name": "cpu", "type": "CPU", "spec": "m.xlarge", "min_workers": 1, "max_workers": 4},
        {
            "name": "gpu",
            "type": "GPU",
            "spec": "gpu.a10",
            "min_workers": 1,
            "max_workers": 2,
            "distribution_unit": "1/3",
        },
    ],
)


def test_resource_asks_walk_the_whole_config_tree():
    cfg = {
        "data": {"decode": {"num_cpus": 2, "max_actors": 4}},
        "embed": [{"model": "vit", "num_gpus": 0.25, "max_actors": 2}],
        "train": {"num_workers": 3, "num_cpus": 4},
        "batch_size": 64,
    }
    asks = {a.path: (a.num_cpus, a.num_gpus, a.parallel) for a in preflight.resource_asks(cfg)}
    assert asks == {"data.decode": (2, 0, 4), "embed.0": (0, 0.25, 2), "train": (4, 0, 3)}


@pytest.mark.parametrize(
    "ask, needle",
    [
        ({"num_gpus": 1}, "no GPU worker group offers 1 GPU per worker (gpu: 1/3 GPU/worker)"),
        ({"num_cpus": 16}, "no worker spec has 16 cores"),
    ],
)
def test_unschedulable_asks_are_errors(ask, needle):
    findings = preflight.check(preflight.resource_asks({"stage": ask}), GROUP)
    errors = [f.message for f in findings if f.level == "error"]
    assert len(errors) == 1 and needle in errors[0] and "stage" in errors[0]


def test_gpu_ask_without_gpu_group():
    cpu_only = ResourceGroupSpec(name="c", worker_groups=[{"name": "cpu", "spec": "small"}])
    findings = preflight.check(preflight.resource_asks({"s": {"num_gpus": 0.5}}), cpu_only)
    assert [f.level for f in findings] == ["error"] and "has no GPU worker group" in findings[0].message


def test_fitting_asks_and_parallelism_warnings():
    ok = preflight.check(
        preflight.resource_asks(
            {"s": {"num_gpus": 0.33, "max_actors": 1}, "t": {"num_cpus": 8, "num_workers": 1}}
        ),
        GROUP,
    )
    assert [f.level for f in ok] == ["ok"]
    # CPU tasks fit both groups (8 cores each): 16 CPUs at min, 4*8 + 2*8 = 48 at max
    assert [
        f.level
        for f in preflight.check(preflight.resource_asks({"t": {"num_cpus": 4, "num_workers": 4}}), GROUP)
    ] == ["ok"]
    scale = preflight.check(preflight.resource_asks({"t": {"num_cpus": 4, "num_workers": 5}}), GROUP)
    assert (
        scale[0].level == "warning"
        and "drive autoscaling of cpu+gpu beyond min (16) towards max (48)" in scale[0].message
    )
    queue = preflight.check(preflight.resource_asks({"t": {"num_cpus": 2, "num_tasks": 25}}), GROUP)
    assert queue[0].level == "warning" and "the rest will queue" in queue[0].message
    with pytest.raises(ValueError, match="t.num_cpus"):
        preflight.resource_asks({"t": {"num_cpus": "two"}})


def _job_dir(tmp_path):
    (tmp_path / "job" / "configs").mkdir(parents=True)
    (tmp_path / "job" / "__main__.py").write_text("print('hi')\n")
    (tmp_path / "job" / "configs" / "local.yaml").write_text("stage: {num_cpus: 1, max_actors: 1}\n")
    return tmp_path


def test_workdir_excludes_size_and_secrets(tmp_path):
    root = _job_dir(tmp_path)
    (root / ".venv").mkdir()
    (root / ".venv" / "big.so").write_bytes(b"0" * 3_000_000)
    (root / "runs").mkdir()
    (root / "runs" / "out.parquet").write_bytes(b"0" * 10)
    info = workdir.check(root, max_mb=1)
    assert info["files"] == 2 and info["bytes"] < 1000
    (root / "model.weights").write_bytes(b"0" * 2_000_000)
    with pytest.raises(
        workdir.WorkdirError, match=r"over the 1 MB upload limit; largest: model.weights \(1.9 MB\)"
    ):
        workdir.check(root, max_mb=1)
    (root / "model.weights").unlink()
    (root / "job" / ".env").write_text("SECRET=1\n")
    with pytest.raises(workdir.WorkdirError, match=r"look like secrets: job/.env"):
        workdir.check(root)
    assert workdir.check(root, allow_secrets=True)["files"] == 3


def test_prepare_builds_entrypoint_and_runtime_env(tmp_path):
    root = _job_dir(tmp_path)
    spec = ResourceGroupSpec(name="g", worker_groups=[{"name": "cpu", "spec": "m.xlarge"}])
    plan = jobs.prepare(
        "job",
        config=str(root / "job/configs/local.yaml"),
        overrides=["stage.max_actors=2"],
        spec=spec,
        root=root,
    )
    assert plan.entrypoint == "python -m job --config job/configs/local.yaml --set stage.max_actors=2"
    assert plan.runtime_env["working_dir"] == str(root.resolve()) and ".git" in plan.runtime_env["excludes"]
    outside = tmp_path.parent / f"{tmp_path.name}-outside.yaml"
    outside.write_text("a: 1\n")
    with pytest.raises(jobs.SubmitError, match="outside the working dir"):
        jobs.prepare("job", config=str(outside), spec=spec, root=root)
    with pytest.raises(jobs.SubmitError, match="template job has no step 'trian'"):
        jobs.prepare("job", step="trian", spec=spec, root=root)
    with pytest.raises(jobs.SubmitError, match="preflight: stage .* can never be scheduled"):
        jobs.prepare("job", overrides=["stage.num_cpus=9"], spec=spec, root=root)


def test_address_forms_and_ray_address_warning():
    assert jobs.address_pair("ray://10.0.0.5:10001") == ("http://10.0.0.5:8265", "ray://10.0.0.5:10001")
    assert jobs.address_pair("http://10.0.0.5:8265/") == ("http://10.0.0.5:8265", "ray://10.0.0.5:10001")
    assert jobs.address_pair("10.0.0.5") == ("http://10.0.0.5:8265", "ray://10.0.0.5:10001")
    target = jobs.Target("http://10.0.0.5:8265", "ray://10.0.0.5:10001", "t")
    assert jobs.ray_address_warning(target, "ray://10.0.0.5:10001") is None
    assert jobs.ray_address_warning(target, "auto") is None
    warning = jobs.ray_address_warning(target, "127.0.0.1:6380")
    assert "RAY_ADDRESS=127.0.0.1:6380 differs from the target http://10.0.0.5:8265" in warning


def _submit(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "deploy.cli", "submit", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.parametrize("case", ["oversized", "secret", "gpu_fraction", "invalid_spec"])
def test_submit_stops_before_upload_with_one_line(tmp_path, case):
    """Each problem stops `adbray submit` before any cluster contact (the address is a dead port)."""
    root = _job_dir(tmp_path)
    spec = root / "rg.yaml"
    spec.write_text(
        "name: g\nworker_groups:\n  - {name: gpu, type: GPU, spec: gpu.a10, distribution_unit: 1/3}\n"
    )
    args = ["job", "--working-dir", str(root), "--address", "http://127.0.0.1:9", "--spec", str(spec)]
    needle = {
        "oversized": "over the 1 MB upload limit; largest: blob.bin",
        "secret": "look like secrets: id.pem",
        "gpu_fraction": "no GPU worker group offers 1 GPU per worker",
        "invalid_spec": "max_workers",
    }[case]
    if case == "oversized":
        (root / "blob.bin.keep").write_bytes(b"0")
        (root / "blob.bin").write_bytes(b"0" * 10)  # *.bin is excluded: not counted
        (root / "blob.dat").write_bytes(b"0" * 1_500_000)
        needle = "over the 1 MB upload limit; largest: blob.dat (1.4 MB)"
        args += ["--max-upload-mb", "1"]
    elif case == "secret":
        (root / "id.pem").write_text("-----BEGIN PRIVATE KEY-----\n")
    elif case == "gpu_fraction":
        args += ["--set", "stage.num_gpus=1"]
    else:
        spec.write_text(spec.read_text().replace("distribution_unit: 1/3", "max_workers: 9"))
    proc = _submit(*args)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if not line.startswith("warning:")]
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert "submitted job" not in proc.stderr and "unreachable" not in proc.stderr


def test_follow_prints_new_log_text_and_ctrl_c_stops_the_job():
    import io

    class Client:
        """Answers like JobSubmissionClient: the log stream breaks after its first line (a proxy that drops
        websockets), the rest is polled, then Ctrl-C arrives while the job runs."""

        def __init__(self):
            self.polls, self.stopped = 0, []

        async def tail_job_logs(self, job_id):
            yield "line 1\n"
            raise RuntimeError("connection closed unexpectedly")

        def get_job_info(self, job_id):
            self.polls += 1
            if self.polls == 3:
                raise KeyboardInterrupt
            return type("Info", (), {"status": "RUNNING"})()

        def get_job_logs(self, job_id):
            return "line 1\n" if self.polls == 1 else "line 1\nline 2\n"

        def stop_job(self, job_id):
            self.stopped.append(job_id)
            return True

    client, out = Client(), io.StringIO()
    with pytest.raises(KeyboardInterrupt):
        jobs.follow(client, "raysubmit_x", out=out, poll_s=0)
    assert out.getvalue() == "line 1\nline 2\n" and client.stopped == ["raysubmit_x"]


def test_template_requirements_missing_from_the_group_go_to_runtime_env_pip(tmp_path):
    root = _job_dir(tmp_path)
    (root / "job" / "resource_group.yaml").write_text(
        "name: job\nworker_groups: [{name: cpu, spec: m.xlarge}]\nrequirements: [lightgbm>=4.5, polars>=1.0]\n"
    )
    same = jobs.prepare("job", root=root)
    assert "pip" not in same.runtime_env  # the group made from this spec already has them
    other = ResourceGroupSpec(
        name="g", worker_groups=[{"name": "cpu", "spec": "m.xlarge"}], requirements=["lightgbm>=4.5"]
    )
    plan = jobs.prepare("job", spec=other, root=root, pip=["tqdm"])
    assert plan.runtime_env["pip"] == ["polars>=1.0", "tqdm"]


def test_dry_run_prints_the_job_and_warns_about_a_flood_without_any_cluster():
    proc = _submit(
        "deploy.examples.squares",
        "--config",
        "deploy/examples/squares/configs/local.yaml",
        "--set",
        "flood.num_tasks=20",
        "--dry-run",
    )
    assert proc.returncode == 0, proc.stderr
    job = json.loads(proc.stdout)
    assert job["entrypoint"] == (
        "python -m deploy.examples.squares --config "
        "deploy/examples/squares/configs/local.yaml --set flood.num_tasks=20"
    )
    assert job["runtime_env"]["working_dir"] == str(ROOT)
    # the example's group: one m.xlarge (8 cores) at min, two at max
    assert (
        "flood (num_cpus=1 x20) asks 20 CPUs at once: it drives cpu of group squares to its max (16)"
        in proc.stderr
    )


def test_ray_data_stage_floods_are_warned_with_the_peak_worker_count():
    """riskcontrol's cluster config: data.shards 400 and features.blocks 256 tasks of 1 CPU on a 4..6
    worker group push autoscaling to max; the ok line says how many workers the run asks for at peak."""
    import yaml

    from deploy.spec import load_spec

    data = yaml.safe_load((ROOT / "riskcontrol" / "configs" / "cluster.yaml").read_text())
    findings = preflight.check(preflight.resource_asks(data), load_spec("riskcontrol"))
    warnings = [f.message for f in findings if f.level == "warning"]
    assert any(m.startswith("data (num_cpus=1 x400) asks 400 CPUs at once: it drives cpu") for m in warnings)
    assert any(m.startswith("features (num_cpus=1 x256) asks 256 CPUs") for m in warnings)
    ok = next(f.message for f in findings if f.level == "ok")
    assert ok.endswith("at peak the run asks for 6 worker(s) (cpu min 4 max 6): data (num_cpus=1 x400)"), ok
    small = preflight.resource_asks({"data": {"num_cpus": 1, "shards": 8}})  # 8 CPUs: one 8-core worker
    assert "at peak the run asks for 4 worker(s)" in preflight.check(small, load_spec("riskcontrol"))[-1].message
