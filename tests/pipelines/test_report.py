import json
from pathlib import Path

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
    report.plot_bars(tmp_path / "hb.png", {"a long reason " * 3: 1, "b": 2}, "rows", "reasons", horizontal=True)
    h = report.plot_hist(tmp_path / "h.png", {"fraud": [0.9, 0.8, float("nan")], "legit": [0.1, 0.2]}, "score", "h")
    s = report.plot_scatter(tmp_path / "s.png", {"text": ([0, 1], [1, 0]), "image": ([2], [3])}, "x", "y", "s")
    g = report.plot_images(tmp_path / "g.png", [[("a", np.zeros((8, 8, 3), np.uint8)), ("b", np.ones((8, 8)))]], "g")
    for path in (p, b, h, s, g):
        assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
