"""Policies: a scripted expert per env, uniform random, and a learned torch MLP.

Every policy maps a batch of observations ``(n, obs_dim)`` to actions
``(n, act_dim)``. Policies travel to actors as small specs (plain dicts) built
by :func:`policy_spec` and turned into callables by :func:`make_policy`.
"""
from __future__ import annotations

import numpy as np

# Reacher-v5 link lengths (body1 at 0.1 on link0, fingertip at 0.11 on link1)
REACHER_L1, REACHER_L2 = 0.1, 0.11


def _wrap(angle):
    return (angle + np.pi) % (2 * np.pi) - np.pi


class ReacherExpert:
    """Inverse kinematics to the target, then a joint-space PD controller."""

    def __init__(self, kp: float = 0.4, kd: float = 0.08):
        self.kp, self.kd = kp, kd

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        obs = np.asarray(obs, dtype=np.float64)
        q = np.arctan2(obs[:, 2:4], obs[:, 0:2])
        qdot = obs[:, 6:8]
        x, y = obs[:, 4], obs[:, 5]
        cos_elbow = (x * x + y * y - REACHER_L1 ** 2 - REACHER_L2 ** 2) / (2 * REACHER_L1 * REACHER_L2)
        elbow = np.arccos(np.clip(cos_elbow, -1.0, 1.0))
        best = None
        for sign in (1.0, -1.0):  # both IK branches; keep the one nearer the current pose
            q2 = sign * elbow
            q1 = np.arctan2(y, x) - np.arctan2(REACHER_L2 * np.sin(q2), REACHER_L1 + REACHER_L2 * np.cos(q2))
            err = np.stack([_wrap(q1 - q[:, 0]), q2 - q[:, 1]], axis=1)
            if best is None:
                best = err
            else:
                closer = np.abs(err).sum(1) < np.abs(best).sum(1)
                best = np.where(closer[:, None], err, best)
        return np.clip(self.kp * best - self.kd * qdot, -1.0, 1.0).astype(np.float32)


class RandomPolicy:
    """Uniform random actions within the action bounds."""

    def __init__(self, low, high, seed: int = 0):
        self.low = np.asarray(low, dtype=np.float32)
        self.high = np.asarray(high, dtype=np.float32)
        self.rng = np.random.default_rng(seed)

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        return self.rng.uniform(self.low, self.high, size=(len(obs), len(self.low))).astype(np.float32)


def build_mlp(obs_dim: int, act_dim: int, hidden, obs_mean=None, obs_std=None):
    """The learned policy network: observation normalisation + MLP (ReLU)."""
    import torch
    from torch import nn

    class MLPPolicyNet(nn.Module):
        def __init__(self):
            super().__init__()
            mean = torch.zeros(obs_dim) if obs_mean is None else torch.as_tensor(obs_mean, dtype=torch.float32)
            std = torch.ones(obs_dim) if obs_std is None else torch.as_tensor(obs_std, dtype=torch.float32)
            self.register_buffer("obs_mean", mean)
            self.register_buffer("obs_std", torch.clamp(std, min=1e-6))
            layers, width = [], obs_dim
            for h in hidden:
                layers += [nn.Linear(width, h), nn.ReLU()]
                width = h
            layers.append(nn.Linear(width, act_dim))
            self.net = nn.Sequential(*layers)

        def forward(self, obs):
            return self.net((obs - self.obs_mean) / self.obs_std)

    return MLPPolicyNet()


class TorchPolicy:
    """An MLP policy on CUDA when available, else CPU (same code path)."""

    def __init__(self, weights: dict, device: str | None = None):
        import torch

        self.torch = torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = build_mlp(weights["obs_dim"], weights["act_dim"], weights["hidden"])
        self.model.load_state_dict(weights["state_dict"])
        self.model.to(self.device).eval()
        self.low = np.asarray(weights["low"], dtype=np.float32)
        self.high = np.asarray(weights["high"], dtype=np.float32)

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        with self.torch.inference_mode():
            x = self.torch.as_tensor(np.asarray(obs, dtype=np.float32), device=self.device)
            out = self.model(x).float().cpu().numpy()
        return np.clip(out, self.low, self.high)


def mlp_weights(model, obs_dim: int, act_dim: int, hidden, low, high) -> dict:
    """A portable snapshot of an MLP policy (CPU tensors + architecture + bounds)."""
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return {"state_dict": state, "obs_dim": int(obs_dim), "act_dim": int(act_dim),
            "hidden": [int(h) for h in hidden], "low": list(map(float, low)), "high": list(map(float, high))}


EXPERTS = {"Reacher-v5": ReacherExpert}


def policy_spec(kind: str, env_id: str, seed: int = 0, weights: dict | None = None) -> dict:
    """A small, picklable description of a policy for actors to build."""
    if kind not in ("expert", "random", "mlp"):
        raise ValueError(f"unknown policy kind {kind!r} (allowed: expert, random, mlp)")
    if kind == "expert" and env_id not in EXPERTS:
        raise ValueError(f"no scripted expert for {env_id!r} (have: {', '.join(EXPERTS)}); "
                         "collect with policy random or bring a dataset")
    if kind == "mlp" and weights is None:
        raise ValueError("an mlp policy needs weights (a trained checkpoint)")
    return {"kind": kind, "env_id": env_id, "seed": int(seed), "weights": weights}


def make_policy(spec: dict, device: str | None = None):
    """Turn a :func:`policy_spec` into a callable ``obs -> actions``."""
    kind, env_id = spec["kind"], spec["env_id"]
    if kind == "expert":
        return EXPERTS[env_id]()
    if kind == "random":
        from .envs import env_facts

        facts = env_facts(env_id)
        return RandomPolicy(facts["low"], facts["high"], seed=spec["seed"])
    return TorchPolicy(spec["weights"], device=device)
