"""recsys benchmark: Ray Train vs a bare PyTorch loop, online latency/throughput, batch users/s.

Runs ``python -m recsys`` on configs/local.yaml (or reuses ``--run-dir`` with trained models),
then:
- train: steady-state ranker samples/s ((user, candidate) pairs) of the 2-worker Ray Train run
  (per-epoch time inside the loop, as reported with the checkpoint) vs the same model, data,
  batch size and epoch code in one bare process;
- online: ``GET /recsys/recommend`` (100 candidates ranked) at a fixed 50 req/s, and max req/s
  with 8 closed-loop clients, Serve as the template starts it (``serve.fast_serve``: Ray 2.60's
  throughput-optimized mode and HAProxy ingress);
- batch: users/s of the batch top-k step.
Prints one JSON line last.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import click
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.bench import emit, guard, log
from pipelines.report import write_summary


def bare_train_samples_per_s(cfg, run_dir: str, epochs: int = 2) -> float:
    """The ranker's epoch code on all training rows in this process (no Ray); pairs/s of the last epoch."""
    import torch

    from pipelines.io import read_table
    from recsys.common import slice_bounds
    from recsys.features import CandidateExamples, clicked_by_user
    from recsys.index import index_options
    from recsys.models import DeepFM, device
    from recsys.ranking import model_kwargs, train_epoch, validate_impressions

    t1, t2, _ = slice_bounds(cfg)
    imp, _ = validate_impressions(read_table(f"{run_dir}/impressions"), cfg.data.num_users, cfg.data.num_items)
    users = clicked_by_user(imp, t1, t2)
    rows = CandidateExamples(f"{run_dir}/features/ranker", run_dir, cfg.retrieval.candidates,
                             index_options(cfg.retrieval), cfg.ranker.val_fraction)(
        {c: users.column(c).to_numpy(zero_copy_only=False) for c in users.column_names})
    data = {k: v[~rows["is_val"]] for k, v in rows.items()}
    torch.manual_seed(cfg.data.seed)
    dev = device()
    model = DeepFM(**model_kwargs(cfg, cfg.data.num_items)).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.ranker.lr, weight_decay=cfg.ranker.weight_decay)
    rate = 0.0
    for epoch in range(epochs):
        order = np.random.default_rng([cfg.data.seed, epoch]).permutation(len(data["label"]))
        t0 = time.perf_counter()
        _, samples = train_epoch(model, opt, data, order, cfg.ranker.batch_size, dev)
        rate = samples / (time.perf_counter() - t0)
    return rate


def online(cfg, run_dir: str, seconds: float) -> dict:
    from ray import serve

    from pipelines.serving import load_test, max_rps
    from recsys.serve import deploy

    url = deploy(cfg, run_dir) + "/recommend"
    rng = np.random.default_rng(0)
    users = rng.integers(0, cfg.data.num_users, 10_000)

    def payload(i):
        return {"user_id": int(users[i % len(users)]), "k": 10}

    try:
        max_rps(url, payload, seconds=2, concurrency=8)  # warm up replicas and connections
        fixed = load_test(url, payload, rps=50, seconds=seconds)
        peak = max_rps(url, payload, seconds=seconds / 2, concurrency=8)
    finally:
        serve.delete(cfg.serve.app_name)
    return {"p50": fixed["p50_ms"], "p99": fixed["p99_ms"], "errors": fixed["errors"] + peak["errors"],
            "max_rps": peak["rps"], "target_rps": fixed["target_rps"], "achieved_rps": fixed["achieved_rps"],
            "valid": fixed["valid"]}


@click.command()
@click.option("--run-dir", default=None, help="Reuse a finished run folder (skips the pipeline).")
@click.option("--seconds", default=10.0, help="Length of the fixed-rate online test.")
def main(run_dir, seconds):
    """Run the benchmark and print its JSON line last."""
    run = guard("recsys")
    from pipelines.io import join, read_json
    from pipelines.template import prepare_run_dir
    from recsys import config as C
    from recsys.template import TEMPLATE

    cfg = C.load()
    TEMPLATE.connect(cfg, None)
    if run_dir:
        out = prepare_run_dir(C.TEMPLATE, run_dir)
        summary = read_json(join(out, "summary.json"))
        summary["metrics"].update(TEMPLATE.run(cfg, out, step="batch")["metrics"])
    else:
        out = prepare_run_dir(C.TEMPLATE, None)
        summary = TEMPLATE.run(cfg, out)
        write_summary(summary)  # so --run-dir can reuse this run
    m = summary["metrics"]
    bare = bare_train_samples_per_s(cfg, out)
    net = online(cfg, out, seconds)
    if net["errors"]:
        print(f"warning: {net['errors']} failed online requests", file=sys.stderr)
    if not net["valid"]:
        log(f"online run INVALID: sent {net['achieved_rps']:.1f} of {net['target_rps']} req/s (< 95%)")
    emit({
        "train_samples_per_s": m["ranker_samples_per_s"],
        "train_ratio": m["ranker_samples_per_s"] / bare,
        "online_p50_ms": net["p50"], "online_p99_ms": net["p99"], "online_max_rps": net["max_rps"],
        "online_target_rps": net["target_rps"], "online_achieved_rps": net["achieved_rps"],
        "online_valid": net["valid"] and not net["errors"], "online_errors": net["errors"],
        "batch_users_per_s": m["batch_users_per_s"],
        "ndcg10_ranker": m["ndcg10_ranker"], "ndcg10_popularity": m["ndcg10_popularity"],
    }, run)


if __name__ == "__main__":
    main()
