import pytest

from pipelines.connect import (
    ClusterUnreachable,
    check_reachable,
    connect,
    to_client_address,
    to_dashboard_url,
)


def test_address_conversion():
    assert to_client_address("http://10.0.0.5:8265") == "ray://10.0.0.5:10001"
    assert to_client_address("https://h.example.com") == "ray://h.example.com:10001"
    assert to_client_address("ray://h:10001") == "ray://h:10001"
    assert to_dashboard_url("ray://h:10001") == "http://h:8265"
    assert to_dashboard_url("http://h:8265/") == "http://h:8265"


def test_unreachable_address_raises_and_never_starts_local_ray():
    """In a fresh process (this one may already be a driver): one clear error, no Ray started."""
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import ray\n"
        "from pipelines.connect import ClusterUnreachable, connect\n"
        "for address in ('http://127.0.0.1:1', 'ray://127.0.0.1:1'):\n"
        "    try:\n"
        "        connect(address)\n"
        "    except ClusterUnreachable as e:\n"
        "        print('raised', e)\n"
        "print('initialized', ray.is_initialized())\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], check=False, cwd=Path(__file__).resolve().parents[2],
                          capture_output=True, text=True, timeout=120,
                          env={"RAY_AUTH_TOKEN": "x" * 32, "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-1500:]
    assert proc.stdout.count("raised Ray cluster at") == 2 and "unreachable" in proc.stdout
    assert "initialized False" in proc.stdout


def test_check_reachable_bad_host():
    with pytest.raises(ClusterUnreachable):
        check_reachable("ray://127.0.0.1:9", timeout=0.5)


def test_missing_token_is_one_clear_error(monkeypatch, tmp_path):
    from pipelines.connect import MissingToken

    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "nope"))
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    with pytest.raises(MissingToken, match="RAY_AUTH_TOKEN"):
        connect("ray://127.0.0.1:1")


def test_inside_a_ray_job_the_jobs_environment_is_trusted(monkeypatch, tmp_path):
    """A job on a group without a token has no token either: connect goes on to the cluster itself."""
    from pipelines.connect import MissingToken

    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "nope"))
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    with pytest.raises(ClusterUnreachable):  # not MissingToken: it tried the address
        connect("127.0.0.1:1")
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
    with pytest.raises(MissingToken):
        connect("127.0.0.1:1")


def test_connect_through_ray_client_with_token(ray_cluster):
    """A fresh process joins the local cluster over ray:// with the token file and reports it."""
    import os
    import subprocess
    import sys

    code = ("from pipelines.connect import connect; import ray; connect(sys.argv[1]); "
            "print('cpus', ray.cluster_resources().get('CPU'))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=ray_cluster.token_path)
    proc = subprocess.run([sys.executable, "-c", "import sys; " + code, ray_cluster.client_address], check=False, env=env,
                          capture_output=True, text=True, timeout=120, cwd=os.path.dirname(os.path.dirname(
                              os.path.dirname(os.path.abspath(__file__)))))
    assert proc.returncode == 0, proc.stderr[-1500:]
    assert "cpus 4.0" in proc.stdout
    assert "joined Ray cluster: 3 nodes, 4 CPUs, 0 GPUs" in proc.stderr


def test_version_mismatch_names_both_versions_in_one_line():
    from pipelines.connect import _handshake_versions, version_mismatch

    mine = {"ray": "2.60.0", "python": "3.11.7"}
    assert version_mismatch({"ray": "2.60.0", "python": "3.11.2"}, mine) is None  # patch differs: accepted
    line = version_mismatch({"ray": "2.60.0", "python": "3.10.14"}, mine)
    assert "\n" not in line and "cluster Ray 2.60.0 / Python 3.10.14, here Ray 2.60.0 / Python 3.11.7" in line
    assert "cluster Ray 2.59.0 / Python 3.11.7" in version_mismatch({"ray": "2.59.0", "python": "3.11.7"}, mine)
    # Ray's own several-line handshake error, read back into the same one line
    ray_error = ("Version mismatch: The cluster was started with:\n    Ray: 2.59.0\n    Python: 3.10.14\n"
                 "This process on Ray Client was started with:\n    Ray: 2.60.0\n    Python: 3.11.7\n")
    assert _handshake_versions(ray_error) == {"ray": "2.59.0", "python": "3.10.14"}


def test_cluster_versions_is_none_where_no_dashboard_answers():
    from pipelines.connect import check_versions, cluster_versions

    assert cluster_versions("http://127.0.0.1:9", timeout=0.5) is None
    assert check_versions("ray://127.0.0.1:9", dashboard="http://127.0.0.1:9") is None


def test_a_version_mismatch_in_a_template_command_is_one_line(capsys):
    import click

    from pipelines.cli import run_main
    from pipelines.connect import VersionMismatch

    @click.command()
    def job():
        raise VersionMismatch("cluster runs Ray 2.59.0 / Python 3.10, this process Ray 2.60.0 / Python 3.11")

    assert run_main(job, []) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: cluster runs Ray 2.59.0 / Python 3.10, this process Ray 2.60.0 / Python 3.11"]
