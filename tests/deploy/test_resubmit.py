"""A job whose driver ran on the head dies with it: `adbray jobs` names it FAILED with the reason, and
`adbray submit --resubmit` follows it through the head restart and submits it again once."""
from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from deploy import jobs, local
from deploy.spec import ResourceGroupSpec

ROOT = Path(__file__).resolve().parents[2]
HEAD, WORKER, NEW_HEAD = "aa" * 28, "bb" * 28, "cc" * 28
T0 = 1_800_000_000_000  # ms: the job started here; the old head died 20 s later, the new one started then


def _info(status="RUNNING", node=HEAD, start=T0, error=None, message="Job is currently running.", cpus=0):
    return SimpleNamespace(status=status, driver_node_id=node, start_time=start, error_type=error, message=message,
                           entrypoint_num_cpus=cpus, entrypoint_num_gpus=0, entrypoint_memory=0,
                           entrypoint_resources=None, submission_id="raysubmit_a", job_id="02000000",
                           entrypoint="python -m deploy.examples.squares")


def _nodes(restarted=True):
    """The node table after a head restart (the old head DEAD, a new one ALIVE), or before it."""
    if not restarted:
        return [{"node_id": HEAD, "state": "ALIVE", "is_head_node": True, "start_time_ms": T0 - 60_000},
                {"node_id": WORKER, "state": "ALIVE", "is_head_node": False, "start_time_ms": T0 - 50_000}]
    return [{"node_id": HEAD, "state": "DEAD", "is_head_node": True, "start_time_ms": T0 - 60_000,
             "end_time_ms": T0 + 20_000, "state_message": "Unexpected termination: health check failed"},
            {"node_id": WORKER, "state": "ALIVE", "is_head_node": False, "start_time_ms": T0 - 50_000},
            {"node_id": NEW_HEAD, "state": "ALIVE", "is_head_node": True, "start_time_ms": T0 + 20_000}]


def test_a_job_is_lost_only_when_its_drivers_node_is_dead():
    reason = jobs.lost_reason(_info(), _nodes())
    assert reason.startswith(f"its driver ran on the head node {HEAD[:8]}, which died at ")
    assert "health check failed" in reason and "the head restarted at" in reason
    assert reason.endswith("(Ray still reports RUNNING)")
    assert jobs.lost_reason(_info(), _nodes(restarted=False)) is None  # the head is alive: it runs
    assert jobs.lost_reason(_info(node=WORKER), _nodes()) is None  # a driver on a worker survives
    assert jobs.lost_reason(_info("SUCCEEDED"), _nodes()) is None  # it ended before the head died
    failed = _info("FAILED", error="JOB_ENTRYPOINT_COMMAND_ERROR", message="exit code 1")
    assert jobs.lost_reason(failed, _nodes()) is None  # it failed by itself
    # what Ray says once a job manager runs on the new head: FAILED, the supervisor gone
    ray_later = _info("FAILED", error="JOB_SUPERVISOR_ACTOR_START_FAILURE", message="failed to get job supervisor.")
    assert "died at" in jobs.lost_reason(ray_later, _nodes()) and "Ray still" not in jobs.lost_reason(ray_later, _nodes())
    # pending (no driver yet) on the old head when the new head started; not when it reserved resources
    assert "still pending" in jobs.lost_reason(_info("PENDING", node=None), _nodes())
    assert jobs.lost_reason(_info("PENDING", node=None, cpus=1), _nodes()) is None
    assert jobs.lost_reason(_info("PENDING", node=None, start=T0 + 30_000), _nodes()) is None  # newer than the head


class FakeCluster:
    """A JobSubmissionClient and a node table through a head restart: the first ``lose`` submissions
    (first, resubmission, ...) die with the head: their log stream breaks, the dashboard is unreachable
    for ``outage`` polls, then the head is back (the job's driver node DEAD, Ray still reporting RUNNING).
    The others stream their logs to the end and succeed at their ``polls``-th poll."""

    def __init__(self, lose=1, outage=2, polls=3):
        self.lose, self.outage, self.polls = lose, outage, polls
        self.submitted, self.calls, self.restarted = ["raysubmit_a"], {}, False

    async def tail_job_logs(self, job_id):
        yield f"{job_id} started\n"
        if self._lost(job_id):
            raise RuntimeError("WebSocket connection closed unexpectedly with close code 1006")

    def _lost(self, job_id):
        return self.submitted.index(job_id) < self.lose

    def get_job_info(self, job_id):
        n = self.calls[job_id] = self.calls.get(job_id, 0) + 1
        if self._lost(job_id) and n <= self.outage:
            self.restarted = True
            raise OSError("HTTPConnectionPool(host='127.0.0.1', port=1): Max retries exceeded with url: /api/jobs/x "
                          "(Caused by NewConnectionError('[Errno 111] Connection refused'))")  # an OSError
        done = not self._lost(job_id) and n >= self.polls
        return _info("SUCCEEDED" if done else "RUNNING", node=HEAD if self._lost(job_id) else NEW_HEAD,
                     start=T0 if job_id == "raysubmit_a" else T0 + 30_000)

    def get_job_logs(self, job_id):
        if self._lost(job_id) and self.restarted:
            raise RuntimeError("Request failed with status code 500: Cannot connect to host 192.0.2.2")
        return f"{job_id} started\n"

    def node_table(self):
        return _nodes(restarted=self.restarted)

    def resubmit(self, new_id):
        self.submitted.append(new_id)
        return new_id


def _follow(cluster, resubmit):
    log, err = [], io.StringIO()
    try:
        result = jobs.follow_or_resubmit(cluster, "raysubmit_a", cluster.resubmit if resubmit else None,
                                         log=log.append, nodes=cluster.node_table, out=io.StringIO(), err=err,
                                         poll_s=0, sleep=lambda s: None)
    except jobs.JobLost as e:
        result = e
    return result, log, err.getvalue()


def test_resubmit_only_with_the_flag_only_once_and_only_a_lost_job():
    cluster = FakeCluster(lose=1)
    lost, log, err = _follow(cluster, resubmit=False)
    assert isinstance(lost, jobs.JobLost) and cluster.submitted == ["raysubmit_a"]  # no flag: no resubmission
    assert str(lost).startswith("job raysubmit_a FAILED: lost with its driver's node: its driver ran on the head")
    # the outage is one progress line: said once, dots per try, ended when the dashboard answers
    assert len(err.splitlines()) == 1, err  # (the broken log stream is the outage: no line of its own)
    assert err.startswith("dashboard unreachable (connection refused): the head may be restarting; following "
                          "job raysubmit_a again once it answers (up to 300s) ..") and re.search(r"\.\. back after \d+s$",
                                                                                                  err.rstrip()), err

    cluster = FakeCluster(lose=1)
    (info, job_id), log, _ = _follow(cluster, resubmit=True)
    assert cluster.submitted == ["raysubmit_a", "raysubmit_a-r1"] and job_id == "raysubmit_a-r1"
    assert jobs.status_name(info) == "SUCCEEDED"
    assert log[0].startswith("job raysubmit_a FAILED: lost with its driver's node:")
    assert log[1].startswith("resubmitted job raysubmit_a as raysubmit_a-r1")

    cluster = FakeCluster(lose=2)  # the resubmission dies too: no second one
    lost, log, _ = _follow(cluster, resubmit=True)
    assert isinstance(lost, jobs.JobLost) and lost.job_id == "raysubmit_a-r1"
    assert cluster.submitted == ["raysubmit_a", "raysubmit_a-r1"] and "not resubmitted again" in str(lost)

    cluster = FakeCluster(lose=0)  # never lost: followed to its end, nothing resubmitted
    (info, job_id), log, err = _follow(cluster, resubmit=True)
    assert job_id == "raysubmit_a" and cluster.submitted == ["raysubmit_a"] and not log and "unreachable" not in err


def test_a_job_that_fails_by_itself_is_not_resubmitted():
    class Failing(FakeCluster):
        def get_job_info(self, job_id):
            return _info("FAILED", node=NEW_HEAD, error="JOB_ENTRYPOINT_COMMAND_ERROR", message="exit 1")

    cluster = Failing(lose=0)
    (info, job_id), _, _ = _follow(cluster, resubmit=True)
    assert jobs.status_name(info) == "FAILED" and job_id == "raysubmit_a" and cluster.submitted == ["raysubmit_a"]


def test_following_gives_up_after_the_reconnect_timeout():
    class Gone(FakeCluster):
        def get_job_info(self, job_id):
            raise OSError("Connection refused")

    err = io.StringIO()
    with pytest.raises(jobs.SubmitError, match="did not answer for") as e:
        jobs.follow(Gone(), "raysubmit_a", out=io.StringIO(), err=err, reconnect_s=0.05, poll_s=0,
                    sleep=lambda s: time.sleep(0.02))
    assert not isinstance(e.value, jobs.JobLost) and err.getvalue().rstrip().endswith("gave up")
    with pytest.raises(jobs.SubmitError, match="did not answer for"):  # --timeout bounds the outage too
        jobs.follow(Gone(), "raysubmit_a", out=io.StringIO(), err=io.StringIO(), timeout=0.05, poll_s=0,
                    sleep=lambda s: time.sleep(0.02))


def test_timeout_bounds_an_outage_that_begins_late():
    class GoneLater(FakeCluster):  # answers RUNNING for a while, then the dashboard goes away for good
        def get_job_info(self, job_id):
            if time.monotonic() - began < 0.1:
                return _info("RUNNING", node=NEW_HEAD, start=T0)
            raise OSError("Connection refused")

    err, began = io.StringIO(), time.monotonic()
    with pytest.raises(jobs.SubmitError, match=r"did not answer for \d+s \(past the 0s timeout\)"):
        jobs.follow(GoneLater(lose=0), "raysubmit_a", out=io.StringIO(), err=err, timeout=0.3, reconnect_s=300,
                    poll_s=0.01, sleep=lambda s: time.sleep(0.02))
    assert time.monotonic() - began < 5 and err.getvalue().rstrip().endswith("gave up")


def test_resubmission_waits_for_the_heads_job_agent():
    cluster, tries = FakeCluster(lose=1), []

    def resubmit(new_id):
        tries.append(new_id)
        if len(tries) < 3:  # what submit() raises while the new head's job agent is not up yet
            raise jobs.SubmitError("RuntimeError: Request failed with status code 503: No available agent")
        return cluster.resubmit(new_id)

    info, job_id = jobs.follow_or_resubmit(cluster, "raysubmit_a", resubmit, log=lambda m: None,
                                           nodes=cluster.node_table, out=io.StringIO(), err=io.StringIO(),
                                           poll_s=0, sleep=lambda s: None)
    assert tries == ["raysubmit_a-r1"] * 3 and job_id == "raysubmit_a-r1" and jobs.status_name(info) == "SUCCEEDED"


def test_jobs_list_shows_a_lost_job_as_failed_with_the_reason(monkeypatch):
    from deploy import cli as cli_module

    client = SimpleNamespace(list_jobs=lambda: [_info()])
    monkeypatch.setattr(cli_module, "_jobs_client", lambda *a: (None, client))
    monkeypatch.setattr(jobs, "node_table", lambda target: _nodes())
    args = ["jobs", "list", "--address", "http://127.0.0.1:1"]
    rows = json.loads(CliRunner().invoke(cli_module.cli, [*args, "--json"]).output)
    assert rows[0]["status"] == "FAILED" and rows[0]["ray_status"] == "RUNNING"
    assert rows[0]["message"].startswith("lost with its driver's node: its driver ran on the head node")
    text = CliRunner().invoke(cli_module.cli, args).output.splitlines()
    assert text[0].split()[:2] == ["raysubmit_a", "FAILED"] and "died at" in text[1]


def test_jobs_logs_of_a_lost_job_say_where_they_were(monkeypatch):
    from deploy import cli as cli_module

    def gone(job_id):  # what the dashboard answers: the driver node's agent does not
        raise RuntimeError("Request failed with status code 500: Traceback ... Cannot connect to host 192.0.2.2")

    client = SimpleNamespace(get_job_logs=gone, get_job_info=lambda job_id: _info())
    monkeypatch.setattr(cli_module, "_jobs_client", lambda *a: (None, client))
    monkeypatch.setattr(jobs, "node_table", lambda target: _nodes())
    result = CliRunner().invoke(cli_module.cli, ["jobs", "logs", "raysubmit_a", "--address", "http://127.0.0.1:1"])
    assert result.exit_code == 1 and len(result.output.splitlines()) == 1
    assert "the logs of job raysubmit_a were on its driver's node, gone with it: its driver ran on the head" in \
        result.output


def test_outage_errors_in_a_few_words():
    assert jobs.outage_text(OSError("HTTPConnectionPool(...): Max retries exceeded (Caused by NewConnectionError("
                                    "'[Errno 111] Connection refused'))")) == "connection refused"
    assert jobs.outage_text(OSError("('Connection aborted.', ConnectionResetError(104, 'Connection reset by peer'))")) \
        == "connection reset"
    assert jobs.outage_text(RuntimeError("Request failed with status code 503: No available agent")) == "HTTP 503"
    assert jobs.unreachable(jobs.SubmitError("ConnectionError: HTTPConnectionPool(host='h', port=1)"))
    assert not jobs.unreachable(RuntimeError("Request failed with status code 404: Job raysubmit_x does not exist"))


# -- on a HIGH_AVAILABILITY local cluster -------------------------------------------------------


def _rows(mysql_url, table):
    import pymysql

    from pipelines.io import mysql_connect

    conn = mysql_connect(mysql_url)
    try:
        with conn.cursor() as cur:
            cur.execute(f"SELECT lo, job_id FROM `{table}`")
            return cur.fetchall()
    except pymysql.err.ProgrammingError as e:  # no table yet: the job has not written its first chunk
        if e.args[0] == 1146:
            return ()
        raise
    finally:
        conn.close()


def _drop(mysql_url, table):
    from pipelines.io import mysql_connect

    conn = mysql_connect(mysql_url)
    with conn.cursor() as cur:
        cur.execute(f"DROP TABLE IF EXISTS `{table}`")
    conn.commit()
    conn.close()


RAY_JOB_ID = ("import sys; from ray.job_submission import JobSubmissionClient as C; "
              "print(C(sys.argv[1], headers={'Authorization': 'Bearer ' + sys.argv[2]}).get_job_info(sys.argv[3]).job_id)")


@pytest.mark.slow
def test_resubmit_through_a_head_restart_leaves_one_row_per_key(mysql_url, redis_url):
    """The squares example upserts one row per chunk (key lo) into MariaDB while it runs; the head restarts
    half-way; `adbray submit --resubmit` says why the job died, submits it once more after the head is back,
    and the table ends with exactly one row per chunk, all from the resubmitted job."""
    chunks, table = 16, f"resubmit_{os.getpid()}"  # 64 items: 16 chunks of 4 (keys 0, 4, ..., 60)
    _drop(mysql_url, table)
    spec = ResourceGroupSpec(name=f"resub-{os.getpid()}", category="HIGH_AVAILABILITY",
                             worker_groups=[{"name": "cpu", "type": "CPU", "spec": "m.xlarge"}])
    t0 = time.monotonic()
    state = local.up(spec, log=lambda *_: None, disks="shared", storage=False)
    marks = {"up": time.monotonic() - t0}
    proc = None
    try:
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
        proc = subprocess.Popen(
            [sys.executable, "-m", "deploy.cli", "submit", "deploy.examples.squares",
             "--config", "deploy/examples/squares/configs/local.yaml", "--set", f"chunks={chunks}",
             "--set", "chunk_seconds=1", "--set", f"output.mysql={mysql_url}", "--set", f"output.table={table}",
             "--address", state.dashboard_url, "--token-file", state.token_path, "--resubmit",
             "--reconnect-timeout", "120"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 90
        while not _rows(mysql_url, table):  # the first job is half-way: some chunks written, not all
            assert proc.poll() is None and time.monotonic() < deadline, "the job wrote no row"
            time.sleep(0.3)
        marks["first_row"] = time.monotonic() - t0
        timings = local.restart_head(state, log=lambda *_: None)
        marks["restarted"] = time.monotonic() - t0
        before = len(_rows(mysql_url, table))
        assert before < chunks, "the job ended before the head restart: nothing was rehearsed"
        _, err = proc.communicate(timeout=150)
        marks["submit_done"] = time.monotonic() - t0
        assert proc.returncode == 0, err[-3000:]
        first = re.search(r"^submitted job (\S+):", err, re.MULTILINE).group(1)
        again = jobs.resubmission_id(first)
        lost = next(line for line in err.splitlines() if line.startswith(f"job {first} FAILED: lost with"))
        assert "its driver ran on the head node" in lost and "the head restarted at" in lost, err[-3000:]
        assert f"resubmitted job {first} as {again}" in err and f"job {again} SUCCEEDED" in err
        # the outage is one line (from its start to "back after"), and no other line about it
        assert len([line for line in err.splitlines() if "unreachable" in line or "broke" in line]) <= 1, err
        rows = _rows(mysql_url, table)
        keys = [lo for lo, _ in rows]
        assert sorted(keys) == list(range(0, 64, 4))  # one row per key, every key
        # asked from fresh processes, as a user would (this one is a driver of the session cluster)
        ray_job_id = subprocess.run(
            [sys.executable, "-c", RAY_JOB_ID, state.dashboard_url, state.token(), again], env=env, capture_output=True, text=True, timeout=60,
            check=True).stdout.strip().splitlines()[-1]
        assert {job for _, job in rows} == {ray_job_id}  # all rewritten by the rerun
        listed = subprocess.run([sys.executable, "-m", "deploy.cli", "jobs", "list", "--json", "--address",
                                 state.dashboard_url, "--token-file", state.token_path], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=60, check=False)
        assert listed.returncode == 0, listed.stderr[-2000:]
        shown = {j["job_id"]: j for j in json.loads(listed.stdout.strip().splitlines()[-1])}
        assert shown[first]["status"] == "FAILED" and "lost with its driver's node" in shown[first]["message"]
        assert shown[again]["status"] == "SUCCEEDED"
        print(f"\n{ {k: round(v, 1) for k, v in marks.items()} }")
        print(f"head restart {timings['recovered_s']}s; rows before it {before}/{chunks}; "
              f"the submit command's lines:\n{lost}\n" +
              "\n".join(line for line in err.splitlines() if "unreachable" in line or "resubmitted" in line))
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        local.down(state.name, log=lambda *_: None)
        _drop(mysql_url, table)
