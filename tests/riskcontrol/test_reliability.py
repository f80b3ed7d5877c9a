"""A worker node's raylet killed mid-scoring, on its own 2-worker cluster: still one score per transaction."""
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
from .riskcontrol_helpers import small_model

ROOT = Path(__file__).resolve().parents[2]
DATA = {"rows": 30000, "cards": 400, "merchants": 100, "days": 14, "seed": 5}


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_raylet_killed_mid_scoring_exactly_one_score_per_transaction(tmp_path):
    from deploy import local
    from deploy.spec import load_spec

    frame, feats = small_model(tmp_path, **DATA)
    valid_ids = set(feats.transaction_id)
    assert len(valid_ids) < len(frame)  # some rows are invalid and must not get a score

    spec = load_spec(str(ROOT / "deploy" / "demo_cluster.yaml"), name=f"rc-kill-{os.getpid()}")
    state = local.up(spec, log=lambda *_: None)
    try:
        env = {**os.environ, **state.env(), "PYTHONPATH": str(ROOT)}
        env.pop("RAY_AUTH_TOKEN", None)
        cmd = [sys.executable, "-m", "riskcontrol.score", "--model", str(tmp_path / "model"),
               "--run-dir", str(tmp_path / "run"), "--set", f"score.input={tmp_path / 'transactions'}",
               "--set", "score.batch_size=500", "--set", "features.blocks=8"]
        stderr_path = tmp_path / "score.err"
        with open(stderr_path, "w") as err:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
            try:
                _wait_for(lambda: "scoring with model" in stderr_path.read_text() or proc.poll() is not None,
                          180, "scoring to start")
                assert proc.poll() is None, stderr_path.read_text()[-2000:]
                raylets = [p for p in local.processes(state) if p.name() == "raylet"
                           and f"{state.temp_dir}/w1" in " ".join(p.cmdline())]
                assert len(raylets) == 1
                raylets[0].kill()
                psutil.wait_procs(raylets, timeout=10)
                assert proc.poll() is None, "scoring ended before the node was killed"
                stdout, _ = proc.communicate(timeout=400)
            finally:
                if proc.poll() is None:
                    proc.kill()
        assert proc.returncode == 0, stderr_path.read_text()[-3000:]
        assert '"step": "score"' in stdout.strip().splitlines()[-1]
        ids = pq.read_table(tmp_path / "run" / "scores", columns=["transaction_id"]).column(0).to_pylist()
        assert len(ids) == len(set(ids)), "duplicate scores"
        assert set(ids) == valid_ids, "lost scores"
        assert len(local.alive_nodes(state)) == 2  # the killed worker node is gone
    finally:
        local.down(state.name, log=lambda *_: None)
