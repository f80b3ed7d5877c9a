import json

import numpy as np

from pipelines import report


def test_summary_contract_and_emit(tmp_path, capsys):
    s = report.summary("tmpl", "train", str(tmp_path), {"scores": str(tmp_path / "scores")},
                       {"auc": np.float32(0.5), "bad": float("nan")}, rejects=np.int64(3))
    assert set(s) >= {"template", "step", "run_dir", "outputs", "metrics", "rejects"}
    report.emit(s)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    parsed = json.loads(last)
    assert parsed["metrics"] == {"auc": 0.5, "bad": None} and parsed["rejects"] == 3
    assert json.loads((tmp_path / "train_summary.json").read_text()) == parsed


def test_plots_are_png(tmp_path):
    p = report.plot_lines(tmp_path / "pr.png", {"model": ([0, 1], [1, 0])}, "recall", "precision", "PR")
    b = report.plot_bars(tmp_path / "b.png", {"a": 1, "b": 2}, "x", "bars")
    for path in (p, b):
        assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
