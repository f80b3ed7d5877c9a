"""Evaluation: the cloned policy vs the expert and random policies on held-out seeds.

``python -m embodied.evaluate --checkpoint <bc checkpoint>`` rolls each policy out
on ``evaluate.episodes`` seeds starting at ``evaluate.seed`` (disjoint from the
collect seeds), writes ``evaluation.json`` and ``evaluation.png`` into the run
folder and prints the run-contract JSON line.
"""
from __future__ import annotations

import json

import click

from pipelines.cli import RunFailed, exit_with, template_options
from pipelines.io import run_dir as make_run_dir
from pipelines.report import emit, plot_bars, summary

from . import config as config_mod
from .config import TEMPLATE, EmbodiedConfig
from .policies import policy_spec
from .rollout import Rollout, connect_cluster
from .train import load_weights


def rollout_returns(rollout, policy: dict, episodes, mode: str) -> dict:
    """Mean return, success rate and episode count of one policy over ``episodes``."""
    ended: list[dict] = []
    rollout.set_policy(policy, mode)
    rollout.run(episodes, ended.append)
    kept = [e for e in ended if not e["reject"]]
    if not kept:
        raise RunFailed(f"every evaluation episode of the {policy['kind']} policy was rejected")
    return {"return": sum(e["return"] for e in kept) / len(kept),
            "success_rate": sum(e["success"] for e in kept) / len(kept), "episodes": len(kept)}


def gap_closed(bc: float, expert: float, random: float) -> float:
    """Share of the random->expert return gap the cloned policy closes (1 = expert level)."""
    gap = expert - random
    return float("nan") if gap <= 0 else (bc - random) / gap


def evaluate(cfg: EmbodiedConfig, weights: dict, run_dir: str) -> dict:
    """Roll out bc, expert and random on the held-out seeds; write JSON + PNG; return metrics."""
    e = cfg.evaluate
    env_id = cfg.env.id
    episodes = [(k, e.seed + k) for k in range(e.episodes)]
    bc = policy_spec("mlp", env_id, weights=weights)
    rollout = Rollout(cfg, bc, e.mode, record=False)
    try:
        results = {
            "bc": rollout_returns(rollout, bc, episodes, e.mode),
            "expert": rollout_returns(rollout, policy_spec("expert", env_id), episodes, "local"),
            "random": rollout_returns(rollout, policy_spec("random", env_id, seed=e.seed), episodes, "local"),
        }
    finally:
        rollout.close()
    metrics = {f"{name}_{key}": value for name, r in results.items()
               for key, value in (("return", r["return"]), ("success_rate", r["success_rate"]))}
    metrics["gap_closed"] = gap_closed(metrics["bc_return"], metrics["expert_return"], metrics["random_return"])
    metrics["eval_episodes"] = e.episodes
    report = {"env": env_id, "seeds": [e.seed, e.seed + e.episodes - 1], "policies": results, **metrics}
    with open(f"{run_dir}/evaluation.json", "w") as f:
        json.dump(report, f, indent=2)
    plot_bars(f"{run_dir}/evaluation.png", {k: v["return"] for k, v in results.items()},
              ylabel="mean episode return", title=f"{env_id}: held-out seeds ({e.episodes} episodes)")
    if not metrics["gap_closed"] >= e.min_gap_closed:
        raise RunFailed(f"cloned policy closes {metrics['gap_closed']:.2f} of the random->expert gap "
                        f"(evaluate.min_gap_closed {e.min_gap_closed}); see {run_dir}/evaluation.json")
    return metrics


@click.command()
@template_options
@click.option("--checkpoint", required=True, help="A BC checkpoint folder (from embodied.train).")
def main(config, overrides, address, run_dir, checkpoint):
    """Evaluate a cloned policy against the expert and random policies on held-out seeds."""
    cfg = config_mod.load(config, overrides)
    policy_spec("expert", cfg.env.id)  # the comparison needs an expert: fail before cluster work
    weights = load_weights(checkpoint)
    connect_cluster(cfg, address)
    out = run_dir or make_run_dir(TEMPLATE, root=cfg.run_root)
    metrics = evaluate(cfg, weights, out)
    emit(summary(TEMPLATE, "evaluate", out, outputs={"evaluation": f"{out}/evaluation.json",
                                                     "plot": f"{out}/evaluation.png"}, metrics=metrics))


if __name__ == "__main__":
    exit_with(main)
