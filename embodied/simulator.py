"""Simulator actors (a vector of envs each) and the batched policy actor.

Both are plain classes; :mod:`embodied.rollout` wraps them with ``ray.remote``
and the resources from config. A simulator runs whole episodes only: it keeps a
queue of assigned ``(episode_id, seed)`` pairs, fills its env slots from it, and
returns an episode only when it has ended, so a crash loses nothing that was
returned and leaves nothing half-written.

With cameras (``cameras={"names": [...], "width": .., "height": .., "shadows": ..}``) a simulator
renders each camera of each env before every step (the frame of the observation the policy acts
on) with one :class:`embodied.cameras.CameraRig`; a recorded episode's frames come back beside it
(:meth:`Simulator.step_episodes`' second return value, which the driver passes on by reference).
A policy that reads pixels (:func:`uses_images`: kind ``vision``) is also called with
``images={camera: uint8 (N, H, W, 3)}``; state-only policies never see them.
"""
from __future__ import annotations

import asyncio
import os
from collections import deque

import numpy as np

from .envs import is_success, make_env

IMAGE_POLICY_KINDS = ("vision",)


def uses_images(policy: dict | None) -> bool:
    """Whether a policy spec reads camera frames (is called with ``images=``)."""
    return bool(policy) and (policy.get("kind") in IMAGE_POLICY_KINDS or bool(policy.get("images")))


class EpisodeBuffer:
    """The frames of one running episode."""

    def __init__(self, episode_id: int, seed: int, obs: np.ndarray, noise_rng=None):
        self.id, self.seed, self.obs = episode_id, seed, obs
        self.noise_rng = noise_rng  # the episode's action noise (collect.action_noise > 0), else None
        self.states, self.actions, self.rewards = [], [], []
        self.images: dict[str, list] = {}

    def add(self, action, reward, next_obs, images: dict | None = None):
        self.states.append(self.obs)
        self.actions.append(action)
        self.rewards.append(reward)
        for camera, frame in (images or {}).items():
            self.images.setdefault(camera, []).append(frame)
        self.obs = next_obs

    def frames(self) -> dict[str, np.ndarray]:
        """The episode's camera frames, ``{camera: uint8 (T, H, W, 3)}``."""
        return {camera: np.stack(frames) for camera, frames in self.images.items()}

    def finish(self, env_id: str, record: bool, reject: str | None = None) -> dict:
        rewards = np.asarray(self.rewards, dtype=np.float32)
        out = {"id": self.id, "seed": self.seed, "length": len(rewards), "reject": reject,
               "return": float(rewards.sum()), "success": bool(is_success(env_id, self.obs)[0])}
        if record and reject is None:
            out["state"] = np.asarray(self.states, dtype=np.float32)
            out["action"] = np.asarray(self.actions, dtype=np.float32)
            out["reward"] = rewards
            if self.images:
                out["frames"] = self.frames()
        return out


class Simulator:
    """Steps ``num_envs`` copies of an env; actions come from a local policy or a policy actor."""

    def __init__(self, env_id: str, num_envs: int, policy: dict | None = None, policy_actor=None,
                 record: bool = True, cameras: dict | None = None, policy_images: bool = False,
                 action_noise: float = 0.0):
        self.env_id, self.record = env_id, record
        self.envs = [make_env(env_id) for _ in range(num_envs)]
        space = self.envs[0].action_space
        self.low, self.high = space.low, space.high
        # DART-style noisy demonstrations: sd = action_noise x half the action range, per episode seed
        self.noise_sd = action_noise * (space.high - space.low) / 2.0
        self.slots: list[EpisodeBuffer | None] = [None] * num_envs
        self.queue: deque = deque()
        self.rig = None
        if cameras and cameras.get("names"):
            from .cameras import CameraRig

            # the envs of an actor are copies of one model: one renderer draws them all
            self.rig = CameraRig(env_id, self.envs[0].unwrapped.model, cameras["names"],
                                 cameras.get("width", 96), cameras.get("height", 96), cameras.get("shadows", False))
        self.set_policy(policy, policy_actor, policy_images)

    def set_policy(self, policy: dict | None = None, policy_actor=None, policy_images: bool = False) -> None:
        """Act with a local copy of ``policy`` or by calling ``policy_actor`` (exactly one);
        ``policy_images``: the policy also gets the camera frames (``images=``)."""
        if (policy is None) == (policy_actor is None):
            raise ValueError("give a simulator exactly one of: a local policy spec, a policy actor")
        if any(s is not None for s in self.slots) or self.queue:
            raise RuntimeError("cannot switch policies with episodes still running")
        self.policy_actor, self.local_policy = policy_actor, None
        self.policy_images = policy_images or uses_images(policy)
        if self.policy_images and self.rig is None:
            raise ValueError("this policy reads camera frames: set cameras.names")
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
                    rng = np.random.default_rng([int(seed), 1]) if np.any(self.noise_sd > 0) else None
                    slot = self.slots[i] = EpisodeBuffer(episode_id, seed, obs.astype(np.float32), rng)
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
            if self.policy_images:  # the policy sees this step's frames: render first
                rendered = self._render(active)
                images = {c: np.stack([r[c] for r in rendered]) for c in self.rig.names}
                if self.local_policy is not None:
                    actions = self.local_policy(obs, images=images)
                else:
                    actions = ray.get(self.policy_actor.act.remote(obs, images=images))
            elif self.local_policy is not None:
                actions = self.local_policy(obs)
                rendered = self._render(active)
            else:  # render the frames to record while the policy actor computes the actions
                pending = self.policy_actor.act.remote(obs)
                rendered = self._render(active)
                actions = ray.get(pending)
            for i, action, frames in zip(active, actions, rendered):
                slot = self.slots[i]
                if slot.noise_rng is not None:  # the dataset records the executed (noisy) action
                    noisy = action + slot.noise_rng.normal(0.0, self.noise_sd)
                    action = np.clip(noisy, self.low, self.high).astype(np.float32)
                next_obs, reward, terminated, truncated, _ = self.envs[i].step(action)
                slot.add(action, reward, next_obs.astype(np.float32), frames if self.record else None)
                env_steps += 1
                if not np.all(np.isfinite(next_obs)) or not np.isfinite(reward):
                    finished.append(slot.finish(self.env_id, self.record, reject="non-finite state or reward"))
                    self.slots[i] = None
                elif terminated or truncated:
                    finished.append(slot.finish(self.env_id, self.record))
                    self.slots[i] = None
        self._fill_slots(finished)
        out = {"episodes": finished, "env_steps": env_steps,
               "busy": sum(s is not None for s in self.slots) + len(self.queue)}
        if self.rig is not None and self.record:  # {episode id: {camera: frames}}, apart from the episodes
            out["frames"] = {e["id"]: e.pop("frames") for e in finished if "frames" in e}
            for e in finished:
                e["has_frames"] = e["id"] in out["frames"]
        return out

    def step_episodes(self, episodes, steps: int) -> tuple[dict, dict]:
        """:meth:`advance` with the recorded frames as a second value: call it with ``num_returns=2`` and
        pass the second reference on (to the encoding tasks) without fetching it."""
        out = self.advance(episodes, steps)
        return out, out.pop("frames", {})

    def _render(self, active: list[int]) -> list[dict | None]:
        """Each camera's frame of each active env (``None`` per env without cameras or recording)."""
        if self.rig is None or not (self.record or self.policy_images):
            return [None] * len(active)
        return [self.rig.render(self.envs[i].unwrapped.data) for i in active]


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

    async def act(self, obs: np.ndarray, images: dict | None = None) -> np.ndarray:
        """Actions for ``obs`` (and the camera frames ``images``, for a vision policy)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.pending.append((obs, images, future))
        rows = sum(len(o) for o, _, _ in self.pending)
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
            obs = np.concatenate([o for o, _, _ in batch])
            if batch[0][1] is None:
                actions = self.policy(obs)
            else:
                actions = self.policy(obs, images={c: np.concatenate([i[c] for _, i, _ in batch])
                                                   for c in batch[0][1]})
        except Exception as e:  # noqa: BLE001 - every waiting simulator sees the error
            for _, _, fut in batch:
                fut.set_exception(e)
            return
        self.batches += 1
        self.rows += len(actions)
        start = 0
        for obs, _, fut in batch:
            fut.set_result(actions[start:start + len(obs)])
            start += len(obs)
