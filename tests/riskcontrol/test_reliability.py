"""A worker node's raylet killed mid-scoring, on its own 2-worker cluster: still one score per transaction.

The test kills the raylet of a node that hosts a live ``Scorer`` actor (found through the cluster's state
API), so the kill provably hits the scoring stage, and checks that actor died with its node.
"""
import json
import os
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import psutil

from deploy import local
from pipelines.io import join, read_table
from pipelines.testing import storage_run_dir

from .riskcontrol_helpers import small_model

ROOT = Path(__file__).resolve().parents[2]
DATA = {"rows": 30000, "cards": 400, "merchants": 100, "days": 14, "seed": 5}


def _wait_for(predicate, timeout: float, what: str):
    """Poll ``predicate`` until it returns something true; a dashboard slow to answer (OSError) is "not yet"."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            value = predicate()
        except OSError:
            value = None
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _state_api(state, resource: str, **equals) -> list[dict]:
    """Rows of the cluster's state API (``/api/v0/<resource>``, detail), filtered on ``key == value``."""
    query = [("limit", "10000"), ("detail", "1")]
    for key, value in equals.items():
        query += [("filter_keys", key), ("filter_predicates", "="), ("filter_values", value)]
    req = urllib.request.Request(f"{state.dashboard_url}/api/v0/{resource}?{urllib.parse.urlencode(query)}",
                                 headers={"Authorization": f"Bearer {state.token()}"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())["data"]["result"]["result"]


def _scorer_actors(state) -> list[dict]:
    """Ray Data's actors of the scoring stage: their class is named after the fused operator,
    e.g. ``MapWorker(MapBatches(merchant_feature_block)->MapBatches(Scorer))``."""
    return [a for a in _state_api(state, "actors") if a["class_name"].startswith("MapWorker(")
            and "MapBatches(Scorer)" in a["class_name"]]


def _hit_by_the_kill(actor: dict) -> bool:
    """The actor died with its node: Ray restarted it elsewhere (Ray Data's actors may restart), or it is
    dead of its node's or its worker's death (not of a graceful pool shutdown)."""
    reason = ((actor.get("death_cause") or {}).get("actor_died_error_context") or {}).get("reason")
    return int(actor.get("num_restarts") or 0) >= 1 or (actor["state"] == "DEAD"
                                                          and reason in ("NODE_DIED", "WORKER_DIED"))


def _worker_raylets(state) -> dict:
    """node id -> raylet process, for the worker nodes (each raylet names its node id on its command line)."""
    found = {}
    for p in local.processes(state):
        try:
            if p.name() != "raylet":
                continue
            args = p.cmdline()
        except psutil.Error:
            continue
        if f"{state.temp_dir}/w" in " ".join(args):  # worker raylets run in <temp_dir>/w<index>
            node_id = next(a.split("=", 1)[1] for a in args if a.startswith("--node_id="))
            found[node_id] = p
    return found


def test_raylet_killed_mid_scoring_exactly_one_score_per_transaction(tmp_path, monkeypatch):
    from deploy.spec import load_spec

    spec = load_spec(str(ROOT / "deploy" / "demo_cluster.yaml"), name=f"rc-kill-{os.getpid()}")
    state = local.up(spec, log=lambda *_: None)
    try:
        for key, value in state.storage_env().items():  # this cluster's object store, for this process too
            monkeypatch.setenv(key, value)
        out = storage_run_dir("riskcontrol-kill")
        frame, feats = small_model(out, **DATA)
        valid_ids = set(feats.transaction_id)
        assert len(valid_ids) < len(frame)  # some rows are invalid and must not get a score
        env = {**os.environ, **state.env(), "PYTHONPATH": str(ROOT)}
        env.pop("RAY_AUTH_TOKEN", None)
        cmd = [sys.executable, "-m", "riskcontrol.score", "--model", join(out, "model"),
               "--run-dir", join(out, "run"), "--input", join(out, "transactions"),
               "--set", "score.batch_size=500", "--set", "features.blocks=8"]
        stderr_path = tmp_path / "score.err"
        with open(stderr_path, "w") as err:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
            try:
                _wait_for(lambda: "scoring with model" in stderr_path.read_text() or proc.poll() is not None,
                          180, "scoring to start")
                assert proc.poll() is None, stderr_path.read_text()[-2000:]
                raylets = _worker_raylets(state)
                assert len(raylets) == 2, raylets

                def live_scorers_on_a_worker():  # or end the wait when scoring is over
                    on_workers = [a for a in _scorer_actors(state) if a["state"] == "ALIVE"
                                  and a["node_id"] in raylets]
                    return on_workers or proc.poll() is not None

                scorers = _wait_for(live_scorers_on_a_worker, 180, "a live Scorer actor on a worker node")
                assert proc.poll() is None, "scoring ended before a Scorer actor was seen: " + \
                    stderr_path.read_text()[-2000:]
                victim_node = scorers[0]["node_id"]
                victims = {a["actor_id"] for a in scorers if a["node_id"] == victim_node}
                raylets[victim_node].kill()
                psutil.wait_procs([raylets[victim_node]], timeout=10)
                assert proc.poll() is None, "scoring ended before the node was killed"
                stdout, _ = proc.communicate(timeout=400)
            finally:
                if proc.poll() is None:
                    proc.kill()
        assert proc.returncode == 0, stderr_path.read_text()[-3000:]
        assert '"step": "score"' in stdout.strip().splitlines()[-1]
        ids = read_table(join(out, "run", "scores"), columns=["transaction_id"]).column(0).to_pylist()
        assert len(ids) == len(set(ids)), "duplicate scores"
        assert set(ids) == valid_ids, "lost scores"
        # the GCS marks the node dead after its health checks fail: wait for it, however loaded the box
        def nodes_without_victim():
            nodes = local.alive_nodes(state)
            return nodes if victim_node not in {n["node_id"] for n in nodes} else None

        alive = _wait_for(nodes_without_victim, 120, "the killed node to be marked dead")
        assert len(alive) == 2  # the head and the surviving worker
        # the Scorer actors that were on the killed node died with it (the state API catches up eventually)
        def victims_hit():
            rows = {a["actor_id"]: a for a in _scorer_actors(state) if a["actor_id"] in victims}
            return rows if set(rows) == victims and all(map(_hit_by_the_kill, rows.values())) else None

        try:
            _wait_for(victims_hit, 120, "the killed node's Scorer actors to be reported dead or restarted")
        except AssertionError:
            raise AssertionError([a for a in _scorer_actors(state) if a["actor_id"] in victims]) from None
    finally:
        local.down(state.name, log=lambda *_: None)
