"""Environment steps/s: Ray rollout (simulator actors + batched policy actor) vs a bare gymnasium loop.

Both run the same policy (the template's MLP with fixed random weights) over the
same number of envs. Bare: one ``gymnasium.vector.SyncVectorEnv`` stepping all
envs with one batched forward pass per step. Ray: ``simulator.max_actors``
actors x ``simulator.envs_per_actor`` envs, observations batched across
simulators by the policy actor, trajectories recorded and returned as in
``collect``. Actor start-up is excluded (a warm-up round runs first).

    python benchmarks/embodied.py [--env Reacher-v5] [--steps 100000] [--set simulator.envs_per_actor=32]

Prints one JSON line last: env, steps_per_s, bare_steps_per_s, ratio (+ setup, machine).
"""
from __future__ import annotations

import sys
from pathlib import Path

import click
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from embodied import config as config_mod  # noqa: E402
from embodied.envs import env_facts  # noqa: E402
from embodied.policies import build_mlp, make_policy, mlp_weights, policy_spec  # noqa: E402
from pipelines.bench import emit, timer  # noqa: E402


def random_mlp(env_id: str, hidden, seed: int = 0) -> dict:
    """Weights of an untrained policy MLP: the same network for both sides."""
    import torch

    torch.manual_seed(seed)
    facts = env_facts(env_id)
    model = build_mlp(facts["obs_dim"], facts["act_dim"], hidden)
    return mlp_weights(model, facts["obs_dim"], facts["act_dim"], hidden, facts["low"], facts["high"])


def bare_steps_per_s(env_id: str, policy: dict, num_envs: int, steps: int) -> float:
    """A plain gymnasium vector env loop with one batched policy call per step."""
    import gymnasium as gym
    import torch

    torch.set_num_threads(1)  # as in the Ray actors (OMP_NUM_THREADS=1); many threads only contend here
    envs = gym.make_vec(env_id, num_envs=num_envs, vectorization_mode="sync")
    act = make_policy(policy, device=None)
    obs, _ = envs.reset(seed=0)
    for _ in range(10):  # warm-up
        obs, *_ = envs.step(act(obs))
    iterations = max(1, steps // num_envs)
    with timer() as elapsed:
        for _ in range(iterations):
            obs, *_ = envs.step(act(obs))
    envs.close()
    return iterations * num_envs / elapsed()


def ray_steps_per_s(cfg, policy: dict, steps: int) -> tuple[float, dict]:
    """The template's batched rollout, timed over whole episodes after a warm-up round."""
    import ray

    from embodied.rollout import Rollout

    facts = env_facts(cfg.env.id)
    per_episode = facts["max_episode_steps"]
    envs = cfg.simulator.max_actors * cfg.simulator.envs_per_actor
    rollout = Rollout(cfg, policy, "batched", record=True)
    try:
        rollout.run([(k, k) for k in range(envs)], lambda ep: None)  # warm-up: actors started, imports done
        episodes = max(envs, steps // per_episode)
        stats = rollout.run([(k, 10_000 + k) for k in range(episodes)], lambda ep: None)
        server = ray.get(rollout.server.stats.remote())
        device = rollout.policy_device()
    finally:
        rollout.close()
    return stats["steps_per_s"], {"mean_policy_batch": round(server["mean_batch"], 1), "policy_device": device,
                                  "ray_env_steps": stats["env_steps"]}


@click.command()
@click.option("--env", "env_id", default="Reacher-v5", show_default=True)
@click.option("--steps", default=100_000, show_default=True, help="env steps timed on each side")
@click.option("--set", "overrides", multiple=True, help="config override, e.g. simulator.envs_per_actor=32")
@click.option("--address", default=None, help="Ray address (default: a local in-process Ray)")
def main(env_id, steps, overrides, address):
    from embodied.rollout import connect_cluster

    cfg = config_mod.load(None, [f"env.id={env_id}", "simulator.envs_per_actor=32", *overrides])
    policy = policy_spec("mlp", env_id, weights=random_mlp(env_id, cfg.train.hidden))
    num_envs = cfg.simulator.max_actors * cfg.simulator.envs_per_actor
    bare = bare_steps_per_s(env_id, policy, num_envs, steps)
    connect_cluster(cfg, address)
    ray_rate, extra = ray_steps_per_s(cfg, policy, steps)
    emit({"env": env_id, "steps_per_s": round(ray_rate, 1), "bare_steps_per_s": round(bare, 1),
          "ratio": round(ray_rate / bare, 3), "envs": num_envs, "simulators": cfg.simulator.max_actors,
          "steps_per_call": cfg.simulator.steps_per_call, **extra})


if __name__ == "__main__":
    main()
