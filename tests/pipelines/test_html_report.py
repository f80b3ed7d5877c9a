"""The per-run report: built only from what a run folder holds, self-contained, rebuilt by `adbray report`."""
import base64
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from pipelines import html_report, io, report

ROOT = Path(__file__).resolve().parents[2]


def _run_folder(tmp_path, whole=True):
    run = tmp_path / "run"
    run.mkdir()
    plot = report.plot_bars(str(run / "bars.png"), {"a": 1.0, "b": 2.0}, "n", "bars")
    io.write_table(io.rejects_table([io.reject(f"tx-{i}", "features", "amount is negative") for i in range(5)]
                                    + [io.reject("tx-9", "features", "card_id is empty")]), str(run / "rejects"))
    html_report.write_config(str(run), {"data": {"rows": 6000}, "train": {"num_workers": 2}})
    import pyarrow as pa

    io.write_table(pa.table({"path": ["bad.jpg"], "modality": ["image"], "stage": ["decode"],
                             "reason": ["not an image"]}), str(run / "media_rejects"))
    outputs = {"rejects": str(run / "rejects"), "media_rejects": str(run / "media_rejects"), "plot_bars": plot}
    if whole:
        s = report.summary("riskcontrol", "all", str(run), outputs, {"auprc": 0.71, "roc_auc": 0.5},
                           rejects=6, rows=100, step_seconds={"data": 1.5, "train": 2.25}, steps=["data", "train"],
                           cluster={"nodes": 3, "cpus": 4.0, "gpus": 0, "dashboard": "http://127.0.0.1:8265"})
        report.write_summary(s)
    else:
        for step, secs, metrics in (("train", 2.0, {"auprc": 0.71}), ("data", 1.0, {"transactions": 100})):
            report.write_summary(report.summary("riskcontrol", step, str(run), outputs, metrics, rejects=0,
                                                rows=50, step_seconds={step: secs}, steps=[step]))
    return run


def test_the_page_holds_summary_bars_rejects_cluster_config_and_inline_plots(tmp_path):
    from riskcontrol.template import TEMPLATE

    run = _run_folder(tmp_path)
    uri = html_report.write_report(str(run), TEMPLATE)
    page = Path(uri).read_text()
    assert uri == str(run / "index.html")
    assert 'id=key-metric>0.71<' in page  # the template's key metric, highlighted
    assert "amount is negative" in page and "tx-0, tx-1, tx-2" in page and "tx-3" not in page  # 3 examples
    assert "decode: not an image" in page and "bad.jpg" in page  # a rejects table keyed by path (multimodal)
    assert "http://127.0.0.1:8265" in page and "num_workers: 2" in page
    src = page.split('src="data:image/png;base64,')[1].split('"')[0]
    assert base64.b64decode(src)[:8] == b"\x89PNG\r\n\x1a\n"  # inlined: nothing to fetch
    assert "http" not in page.replace("http://127.0.0.1:8265", "")  # no network reference at all
    judged = html_report.render(str(run), html_report.read_summary(str(run)), None, "auprc",
                                {"auprc": ">= 0.6", "roc_auc": "> 0.9"})
    assert "<td>auprc</td><td class=num>0.71</td><td>&gt;= 0.6</td><td><span class=ok>pass" in judged
    assert "<td>roc_auc</td><td class=num>0.5</td><td>&gt; 0.9</td><td><span class=bad>FAIL" in judged


def test_a_step_by_step_folder_is_merged_in_step_order(tmp_path):
    run = _run_folder(tmp_path, whole=False)
    s = html_report.read_summary(str(run), ["data", "train"])
    assert s["step"] == "data+train" and s["steps"] == ["data", "train"] and s["rows"] == 100
    assert s["metrics"] == {"transactions": 100, "auprc": 0.71}
    assert list(s["step_seconds"]) == ["data", "train"]


def test_bars_are_judged():
    assert html_report.check_bar(0.7, ">= 0.6") is True and html_report.check_bar(0.5, ">= 0.6") is False
    assert html_report.check_bar(0.004, "< 0.01") is True and html_report.check_bar("x", ">= 1") is None
    assert html_report.check_bar(np.float64(2.0).item(), "> 1") is True
    run = {"ndcg10_popularity": 0.2, "random_success_rate": 0.1}
    assert html_report.check_bar(0.27, ">= 1.3 * ndcg10_popularity", run) is True
    assert html_report.check_bar(0.25, ">= 1.3 * ndcg10_popularity", run) is False
    assert html_report.check_bar(0.05, "> random_success_rate", run) is False
    assert html_report.check_bar(0.5, "> no_such_metric", run) is None and html_report.check_bar(1, "?", run) is None
    assert html_report.check_bar(2e-3, "< 1e-2") is True


def test_adbray_report_rebuilds_the_page_and_refuses_a_folder_that_is_not_a_run(tmp_path):
    run = _run_folder(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "deploy.cli", "report", str(run)], capture_output=True,
                          text=True, check=False, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(run / "index.html") and (run / "index.html").stat().st_size > 1000
    bad = subprocess.run([sys.executable, "-m", "deploy.cli", "report", str(tmp_path / "nothing")],
                         capture_output=True, text=True, check=False, cwd=ROOT, timeout=120)
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 1 and len(lines) == 1 and "not a run folder" in lines[0], bad.stderr
    assert json.loads((run / "summary.json").read_text())["template"] == "riskcontrol"
