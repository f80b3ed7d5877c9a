"""Simulator actors (a vector of envs each) and the batched policy actor.

Both are plain classes; :mod:`embodied.rollout` wraps them with ``ray.remote``
and the resources from config. A simulator runs whole episodes only: it keeps a
queue of assigned ``(episode_id, seed)`` pairs, fills its env slots from it, and
returns an episode only when it has ended, so a crash loses nothing that was
returned and leaves nothing half-written.
"""
from __future__ import annotations

import asyncio
import os
from collections import deque

import numpy as np

from .envs import is_success, make_env


class EpisodeBuffer:
    """The frames of one running episode."""

    def __init__(self, episode_id: int, seed: int, obs: np.ndarray):
        self.id, self.seed, self.obs = episode_id, seed, obs
        self.states, self.actions, self.rewards = [], [], []

    def add(self, action, reward, next_obs):
        self.states.append(self.obs)
        self.actions.append(action)
        self.rewards.append(reward)
        self.obs = next_obs

    def finish(self, env_id: str, record: bool, reject: str | None = None) -> dict:
        rewards = np.asarray(self.rewards, dtype=np.float32)
        out = {"id": self.id, "seed": self.seed, "length": len(rewards), "reject": reject,
               "return": float(rewards.sum()), "success": bool(is_success(env_id, self.obs)[0])}
        if record and reject is None:
            out["state"] = np.asarray(self.states, dtype=np.float32)
            out["action"] = np.asarray(self.actions, dtype=np.float32)
            out["reward"] = rewards
        return out


class Simulator:
    """Steps ``num_envs`` copies of an env; actions come from a local policy or a policy actor."""

    def __init__(self, env_id: str, num_envs: int, policy: dict | None = None, policy_actor=None,
                 record: bool = True):
        self.env_id, self.record = env_id, record
        self.envs = [make_env(env_id) for _ in range(num_envs)]
        self.slots: list[EpisodeBuffer | None] = [None] * num_envs
        self.queue: deque = deque()
        self.set_policy(policy, policy_actor)

    def set_policy(self, policy: dict | None = None, policy_actor=None) -> None:
        """Act with a local copy of ``policy`` or by calling ``policy_actor`` (exactly one)."""
        if (policy is None) == (policy_actor is None):
            raise ValueError("give a simulator exactly one of: a local policy spec, a policy actor")
        if any(s is not None for s in self.slots) or self.queue:
            raise RuntimeError("cannot switch policies with episodes still running")
        self.policy_actor, self.local_policy = policy_actor, None
        if policy is not None:
            from .policies import make_policy

            self.local_policy = make_policy(policy, device="cpu")

    def pid(self) -> int:
        return os.getpid()

    def _fill_slots(self, finished: list) -> None:
        for i, slot in enumerate(self.slots):
            while slot is None and self.queue:
                episode_id, seed = self.queue.popleft()
                obs, _ = self.envs[i].reset(seed=int(seed))
                if np.all(np.isfinite(obs)):
                    slot = self.slots[i] = EpisodeBuffer(episode_id, seed, obs.astype(np.float32))
                else:
                    finished.append(EpisodeBuffer(episode_id, seed, obs).finish(
                        self.env_id, self.record, reject="non-finite observation at reset"))

    def advance(self, episodes, steps: int) -> dict:
        """Queue ``episodes`` (``[(id, seed), ...]``), run up to ``steps`` env steps, return ended episodes."""
        import ray

        self.queue.extend((int(e), int(s)) for e, s in episodes)
        finished: list[dict] = []
        env_steps = 0
        for _ in range(steps):
            self._fill_slots(finished)
            active = [i for i, s in enumerate(self.slots) if s is not None]
            if not active:
                break
            obs = np.stack([self.slots[i].obs for i in active])
            if self.local_policy is not None:
                actions = self.local_policy(obs)
            else:
                actions = ray.get(self.policy_actor.act.remote(obs))
            for i, action in zip(active, actions):
                slot = self.slots[i]
                next_obs, reward, terminated, truncated, _ = self.envs[i].step(action)
                slot.add(action, reward, next_obs.astype(np.float32))
                env_steps += 1
                if not np.all(np.isfinite(next_obs)) or not np.isfinite(reward):
                    finished.append(slot.finish(self.env_id, self.record, reject="non-finite state or reward"))
                    self.slots[i] = None
                elif terminated or truncated:
                    finished.append(slot.finish(self.env_id, self.record))
                    self.slots[i] = None
        self._fill_slots(finished)
        return {"episodes": finished, "env_steps": env_steps,
                "busy": sum(s is not None for s in self.slots) + len(self.queue)}


class PolicyServer:
    """Batches ``act`` calls from all simulators into one forward pass (GPU when present).

    A batch runs as soon as every simulator is waiting or ``max_batch`` rows are
    queued, otherwise after ``batch_wait_ms``.
    """

    def __init__(self, policy: dict, clients: int, batch_wait_ms: float = 2.0, max_batch: int = 8192):
        from .policies import make_policy

        self.policy = make_policy(policy)
        self.clients, self.wait_s, self.max_batch = clients, batch_wait_ms / 1000.0, max_batch
        self.pending: list = []
        self.timer = None
        self.batches = self.rows = 0

    def device(self) -> str:
        return str(getattr(self.policy, "device", "cpu"))

    def stats(self) -> dict:
        return {"batches": self.batches, "rows": self.rows,
                "mean_batch": self.rows / self.batches if self.batches else 0.0}

    async def act(self, obs: np.ndarray) -> np.ndarray:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.pending.append((obs, future))
        rows = sum(len(o) for o, _ in self.pending)
        if len(self.pending) >= self.clients or rows >= self.max_batch:
            self._run_batch()
        elif self.timer is None:
            self.timer = loop.call_later(self.wait_s, self._run_batch)
        return await future

    def _run_batch(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        batch, self.pending = self.pending, []
        if not batch:
            return
        try:
            actions = self.policy(np.concatenate([o for o, _ in batch]))
        except Exception as e:  # noqa: BLE001 - every waiting simulator sees the error
            for _, fut in batch:
                fut.set_exception(e)
            return
        self.batches += 1
        self.rows += len(actions)
        start = 0
        for obs, fut in batch:
            fut.set_result(actions[start:start + len(obs)])
            start += len(obs)
