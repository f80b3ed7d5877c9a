"""End to end on configs/local.yaml: data -> features -> train (Ray + in-process) -> evaluate -> score.

    python -m riskcontrol [--config FILE] [--set a.b=c ...] [--address ADDR] [--run-dir DIR]
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click
import ray

from pipelines.cli import exit_with, template_options
from pipelines.io import run_dir as make_run_dir
from pipelines.report import emit, summary

from .config import RiskConfig, load
from .data import TEMPLATE, connect_for, read_transactions, write_transactions
from .evaluate import evaluate, headline, test_slice
from .features import run_features
from .score import score_dataset, write_scores
from .train import run_training


def log(msg: str) -> None:
    print(f"[riskcontrol] {msg}", file=sys.stderr, flush=True)


def run_all(cfg: RiskConfig, out: str) -> dict:
    """Every step in order (online only with ``serve.smoke_requests`` > 0); the end-to-end summary."""
    steps = ["data", "features", "train", "evaluate", "score"]
    timings, metrics, outputs, rejects = {}, {}, {}, 0
    t0 = time.perf_counter()
    data_cfg = cfg.data.model_copy(update={"mysql_url": None})  # the pipeline reads Parquet
    data_out, rows = write_transactions(data_cfg, out)
    outputs.update(data_out)
    metrics["transactions"] = rows
    timings["data_s"] = time.perf_counter() - t0
    log(f"data: {rows} transactions -> {data_out['transactions']}")

    t = time.perf_counter()
    feats = run_features(read_transactions(data_out["transactions"]), out, cfg.features)
    outputs.update(feats["outputs"])
    metrics["rows"], rejects = feats["rows"], feats["rejects"]
    timings["features_s"] = time.perf_counter() - t
    log(f"features: {feats['rows']} rows, {feats['rejects']} rejects")

    t = time.perf_counter()
    model = run_training(cfg, feats["outputs"]["features"], out, name="model")
    outputs["model"] = f"{out}/model"
    extra = {}
    if cfg.train.compare_inprocess and cfg.train.num_workers > 0:
        run_training(cfg, feats["outputs"]["features"], out, num_workers=0, name="model_inprocess")
        extra["inprocess"] = f"{out}/model_inprocess"
        outputs["model_inprocess"] = extra["inprocess"]
    timings["train_s"] = time.perf_counter() - t
    metrics.update(rows_seen=model["rows_seen"], train_rows=model["train_rows"],
                   num_workers=model["num_workers"])
    log(f"train: {model['num_workers']} workers, {model['rows_seen']} rows seen, "
        f"best iteration {model['best_iteration']}")

    report = evaluate(f"{out}/model", test_slice(feats["outputs"]["features"], cfg.train), cfg.eval, out,
                      extra)
    metrics.update(headline(report))
    _remember_threshold(f"{out}/model", report["model"]["alert_threshold"])
    outputs.update(evaluation=f"{out}/evaluation.json", pr_curve=f"{out}/pr_curve.png",
                   calibration=f"{out}/calibration.png")
    log(f"evaluate: AUPRC {metrics['auprc']:.3f} (rules {metrics['auprc_rules']:.3f})")

    t = time.perf_counter()
    # the features step already computed (and rejected) these rows: score its output
    features = ray.data.read_parquet(feats["outputs"]["features"])
    scored = write_scores(score_dataset(features, f"{out}/model", cfg.score), cfg.score, out)
    outputs["scores"] = scored["outputs"]["scores"]
    metrics.update(scored_rows=scored["rows"], tiers=scored["tiers"])
    timings["score_s"] = time.perf_counter() - t
    log(f"score: {scored['rows']} rows scored")

    if cfg.serve.smoke_requests:
        steps.append("online")
        from .serve import smoke_test

        t = time.perf_counter()
        online = smoke_test(cfg, f"{out}/model", data_out["transactions"])
        metrics.update({f"online_{k}": v for k, v in online.items()})
        timings["online_s"] = time.perf_counter() - t
        log(f"online: {online}")
    metrics["timings"] = timings
    return summary(TEMPLATE, "all", out, outputs, metrics, rejects, steps=steps)


def _remember_threshold(model_dir: str, threshold: float) -> None:
    """Store the alert-budget threshold with the model (batch and online tiers use it)."""
    path = Path(model_dir) / "model.json"
    meta = json.loads(path.read_text())
    meta["alert_threshold"] = float(threshold)
    path.write_text(json.dumps(meta, indent=2))


@click.command()
@template_options
def main(config, overrides, address, run_dir):
    """Fraud scoring end to end (python -m riskcontrol)."""
    cfg = load(config, overrides)
    connect_for(cfg, address)
    out = run_dir or make_run_dir(TEMPLATE)
    emit(run_all(cfg, out))


if __name__ == "__main__":
    exit_with(main)
