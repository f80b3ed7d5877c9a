"""Policies: a scripted expert per env, uniform random, and a learned torch MLP.

Every policy maps a batch of observations ``(n, obs_dim)`` to actions
``(n, act_dim)``. Policies travel to actors as small specs (plain dicts) built
by :func:`policy_spec` and turned into callables by :func:`make_policy`.
"""
from __future__ import annotations

import os

import numpy as np

# Reacher-v5 link lengths (body1 at 0.1 on link0, fingertip at 0.11 on link1)
REACHER_L1, REACHER_L2 = 0.1, 0.11


def _skew(v):
    """The matrix of ``v x .`` (np.cross is slow on single 3-vectors)."""
    return np.array([[0.0, -v[2], v[1]], [v[2], 0.0, -v[0]], [-v[1], v[0], 0.0]])


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


class PusherExpert:
    """Pushes the object onto the goal with a corner of the hand: staged targets, inverse kinematics, joint PD.

    Works from the observation alone (qpos, qvel, fingertip, object, goal); a private MuJoCo
    model of the arm gives the kinematics and the mass matrix for each row. The "fingertip"
    Pusher-v5 observes is the middle of the hand's back bar (a 0.2 m capsule, two 0.1 m prongs
    at its ends). Stages, from the object->goal direction ``u``: the bar end (where bar and
    prong meet) goes above a point behind the object on the goal line, comes down to the
    object's mid-height, then pushes: its target sits ``push_depth`` inside the object, so it
    follows the object onto the goal and holds it there. The bar stays horizontal and across
    ``u`` and the hand points up, out of the way.

    Why the bar end: Pusher-v5's contacts with the object are very soft (MuJoCo scales a
    contact's softness by the body's mass, 8e-6 kg for the object, while its slide joints carry
    0.04 kg armature and 0.5 damping), so the object moves at about 0.8 m/s per metre of
    penetration. The bar end touches the object with two capsules (bar and prong) at once,
    which doubles the push force: ~0.065 m/s instead of ~0.04 m/s, the difference between
    reaching the far objects (up to 0.36 m from the goal) within the 100 steps or not.
    """

    CORNER = 0.1          # bar end: 0.1 m along the hand's y axis from the observed fingertip
    REACH = 0.07          # bar radius 0.02 + object radius 0.05: touching distance from the centre

    def __init__(self, kp: float = 100.0, kd: float = 15.0, push_depth: float = 0.055,
                 push_height: float = -0.277, travel_height: float = -0.15, behind: float = 0.12,
                 line_tolerance: float = 0.03, ik_iterations: int = 15):
        import mujoco
        from gymnasium.envs.mujoco import pusher_v5

        self.mujoco = mujoco
        xml = os.path.join(os.path.dirname(pusher_v5.__file__), "assets", "pusher_v5.xml")
        self.model = mujoco.MjModel.from_xml_path(xml)
        self.data = mujoco.MjData(self.model)
        self.hand = self.model.body("tips_arm").id
        self.low = self.model.jnt_range[:7, 0] + 0.02
        self.high = self.model.jnt_range[:7, 1] - 0.02
        self.kp, self.kd, self.push_depth = kp, kd, push_depth
        self.push_height, self.travel_height, self.behind = push_height, travel_height, behind
        self.line_tolerance, self.ik_iterations = line_tolerance, ik_iterations
        self._jacp = np.zeros((3, self.model.nv))
        self._jacr = np.zeros((3, self.model.nv))
        self._mass = np.zeros((self.model.nv, self.model.nv))

    def _hand_pose(self, q):
        self.data.qpos[:7] = q
        self.mujoco.mj_kinematics(self.model, self.data)
        self.mujoco.mj_comPos(self.model, self.data)      # the Jacobians need it
        rot = self.data.xmat[self.hand].reshape(3, 3)
        return self.data.xpos[self.hand] + self.CORNER * rot[:, 1], rot

    def target(self, row: np.ndarray) -> np.ndarray:
        """Where the bar end should be now (x, y, z) for one observation row."""
        corner, _ = self._hand_pose(row[:7])
        obj, goal = row[17:19], row[20:22]
        u = goal - obj
        dist = float(np.linalg.norm(u))
        u = u / max(dist, 1e-6)
        rel = corner[:2] - obj
        along, across = rel @ u, abs(rel @ np.array([-u[1], u[0]]))
        if along < -0.01 and across < self.line_tolerance + 0.01 and corner[2] < -0.23:   # push
            return np.r_[obj - (self.REACH - self.push_depth) * u, self.push_height]
        if along < -0.05 and across < self.line_tolerance:                                # come down
            return np.r_[obj - (self.behind - 0.02) * u, self.push_height]
        return np.r_[obj - self.behind * u, self.travel_height]                           # go above, behind

    def _inverse_kinematics(self, q, target, across):
        """Damped least squares: bar end to target, bar along +-across, hand pointing up."""
        mj, up = self.mujoco, np.array([0.0, 0.0, 1.0])
        for _ in range(self.ik_iterations):
            corner, rot = self._hand_pose(q)
            bar = across if rot[:, 1] @ across >= 0 else -across
            mj.mj_jacBody(self.model, self.data, self._jacp, self._jacr, self.hand)
            jr = self._jacr[:, :7]
            offset = corner - self.data.xpos[self.hand]
            jp = self._jacp[:, :7] - _skew(offset) @ jr          # velocity of the bar end
            error = np.concatenate([target - corner, 0.3 * _skew(rot[:, 1]) @ bar, 0.1 * _skew(rot[:, 0]) @ up])
            jac = np.concatenate([jp, 0.3 * jr, 0.1 * jr])
            step = np.linalg.solve(jac.T @ jac + 1e-2 * np.eye(7), jac.T @ error)
            q = np.clip(q + step, self.low, self.high)
        return q

    def act_one(self, row: np.ndarray) -> np.ndarray:
        row = np.asarray(row, dtype=np.float64)
        q, qdot = row[:7], row[7:14]
        u = row[20:22] - row[17:19]
        u = u / max(float(np.linalg.norm(u)), 1e-6)
        q_goal = self._inverse_kinematics(q.copy(), self.target(row), np.array([-u[1], u[0], 0.0]))
        self.data.qpos[:7] = q
        self.mujoco.mj_forward(self.model, self.data)
        self.mujoco.mj_fullM(self.model, self.data, self._mass)
        torque = self._mass[:7, :7] @ (self.kp * (q_goal - q) - self.kd * qdot)
        return np.clip(torque, -2.0, 2.0)

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        obs = np.atleast_2d(np.asarray(obs, dtype=np.float64))
        return np.stack([self.act_one(row) for row in obs]).astype(np.float32)


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


EXPERTS = {"Reacher-v5": ReacherExpert, "Pusher-v5": PusherExpert}


def policy_spec(kind: str, env_id: str, seed: int = 0, weights: dict | None = None) -> dict:
    """A small, picklable description of a policy for actors to build."""
    if kind not in ("expert", "random", "mlp", "vision"):
        raise ValueError(f"unknown policy kind {kind!r} (allowed: expert, random, mlp, vision)")
    if kind == "expert" and env_id not in EXPERTS:
        raise ValueError(f"no scripted expert for {env_id!r} (have: {', '.join(EXPERTS)}); "
                         "collect with policy random or bring a dataset")
    if kind in ("mlp", "vision") and weights is None:
        raise ValueError(f"the {kind} policy needs weights (a trained checkpoint)")
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
    if kind == "vision":  # called with images={camera: frames} (see embodied.vision)
        from .vision import VisionPolicy

        return VisionPolicy(spec["weights"], device=device)
    return TorchPolicy(spec["weights"], device=device)
