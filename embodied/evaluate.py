"""Evaluation: the cloned policy vs the expert and random policies on held-out seeds.

The ``evaluate`` step (``python -m embodied evaluate --run-dir DIR``) loads the run
folder's cloned policy (output ``policy``), rolls it and the expert and random
policies out on ``evaluate.episodes`` seeds starting at ``evaluate.seed`` (disjoint
from the collect seeds) and writes ``evaluation.json``, ``evaluation.png`` (returns) and
``evaluation_success.png`` (success rates) into the run folder (local or object storage,
through :mod:`pipelines.io`). When the run trained a vision policy (output ``vision_policy``, step
``train_vision``), it is rolled out too, with its camera rendered (``vision_*`` metrics, no bar).
A policy cloned from the user's dataset (``policy/dataset.json`` says so) gets the held-out action
MSE against the mean-action baseline (``evaluation_offline.png``) and the simulator evaluation only when the dataset named one of our envs (:mod:`embodied.inputs`).
"""
from __future__ import annotations

import numpy as np

from pipelines.cli import RunFailed
from pipelines.io import exists, join, read_json, write_json
from pipelines.report import plot_bars
from pipelines.template import Run, StepResult

from .config import EmbodiedConfig
from .inputs import DatasetSpec, load_frames, offline_metrics
from .policies import EXPERTS, policy_spec
from .rollout import Rollout
from .train import TRAINED_ON, load_weights


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


def simulate(cfg: EmbodiedConfig, weights: dict, env_id: str, vision: dict | None = None) -> dict[str, dict]:
    """bc, vision (with its weights), expert (where ``env_id`` has one) and random on the held-out seeds:
    return, success rate, episodes. The vision policy's camera is rendered at the size it was trained on,
    whatever ``cameras`` says (the other policies render nothing)."""
    e = cfg.evaluate
    update = {"env": cfg.env.model_copy(update={"id": env_id})}
    if vision is not None:
        update["cameras"] = cfg.cameras.model_copy(update={"names": [vision["camera"]], "width": vision["width"],
                                                           "height": vision["height"]})
    cfg = cfg.model_copy(update=update)
    episodes = [(k, e.seed + k) for k in range(e.episodes)]
    bc = policy_spec("mlp", env_id, weights=weights)
    rollout = Rollout(cfg, bc, e.mode, record=False)
    try:
        results = {"bc": rollout_returns(rollout, bc, episodes, e.mode)}
        if vision is not None:
            results["vision"] = rollout_returns(rollout, policy_spec("vision", env_id, weights=vision), episodes,
                                                e.mode)
        if env_id in EXPERTS:
            results["expert"] = rollout_returns(rollout, policy_spec("expert", env_id), episodes, "local")
        results["random"] = rollout_returns(rollout, policy_spec("random", env_id, seed=e.seed), episodes, "local")
    finally:
        rollout.close()
    return results


def write_simulation(cfg: EmbodiedConfig, results: dict, env_id: str, run_dir: str) -> tuple[dict, dict, str | None]:
    """``(metrics, report, failure)`` of a :func:`simulate`, with its return and success plots written."""
    e = cfg.evaluate
    metrics = {f"{name}_{key}": value for name, r in results.items()
               for key, value in (("return", r["return"]), ("success_rate", r["success_rate"]))}
    if "expert" in results:
        metrics["gap_closed"] = gap_closed(metrics["bc_return"], metrics["expert_return"], metrics["random_return"])
        if "vision" in results:  # reported, no bar yet
            metrics["vision_gap_closed"] = gap_closed(metrics["vision_return"], metrics["expert_return"],
                                                      metrics["random_return"])
    metrics["eval_episodes"] = e.episodes
    report = {"env": env_id, "seeds": [e.seed, e.seed + e.episodes - 1], "policies": results}
    title = f"{env_id}: held-out seeds ({e.episodes} episodes)"
    plot_bars(join(run_dir, "evaluation.png"), {k: v["return"] for k, v in results.items()},
              ylabel="mean episode return", title=title)
    plot_bars(join(run_dir, "evaluation_success.png"), {k: v["success_rate"] for k, v in results.items()},
              ylabel="success rate", title=title)
    failure = None
    if "gap_closed" in metrics and not metrics["gap_closed"] >= e.min_gap_closed:
        failure = (f"cloned policy closes {metrics['gap_closed']:.2f} of the random->expert gap "
                   f"(evaluate.min_gap_closed {e.min_gap_closed}); see {join(run_dir, 'evaluation.json')}")
    return metrics, report, failure


def evaluate(cfg: EmbodiedConfig, weights: dict, run_dir: str, check: bool = True, env_id: str | None = None,
             vision: dict | None = None):
    """Roll out bc (and the ``vision`` policy, given its weights), expert and random on the held-out seeds of
    ``env_id`` (default ``env.id``); write JSON + PNG; return metrics.

    A cloned policy below ``evaluate.min_gap_closed`` raises RunFailed (after writing), or with
    ``check=False`` comes back as ``(metrics, failure)`` for the step to report.
    """
    env_id = env_id or cfg.env.id
    results = simulate(cfg, weights, env_id, vision)
    metrics, report, failure = write_simulation(cfg, results, env_id, run_dir)
    write_json(join(run_dir, "evaluation.json"), {**report, **metrics})
    if failure and check:
        raise RunFailed(failure)
    return metrics if check else (metrics, failure)


def evaluate_on_input(cfg: EmbodiedConfig, weights: dict, trained_on: dict, run: Run) -> StepResult:
    """A policy cloned from the user's dataset: held-out action MSE vs the mean-action baseline on the
    held-out episodes, plus the simulator evaluation when the dataset named one of our envs."""
    spec = DatasetSpec(**trained_on)
    frames = load_frames(spec)
    held = frames.good & np.isin(frames.episode, spec.heldout_episodes)
    metrics = offline_metrics(weights, frames.obs[held], frames.act[held], spec.mean_action)
    report = {"dataset": trained_on["dataset"], "env": spec.env, "env_reason": spec.env_reason,
              "state": spec.state, "action": spec.action, "heldout_episodes": spec.heldout_episodes,
              "offline": dict(metrics)}
    name = spec.env or str(spec.robot_type or "your dataset")
    outputs = {"evaluation": run.path("evaluation.json"),
               "plot_offline": plot_bars(run.path("evaluation_offline.png"),
                                         {"bc": metrics["heldout_action_mse"],
                                          "mean action": metrics["baseline_action_mse"]},
                                         ylabel="action MSE on held-out episodes",
                                         title=f"{name}: {len(spec.heldout_episodes)} held-out episodes")}
    failure = None
    if spec.env:
        sim_metrics, sim_report, failure = write_simulation(cfg, simulate(cfg, weights, spec.env), spec.env, run.dir)
        metrics.update(sim_metrics)
        report.update(sim_report)
        outputs.update(plot=run.path("evaluation.png"), plot_success=run.path("evaluation_success.png"))
    write_json(run.path("evaluation.json"), {**report, **metrics})
    return StepResult(outputs, metrics, failure=failure)


def run(cfg: EmbodiedConfig, run: Run) -> StepResult:
    """The evaluate step: the run's ``policy`` vs the expert and random policies on held-out seeds (a policy
    cloned from the user's dataset: held-out action MSE, and the simulator only where the dataset names an env)."""
    policy = run.input("policy")
    weights = load_weights(policy)
    trained_on = read_json(join(policy, TRAINED_ON)) if exists(join(policy, TRAINED_ON)) else {}
    if trained_on.get("source") == "input":
        return evaluate_on_input(cfg, weights, trained_on, run)
    vision = load_weights(run.outputs["vision_policy"]) if "vision_policy" in run.outputs else None
    metrics, failure = evaluate(cfg, weights, run.dir, check=False, env_id=trained_on.get("env"), vision=vision)
    outputs = {"evaluation": run.path("evaluation.json"), "plot": run.path("evaluation.png"),
               "plot_success": run.path("evaluation_success.png")}
    return StepResult(outputs, metrics, failure=failure)


if __name__ == "__main__":
    from .template import TEMPLATE

    TEMPLATE.step_alias("evaluate")
