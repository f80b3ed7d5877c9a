"""Supported simulators: gymnasium MuJoCo robot arms, with a success test per env."""
from __future__ import annotations

import numpy as np

# env id -> success distance in metres (measured by goal_distance). Reacher: fingertip on the
# target; Pusher: the goal disc's radius (the 3-D distance, as the reward's reward_dist term, with
# the object's centre 0.048 m above the goal's: within 0.064 m of it across the table).
SUCCESS_DISTANCE = {"Reacher-v5": 0.02, "Pusher-v5": 0.08}


def make_env(env_id: str):
    """A headless gymnasium env (MuJoCo physics, no rendering)."""
    import gymnasium as gym

    if env_id not in SUCCESS_DISTANCE:
        raise ValueError(f"unsupported env {env_id!r} (supported: {', '.join(SUCCESS_DISTANCE)})")
    return gym.make(env_id)


def goal_distance(env_id: str, obs: np.ndarray) -> np.ndarray:
    """Distance to the goal for a batch of observations (fingertip->target or object->goal)."""
    obs = np.atleast_2d(obs)
    if env_id == "Reacher-v5":
        return np.linalg.norm(obs[:, 8:10], axis=1)
    if env_id == "Pusher-v5":
        return np.linalg.norm(obs[:, 17:20] - obs[:, 20:23], axis=1)
    raise ValueError(f"unsupported env {env_id!r}")


def is_success(env_id: str, final_obs: np.ndarray) -> np.ndarray:
    """Whether each episode ended within the env's success distance of its goal."""
    return goal_distance(env_id, final_obs) < SUCCESS_DISTANCE[env_id]


def env_facts(env_id: str) -> dict:
    """obs/action sizes, action bounds, fps and episode length of an env id."""
    env = make_env(env_id)
    try:
        return {
            "obs_dim": int(env.observation_space.shape[0]),
            "act_dim": int(env.action_space.shape[0]),
            "low": env.action_space.low.astype(np.float32).tolist(),
            "high": env.action_space.high.astype(np.float32).tolist(),
            "fps": float(round(1.0 / env.unwrapped.dt, 6)),
            "max_episode_steps": int(env.spec.max_episode_steps),
        }
    finally:
        env.close()
