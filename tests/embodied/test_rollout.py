"""Rollouts on the shared test cluster: batching across simulators, local mode, crash safety."""
from __future__ import annotations

import json
import os
import signal

import numpy as np
import ray

from embodied import config as config_mod
from embodied.dataset import read_episodes, read_frames, read_info, vectors
from embodied.envs import make_env
from embodied.policies import policy_spec
from embodied.rollout import Rollout, collect
from embodied.template import TEMPLATE
from pipelines.io import join, list_files, read_table

EPISODE_STEPS = 50  # Reacher-v5


def test_policy_actor_batches_across_simulators(ray_connected):
    cfg = config_mod.load(None, ["simulator.envs_per_actor=4", "simulator.steps_per_call=25",
                                 "policy_server.batch_wait_ms=500"])
    rollout = Rollout(cfg, policy_spec("expert", "Reacher-v5"), "batched", record=False)
    try:
        # wait until every actor is up (a condition, not a sleep): on a loaded box one simulator can start
        # seconds after the other, and the 500 ms window would then see it alone for reasons unrelated
        # to batching
        assert len(set(rollout.simulator_pids())) == cfg.simulator.max_actors == 2
        rollout.policy_device()  # returns once the policy actor is up
        ended = []
        stats = rollout.run([(k, 7000 + k) for k in range(16)], ended.append)
        server = ray.get(rollout.server.stats.remote())
    finally:
        rollout.close()
    assert sorted(e["id"] for e in ended) == list(range(16))
    assert stats["env_steps"] == 16 * EPISODE_STEPS
    assert server["rows"] == 16 * EPISODE_STEPS
    # both simulators' observations go through one forward pass (4 envs each)
    assert server["mean_batch"] > 1.5 * cfg.simulator.envs_per_actor
    assert np.mean([e["success"] for e in ended]) >= 0.9


def test_rollout_entry_point_local_mode_writes_a_lerobot_dataset(ray_connected, adbray_run_dir, capsys):
    code = TEMPLATE.main(["collect", "--run-dir", adbray_run_dir, "--set", "collect.mode=local",
                          "--set", "collect.episodes=12", "--set", "simulator.envs_per_actor=3"])
    assert code == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["template"] == "embodied" and out["step"] == "collect" and out["rejects"] == 0
    assert out["metrics"]["episodes"] == 12 and out["metrics"]["steps"] == 12 * EPISODE_STEPS
    assert out["rows"] == 12 * EPISODE_STEPS and out["steps"] == ["collect"]
    assert out["metrics"]["collect_success_rate"] >= 0.9
    frames = read_frames(out["outputs"]["episodes"])
    assert frames.num_rows == 12 * EPISODE_STEPS
    assert read_info(out["outputs"]["episodes"])["total_episodes"] == 12
    assert out["outputs"]["rejects"] == join(adbray_run_dir, "rejects")
    assert list_files(out["outputs"]["rejects"]) == [join(adbray_run_dir, "rejects", "part-0.parquet")]
    assert read_table(out["outputs"]["rejects"]).num_rows == 0


def test_killed_simulator_leaves_no_partial_episode_and_exact_count(ray_connected, adbray_run_dir):
    episodes = 40
    cfg = config_mod.load(None, [f"collect.episodes={episodes}", "simulator.envs_per_actor=4",
                                 "simulator.steps_per_call=10", "simulator.queue_per_env=1"])
    killed = []

    def kill_simulator_zero(rollout, done):
        if not killed:
            pid = rollout.simulator_pids()[0]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    metrics = collect(cfg, adbray_run_dir, on_progress=kill_simulator_zero)
    assert killed, "the rollout never reported progress"
    assert metrics["simulator_restarts"] == 1
    assert metrics["rerun_episodes"] > 0  # the dead actor held unfinished episodes
    assert metrics["episodes"] == episodes and metrics["steps"] == episodes * EPISODE_STEPS

    root = join(adbray_run_dir, "episodes")
    frames = read_frames(root)
    index = np.asarray(frames["episode_index"])
    assert sorted(set(index.tolist())) == list(range(episodes))  # contiguous, none missing
    assert np.all(np.bincount(index) == EPISODE_STEPS)  # every episode whole
    frame_index = np.asarray(frames["frame_index"]).reshape(episodes, EPISODE_STEPS)
    assert np.all(frame_index == np.arange(EPISODE_STEPS))
    done = np.asarray(frames["next.done"]).reshape(episodes, EPISODE_STEPS)
    assert done[:, -1].all() and not done[:, :-1].any()
    meta = read_episodes(root)
    assert meta["seed"].to_pylist() == [cfg.collect.seed + k for k in range(episodes)]  # each once, in order
    # every episode starts from its seed's reset state: re-run episodes restarted from scratch
    states = vectors(frames["observation.state"]).reshape(episodes, EPISODE_STEPS, -1)
    env = make_env("Reacher-v5")
    for k in range(episodes):
        first, _ = env.reset(seed=cfg.collect.seed + k)
        np.testing.assert_allclose(states[k, 0], first, rtol=1e-5, atol=1e-6)
