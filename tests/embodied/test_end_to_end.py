"""``python -m embodied`` on configs/local.yaml: collect -> BC with Ray Train -> evaluation."""
from __future__ import annotations

import json
from pathlib import Path

from embodied.dataset import read_info
from embodied.template import TEMPLATE
from embodied.train import load_weights


def test_end_to_end_cloned_policy_closes_the_gap(ray_connected, tmp_path, capsys):
    code = TEMPLATE.main(["--run-dir", str(tmp_path)])
    assert code == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["template"] == "embodied" and out["step"] == "all"
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

    assert read_info(out["outputs"]["episodes"])["total_frames"] == 200 * 50
    assert out["outputs"]["policy"] == str(tmp_path / "policy")
    weights = load_weights(out["outputs"]["policy"])
    assert weights["obs_dim"] == 10 and weights["act_dim"] == 2
    report = json.loads(Path(out["outputs"]["evaluation"]).read_text())
    assert report["policies"]["bc"]["return"] == m["bc_return"] and report["seeds"] == [1_000_000, 1_000_049]
    assert Path(out["outputs"]["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "summary.json").is_file()
    # the run folder's manifest records every output (what single steps read)
    assert json.loads((tmp_path / "run.json").read_text())["outputs"] == out["outputs"]
