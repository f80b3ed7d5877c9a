"""Pusher-v5's scripted expert (no Ray): success on held-out seeds inside a Simulator, batched as in the actors."""
from __future__ import annotations

import numpy as np

from embodied.envs import SUCCESS_DISTANCE, goal_distance, is_success, make_env
from embodied.policies import PusherExpert, policy_spec
from embodied.simulator import Simulator

# Seeds never used to tune the expert (tuned on 0-19, 1000-1099, 2000-2099). The run is
# deterministic, so the bound is exact for these 80 episodes, not a sample that may flake.
HELD_OUT = [(i, 5000 + i) for i in range(80)]


def play(kind: str) -> tuple[float, float]:
    """(success rate, mean return) of a policy spec run by a Simulator on the held-out seeds."""
    sim = Simulator("Pusher-v5", num_envs=16, policy=policy_spec(kind, "Pusher-v5", seed=1), record=False)
    ended = sim.advance(HELD_OUT, steps=100)["episodes"]
    while len(ended) < len(HELD_OUT):
        ended += sim.advance([], steps=100)["episodes"]
    assert all(e["reject"] is None and e["length"] == 100 for e in ended)
    return np.mean([e["success"] for e in ended]), np.mean([e["return"] for e in ended])


def test_pusher_expert_pushes_the_object_onto_the_goal_and_random_does_not():
    expert_success, expert_return = play("expert")
    random_success, random_return = play("random")
    print(f"Pusher-v5 on {len(HELD_OUT)} held-out seeds: expert success {expert_success:.3f} "
          f"return {expert_return:.1f}; random success {random_success:.3f} return {random_return:.1f}")
    assert expert_success >= 0.8
    assert random_success <= 0.05
    assert expert_return > -80.0 and random_return < -120.0


def test_pusher_success_is_the_goal_disc_and_the_rewards_distance():
    env = make_env("Pusher-v5")
    model = env.unwrapped.model
    goal_disc_radius = model.geom_size[model.body("goal").geomadr[0]][0]
    assert SUCCESS_DISTANCE["Pusher-v5"] == goal_disc_radius == 0.08
    obs, _ = env.reset(seed=7)
    expert = PusherExpert()
    for _ in range(20):
        obs, _, _, _, info = env.step(expert(obs[None])[0])
        # the success test measures what the reward's distance term measures
        assert np.isclose(goal_distance("Pusher-v5", obs)[0], -info["reward_dist"])
    # the object's centre is 0.048 m above the goal's: within 0.08 m means within 0.064 m across the table
    far = obs.copy()
    far[17:19] = far[20:22] + [0.066, 0.0]
    near = far.copy()
    near[17:19] = far[20:22] + [0.0, -0.062]
    assert is_success("Pusher-v5", np.stack([far, near])).tolist() == [False, True]
    env.close()


def test_pusher_expert_batch_equals_row_by_row():
    env = make_env("Pusher-v5")
    rows = np.stack([env.reset(seed=s)[0] for s in range(5)]).astype(np.float32)
    expert = PusherExpert()
    batch = expert(rows)
    assert batch.shape == (5, 7) and batch.dtype == np.float32 and np.all(np.abs(batch) <= 2.0)
    assert np.allclose(batch, np.concatenate([expert(r[None]) for r in rows]))
    env.close()
