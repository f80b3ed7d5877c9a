"""Evaluation: the cloned policy vs the expert and random policies on held-out seeds.

The ``evaluate`` step (``python -m embodied evaluate --run-dir DIR``) loads the run
folder's cloned policy (output ``policy``), rolls it and the expert and random
policies out on ``evaluate.episodes`` seeds starting at ``evaluate.seed`` (disjoint
from the collect seeds) and writes ``evaluation.json``, ``evaluation.png`` (returns) and
``evaluation_success.png`` (success rates) into the run folder (local or object storage,
through :mod:`pipelines.io`).
"""
from __future__ import annotations

from pipelines.cli import RunFailed
from pipelines.io import join, write_json
from pipelines.report import plot_bars
from pipelines.template import Run, StepResult

from .config import EmbodiedConfig
from .policies import policy_spec
from .rollout import Rollout
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


def evaluate(cfg: EmbodiedConfig, weights: dict, run_dir: str, check: bool = True):
    """Roll out bc, expert and random on the held-out seeds; write JSON + PNG; return metrics.

    A cloned policy below ``evaluate.min_gap_closed`` raises RunFailed (after writing), or with
    ``check=False`` comes back as ``(metrics, failure)`` for the step to report.
    """
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
    write_json(join(run_dir, "evaluation.json"), report)
    title = f"{env_id}: held-out seeds ({e.episodes} episodes)"
    plot_bars(join(run_dir, "evaluation.png"), {k: v["return"] for k, v in results.items()},
              ylabel="mean episode return", title=title)
    plot_bars(join(run_dir, "evaluation_success.png"), {k: v["success_rate"] for k, v in results.items()},
              ylabel="success rate", title=title)
    failure = None
    if not metrics["gap_closed"] >= e.min_gap_closed:
        failure = (f"cloned policy closes {metrics['gap_closed']:.2f} of the random->expert gap "
                   f"(evaluate.min_gap_closed {e.min_gap_closed}); see {join(run_dir, 'evaluation.json')}")
    if failure and check:
        raise RunFailed(failure)
    return metrics if check else (metrics, failure)


def run(cfg: EmbodiedConfig, run: Run) -> StepResult:
    """The evaluate step: the run's ``policy`` vs the expert and random policies on held-out seeds."""
    metrics, failure = evaluate(cfg, load_weights(run.input("policy")), run.dir, check=False)
    outputs = {"evaluation": run.path("evaluation.json"), "plot": run.path("evaluation.png"),
               "plot_success": run.path("evaluation_success.png")}
    return StepResult(outputs, metrics, failure=failure)


if __name__ == "__main__":
    from .template import TEMPLATE

    TEMPLATE.step_alias("evaluate")
