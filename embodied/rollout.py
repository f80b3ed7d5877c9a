"""Rollouts: simulator actors + a batched policy actor (or a local policy copy per simulator).

The ``collect`` step (``python -m embodied collect``) rolls out expert episodes
into a LeRobot v3 dataset (``<run_dir>/episodes``) and the rejects table.

Crash safety: the driver remembers which episodes each simulator holds. When a
simulator actor dies, the driver starts a new one and re-queues every episode
the dead one had not returned; episodes are only returned once ended, so the
dataset never sees a partial episode and every episode id arrives exactly once.

Cameras (``cameras.names``): the simulators render (MuJoCo offscreen, ``MUJOCO_GL`` from their
runtime environment) and return each call's recorded frames as a second return value; the driver
owns that object but never fetches it: episodes reach ``sink`` with ``frames`` set to its
reference, which the dataset writer hands to its encoding tasks. The frames of a crashed
simulator's unfinished episodes never left it.
"""
from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Callable

import numpy as np

from pipelines.cli import RunFailed
from pipelines.io import join, reject_ratio_failure, rejects_table, write_table
from pipelines.progress import Progress
from pipelines.report import plot_lines
from pipelines.template import Run, StepResult

from .config import EmbodiedConfig
from .dataset import LeRobotWriter, read_first_episodes, vectors
from .envs import SUCCESS_DISTANCE, env_facts, goal_distance
from .policies import policy_spec
from .simulator import PolicyServer, Simulator, uses_images

ROLLOUT_MODES = ("auto", "batched", "local")


def resolve_mode(mode: str, cfg: EmbodiedConfig) -> str:
    """``auto`` -> ``batched`` when the policy actor has a GPU (one forward pass for every simulator),
    else ``local``: on CPU a policy copy in each simulator beats a round trip per step (benchmarks/embodied.py:
    1.6x the bare loop local, 0.4x batched, 2 cores)."""
    if mode not in ROLLOUT_MODES:
        raise ValueError(f"unknown rollout mode {mode!r} (allowed: {', '.join(ROLLOUT_MODES)})")
    if mode == "auto":
        return "batched" if cfg.policy_server.num_gpus > 0 else "local"
    return mode


class Rollout:
    """A set of simulator actors (and, in ``batched`` mode, one policy actor) for one policy."""

    def __init__(self, cfg: EmbodiedConfig, policy: dict, mode: str = "batched", record: bool = True,
                 action_noise: float = 0.0):
        import ray

        self.cfg, self.record, self.action_noise = cfg, record, action_noise
        self.server = None
        self.cameras = cfg.cameras.model_dump() if cfg.cameras.names else None
        options = {"num_cpus": cfg.simulator.num_cpus, "max_restarts": 0}
        if self.cameras:
            from .cameras import gl_runtime_env

            options["runtime_env"] = gl_runtime_env(cfg.cameras.gl)
        self.sim_cls = ray.remote(**options)(Simulator)
        self.sims = []
        self.set_policy(policy, mode)
        self.restarts = 0

    def set_policy(self, policy: dict, mode: str = "batched") -> None:
        """Switch every simulator to ``policy`` (batched: through a new policy actor; local: a copy each;
        auto: :func:`resolve_mode`)."""
        import ray

        mode = resolve_mode(mode, self.cfg)
        if self.server is not None:
            ray.kill(self.server, no_restart=True)
            self.server = None
        self.policy, self.mode = policy, mode
        sim, ps = self.cfg.simulator, self.cfg.policy_server
        if mode == "batched":
            server_cls = ray.remote(num_cpus=ps.num_cpus, num_gpus=ps.num_gpus)(PolicyServer)
            self.server = server_cls.remote(policy, clients=sim.max_actors, batch_wait_ms=ps.batch_wait_ms,
                                            max_batch=ps.max_batch)
        if not self.sims:
            self.sims = [self._new_simulator() for _ in range(sim.max_actors)]
            return
        ray.get([s.set_policy.remote(*self._policy_args(), uses_images(policy)) for s in self.sims])

    def _policy_args(self) -> tuple:
        return (None, self.server) if self.mode == "batched" else (self.policy, None)

    def _new_simulator(self):
        policy, server = self._policy_args()
        return self.sim_cls.remote(self.cfg.env.id, self.cfg.simulator.envs_per_actor, policy=policy,
                                   policy_actor=server, record=self.record, cameras=self.cameras,
                                   policy_images=uses_images(self.policy), action_noise=self.action_noise)

    def policy_device(self) -> str:
        import ray

        return ray.get(self.server.device.remote()) if self.server is not None else "cpu"

    def run(self, episodes, sink: Callable[[dict], None],
            on_progress: Callable[[Rollout, int], None] | None = None) -> dict:
        """Run ``episodes`` (``[(id, seed), ...]``) to the end; ``sink`` gets each ended episode once."""
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        sim = self.cfg.simulator
        backlog = sim.envs_per_actor * sim.queue_per_env
        pending = deque(episodes)
        held: list[dict[int, int]] = [{} for _ in self.sims]
        crashes = [0] * len(self.sims)
        calls: dict = {}
        done = env_steps = rerun = 0

        def submit(i: int) -> None:
            new = [pending.popleft() for _ in range(min(len(pending), max(0, backlog - len(held[i]))))]
            held[i].update(new)
            summary, frames = self.sims[i].step_episodes.options(num_returns=2).remote(new, sim.steps_per_call)
            calls[summary] = (i, frames)

        start = time.perf_counter()
        for i in range(len(self.sims)):
            submit(i)
        while calls:
            [ref], _ = ray.wait(list(calls), num_returns=1)
            i, frames = calls.pop(ref)
            try:
                out = ray.get(ref)
            except RayTaskError as e:  # an error inside the simulator (env or policy), not a crash
                raise RunFailed(f"simulator {i} failed: {str(e.cause or e).splitlines()[0]}") from None
            except RayActorError as e:
                crashes[i] += 1
                self.restarts += 1
                if crashes[i] > sim.max_restarts:
                    raise RunFailed(f"simulator {i} crashed {crashes[i]} times (max_restarts="
                                    f"{sim.max_restarts}): {str(e).splitlines()[0]}") from None
                print(f"simulator {i} died; restarting it and re-running {len(held[i])} unfinished "
                      "episodes", file=sys.stderr)
                rerun += len(held[i])
                pending.extendleft(sorted(held[i].items(), reverse=True))
                held[i] = {}
                ray.kill(self.sims[i], no_restart=True)
                self.sims[i] = self._new_simulator()
                submit(i)
                continue
            for ep in out["episodes"]:
                held[i].pop(ep["id"])
                if ep.pop("has_frames", False):
                    ep["frames"] = frames  # {episode id: {camera: frames}}, by reference
                sink(ep)
                done += 1
            env_steps += out["env_steps"]
            if on_progress is not None:
                on_progress(self, done)
            if pending or held[i]:
                submit(i)
        seconds = time.perf_counter() - start
        return {"episodes": done, "env_steps": env_steps, "seconds": seconds,
                "steps_per_s": env_steps / seconds if seconds > 0 else 0.0, "restarts": self.restarts,
                "rerun_episodes": rerun}

    def simulator_pids(self) -> list[int]:
        import ray

        return ray.get([s.pid.remote() for s in self.sims])

    def close(self) -> None:
        import ray

        for actor in [*self.sims, self.server]:
            if actor is not None:
                ray.kill(actor, no_restart=True)


def collect(cfg: EmbodiedConfig, run_dir: str, on_progress=None, check: bool = True):
    """Roll out the collect policy; write ``episodes`` (LeRobot v3) and ``rejects``; return metrics.

    Too many rejected episodes raise RunFailed (after writing), or with ``check=False`` come back
    as ``(metrics, failure)`` for the step to report.
    """
    env_id, c = cfg.env.id, cfg.collect
    facts = env_facts(env_id)
    policy = policy_spec(c.policy, env_id, seed=c.seed)
    writer = LeRobotWriter(join(run_dir, "episodes"), env_id, facts, cfg.env.task, expected=c.episodes,
                           frames_per_file=c.frames_per_file,
                           cameras=cfg.cameras.model_dump() if cfg.cameras.names else None)
    rollout = Rollout(cfg, policy, c.mode, action_noise=c.action_noise)
    bar = Progress("collect", c.episodes, "episodes")

    def report(r, done):
        bar.update(done)
        if on_progress is not None:
            on_progress(r, done)

    try:
        stats = rollout.run([(k, c.seed + k) for k in range(c.episodes)], writer.add, report)
        bar.finish()
        counts = writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        rollout.close()
    write_table(rejects_table(writer.rejects), join(run_dir, "rejects"))
    returns = [e["return"] for e in writer.episodes]
    metrics = {
        "episodes": counts["episodes"], "steps": counts["frames"], "rejected_episodes": counts["rejects"],
        "collect_return": sum(returns) / len(returns) if returns else float("nan"),
        "collect_success_rate": (sum(e["success"] for e in writer.episodes) / len(returns)
                                 if returns else float("nan")),
        "collect_steps_per_s": stats["steps_per_s"], "simulator_restarts": stats["restarts"],
        "rerun_episodes": stats["rerun_episodes"],
    }
    failure = reject_ratio_failure(counts["rejects"], c.episodes, c.max_reject_ratio, "episodes",
                                   "collect.max_reject_ratio", join(run_dir, "rejects"))
    if failure and check:
        raise RunFailed(failure)
    return metrics if check else (metrics, failure)


def plot_trajectories(dataset: str, uri: str, env_id: str, episodes: int = 3) -> str:
    """Distance to the goal over time for the dataset's first ``episodes`` episodes (PNG at ``uri``),
    read back from the dataset, with the env's success distance as a flat line."""
    frames = read_first_episodes(dataset, episodes)
    series = {}
    if frames.num_rows:  # none when every episode was rejected
        index, t = frames["episode_index"].to_numpy(), frames["timestamp"].to_numpy()
        distance = goal_distance(env_id, vectors(frames["observation.state"]))
        series = {f"episode {k}": (t[index == k], distance[index == k]) for k in np.unique(index)}
        series["success distance"] = ([0.0, float(t.max())], [SUCCESS_DISTANCE[env_id]] * 2)
    return plot_lines(uri, series, xlabel="time (s)", ylabel="distance to goal (m)",
                      title=f"{env_id}: collected episodes")


def run(cfg: EmbodiedConfig, run: Run) -> StepResult:
    """The collect step: ``episodes`` (LeRobot v3, one row per frame), ``rejects`` and a plot of the
    first episodes' distance to the goal (``plot_trajectories``)."""
    metrics, failure = collect(cfg, run.dir, check=False)
    outputs = {"episodes": run.path("episodes"), "rejects": run.path("rejects"),
               "plot_trajectories": plot_trajectories(run.path("episodes"), run.path("trajectories.png"),
                                                      cfg.env.id)}
    return StepResult(outputs, metrics, rows=metrics["steps"], rejects=metrics["rejected_episodes"],
                      failure=failure)


if __name__ == "__main__":
    from .template import TEMPLATE

    TEMPLATE.step_alias("collect")
