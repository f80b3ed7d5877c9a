"""Environment steps/s: Ray rollout (simulator actors + batched policy actor) vs a bare gymnasium loop.

Both run the same policy (the template's MLP with fixed random weights) over the
same number of envs. Bare: one ``gymnasium.vector.SyncVectorEnv`` stepping all
envs with one batched forward pass per step. Ray: ``simulator.max_actors``
actors x ``simulator.envs_per_actor`` envs in the template's ``collect.mode``
(``auto``: a policy copy in each simulator on CPU, the batched policy actor with a GPU;
``--set collect.mode=batched`` measures the policy actor on CPU), trajectories recorded
and returned as in ``collect``. Actor start-up is excluded (a warm-up round runs first).

    python benchmarks/embodied.py [--env Reacher-v5] [--steps 100000] [--set simulator.envs_per_actor=32]

Bare and Ray rounds alternate (``--rounds``) so drifting machine load hits both
sides alike. Prints one JSON line: env, steps_per_s, bare_steps_per_s, ratio
(+ setup, machine).

Then, in the same run, the same with cameras (``--cameras top``; empty to skip):
the Ray simulators render each camera every step (``cameras.width`` x
``cameras.height``) and return the recorded frames to the object store as in
``collect`` (the MP4 encoding tasks are not timed); the bare loop renders the
same cameras with the same renderer (:class:`embodied.cameras.CameraRig`, one
for all envs) after every vector step. Its own JSON line (last): camera_steps_per_s,
camera_bare_steps_per_s, camera_ratio.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from embodied import config as config_mod
from embodied.envs import env_facts
from embodied.policies import build_mlp, make_policy, mlp_weights, policy_spec
from pipelines.bench import emit, guard, timer


def random_mlp(env_id: str, hidden, seed: int = 0) -> dict:
    """Weights of an untrained policy MLP: the same network for both sides."""
    import torch

    torch.manual_seed(seed)
    facts = env_facts(env_id)
    model = build_mlp(facts["obs_dim"], facts["act_dim"], hidden)
    return mlp_weights(model, facts["obs_dim"], facts["act_dim"], hidden, facts["low"], facts["high"])


class BareLoop:
    """A plain gymnasium vector env stepping all envs, one batched policy call per step."""

    def __init__(self, env_id: str, policy: dict, num_envs: int, cameras: dict | None = None):
        import gymnasium as gym
        import torch

        torch.set_num_threads(1)  # as in the Ray actors (OMP_NUM_THREADS=1); more threads only contend here
        self.envs = gym.make_vec(env_id, num_envs=num_envs, vectorization_mode="sync")
        self.act = make_policy(policy, device=None)
        self.obs, _ = self.envs.reset(seed=0)
        self.num_envs = num_envs
        self.rig = None
        if cameras:
            from embodied.cameras import CameraRig

            self.rig = CameraRig(env_id, self.envs.envs[0].unwrapped.model, cameras["names"], cameras["width"],
                                 cameras["height"], cameras["shadows"])
        self.run(10 * num_envs)  # warm-up

    def run(self, steps: int) -> tuple[int, float]:
        """(env steps, seconds) for about ``steps`` env steps (each env's cameras rendered every step)."""
        iterations = max(1, steps // self.num_envs)
        with timer() as elapsed:
            for _ in range(iterations):
                if self.rig is not None:
                    self.frames = [self.rig.render(env.unwrapped.data) for env in self.envs.envs]
                self.obs, *_ = self.envs.step(self.act(self.obs))
        return iterations * self.num_envs, elapsed()


def measure(cfg, policy: dict, steps: int, rounds: int) -> dict:
    """Alternate bare and Ray rounds (the machine's load drifts) and sum steps and seconds per side."""
    import ray

    from embodied.rollout import Rollout

    per_episode = env_facts(cfg.env.id)["max_episode_steps"]
    envs = cfg.simulator.max_actors * cfg.simulator.envs_per_actor
    bare = BareLoop(cfg.env.id, policy, envs, cfg.cameras.model_dump() if cfg.cameras.names else None)
    rollout = Rollout(cfg, policy, cfg.collect.mode, record=True)
    totals = {"bare": [0, 0.0], "ray": [0, 0.0]}
    try:
        rollout.run([(k, k) for k in range(envs)], lambda ep: None)  # warm-up: actors started, imports done
        episodes = max(envs, steps // rounds // per_episode)
        for r in range(rounds):
            n, secs = bare.run(steps // rounds)
            totals["bare"][0] += n
            totals["bare"][1] += secs
            first = 10_000 + r * episodes
            stats = rollout.run([(k, k) for k in range(first, first + episodes)], lambda ep: None)
            totals["ray"][0] += stats["env_steps"]
            totals["ray"][1] += stats["seconds"]
        server = ray.get(rollout.server.stats.remote()) if rollout.server is not None else None
        device = rollout.policy_device()
    finally:
        rollout.close()
    return {"steps_per_s": totals["ray"][0] / totals["ray"][1], "bare_steps_per_s": totals["bare"][0] / totals["bare"][1],
            "mode": rollout.mode, "mean_policy_batch": round(server["mean_batch"], 1) if server else None,
            "policy_device": device,
            "ray_env_steps": totals["ray"][0], "bare_env_steps": totals["bare"][0]}


@click.command()
@click.option("--env", "env_id", default="Reacher-v5", show_default=True)
@click.option("--steps", default=100_000, show_default=True, help="env steps timed on each side")
@click.option("--rounds", default=4, show_default=True, help="alternating bare/Ray rounds")
@click.option("--set", "overrides", multiple=True, help="config override, e.g. simulator.envs_per_actor=32")
@click.option("--address", default=None, help="Ray address (default: a local in-process Ray)")
@click.option("--cameras", default="top", show_default=True,
              help="comma-separated cameras for the cameras-on measurement; empty: skip it")
@click.option("--camera-steps", default=8_000, show_default=True, help="env steps timed on each side, cameras on")
@click.option("--no-state", is_flag=True, help="skip the state-only measurement")
def main(env_id, steps, rounds, overrides, address, cameras, camera_steps, no_state):
    run = guard("embodied")
    from embodied.template import TEMPLATE

    cfg = config_mod.load(None, [f"env.id={env_id}", "simulator.envs_per_actor=32", *overrides])
    cameras = [c for c in cameras.split(",") if c]
    camera_cfg = config_mod.load(None, [f"env.id={env_id}", "simulator.envs_per_actor=32", *overrides,
                                        f"cameras.names=[{','.join(cameras)}]"]) if cameras else None
    os.environ.setdefault("MUJOCO_GL", cfg.cameras.gl)  # the bare loop renders in this process
    policy = policy_spec("mlp", env_id, weights=random_mlp(env_id, cfg.train.hidden))
    TEMPLATE.connect(cfg, address)
    setup = {"env": env_id, "envs": cfg.simulator.max_actors * cfg.simulator.envs_per_actor,
             "simulators": cfg.simulator.max_actors, "steps_per_call": cfg.simulator.steps_per_call}
    if not no_state:
        result = measure(cfg, policy, steps, rounds)
        ray_rate, bare_rate = result.pop("steps_per_s"), result.pop("bare_steps_per_s")
        emit({**setup, "steps_per_s": round(ray_rate, 1), "bare_steps_per_s": round(bare_rate, 1),
              "ratio": round(ray_rate / bare_rate, 3), **result}, run)
    if camera_cfg is not None:
        result = measure(camera_cfg, policy, camera_steps, rounds)
        ray_rate, bare_rate = result.pop("steps_per_s"), result.pop("bare_steps_per_s")
        c = camera_cfg.cameras
        emit({**setup, "camera_steps_per_s": round(ray_rate, 1), "camera_bare_steps_per_s": round(bare_rate, 1),
              "camera_ratio": round(ray_rate / bare_rate, 3), "cameras": c.names, "camera_size": [c.height, c.width],
              "camera_gl": os.environ["MUJOCO_GL"], **{f"camera_{k}": v for k, v in result.items()}}, run)

if __name__ == "__main__":
    main()
