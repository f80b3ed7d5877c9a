"""``python -m embodied`` on configs/local.yaml: collect -> BC with Ray Train -> evaluation, into an
``oss://`` run folder on the isolated-disk test cluster, read back from the object store."""
from __future__ import annotations

import json
import math

from embodied.config import load as load_config
from embodied.dataset import read_episodes, read_frames, read_info
from embodied.template import TEMPLATE
from embodied.train import load_weights
from pipelines.io import exists, join, list_files, read_bytes, read_json, read_table
from pipelines.testing import local_run_traces


def test_end_to_end_cloned_policy_closes_the_gap(ray_connected, adbray_run_dir, capsys):
    before = local_run_traces()
    code = TEMPLATE.main(["--run-dir", adbray_run_dir])
    assert code == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["template"] == "embodied" and out["step"] == "all" and out["run_dir"] == adbray_run_dir
    assert out["steps"] == ["collect", "train", "evaluate"]
    assert list(out["step_seconds"]) == out["steps"] and out["rows"] == 200 * 50
    m = out["metrics"]
    for key in ("bc_return", "expert_return", "random_return", "bc_success_rate", "episodes", "steps"):
        assert key in m, key
    assert m["episodes"] == 200 and m["steps"] == 200 * 50 and out["rejects"] == 0
    # quality bar: BC closes >= 80% of the random -> expert gap on held-out seeds
    gap = (m["bc_return"] - m["random_return"]) / (m["expert_return"] - m["random_return"])
    assert gap >= 0.8, m
    assert m["expert_success_rate"] >= 0.95 and m["bc_success_rate"] > m["random_success_rate"]
    assert m["train_workers"] == 2

    # every output is in the object store and reads back from there
    assert all(uri.startswith(adbray_run_dir + "/") for uri in out["outputs"].values()), out["outputs"]
    episodes = out["outputs"]["episodes"]
    assert read_info(episodes)["total_frames"] == 200 * 50
    assert read_frames(episodes, columns=["index"]).num_rows == 200 * 50
    assert read_episodes(episodes).num_rows == 200
    assert read_table(out["outputs"]["rejects"]).num_rows == 0
    assert out["outputs"]["policy"] == join(adbray_run_dir, "policy")
    weights = load_weights(out["outputs"]["policy"])
    assert weights["obs_dim"] == 10 and weights["act_dim"] == 2
    # Ray Train's own checkpoints (uploaded by the rank-0 worker) went to the run folder too
    assert any(f.endswith("/policy.pt") for f in list_files(join(adbray_run_dir, "checkpoints", "bc")))
    report = read_json(out["outputs"]["evaluation"])
    assert report["policies"]["bc"]["return"] == m["bc_return"] and report["seeds"] == [1_000_000, 1_000_049]
    # the per-run report's plots: PNGs in the object store, one per plot_* output
    plots = {k: v for k, v in out["outputs"].items() if k.startswith("plot")}
    assert sorted(plots) == ["plot", "plot_loss", "plot_success", "plot_trajectories"]
    for name, uri in plots.items():
        assert uri.endswith(".png") and read_bytes(uri)[:8] == b"\x89PNG\r\n\x1a\n", name
    # ... and the numbers behind them: one finite training loss per configured epoch, kept with the policy
    history = read_json(join(out["outputs"]["policy"], "metrics.json"))["loss_history"]
    epochs = load_config().train.epochs
    assert len(history) == epochs == m["train_epochs"] and all(math.isfinite(x) for x in history), history
    assert history[-1] == m["train_loss"] and history[-1] < history[0]
    for policy in ("bc", "expert", "random"):
        rate = report["policies"][policy]["success_rate"]
        assert 0 <= rate <= 1 and rate == m[f"{policy}_success_rate"], (policy, rate)
    assert exists(join(adbray_run_dir, "summary.json"))
    # the run folder's manifest records every output (what single steps read)
    assert read_json(join(adbray_run_dir, "run.json"))["outputs"] == out["outputs"]
    # nothing landed on the driver's disk
    assert local_run_traces() == before  # nothing on the driver's disk
