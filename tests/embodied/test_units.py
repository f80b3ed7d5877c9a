"""Unit tests (no Ray): expert quality, LeRobot v3 writer, policy batching, config errors."""
from __future__ import annotations

import asyncio
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from embodied import config as config_mod
from embodied.dataset import (
    LeRobotWriter,
    read_episodes,
    read_first_episodes,
    read_frames,
    read_info,
    vectors,
)
from embodied.envs import env_facts, is_success, make_env
from embodied.policies import make_policy, policy_spec
from embodied.rollout import plot_trajectories, resolve_mode
from embodied.simulator import PolicyServer, Simulator
from pipelines.config import ConfigError


def play(policy, seeds):
    """Plain gymnasium loop: (returns, successes) of ``policy`` on Reacher-v5."""
    env = make_env("Reacher-v5")
    returns, successes = [], []
    for seed in seeds:
        obs, _ = env.reset(seed=seed)
        total, done = 0.0, False
        while not done:
            obs, reward, terminated, truncated, _ = env.step(policy(obs[None])[0])
            total += reward
            done = terminated or truncated
        returns.append(total)
        successes.append(bool(is_success("Reacher-v5", obs)[0]))
    return np.mean(returns), np.mean(successes)


def test_reacher_expert_solves_the_task_and_random_does_not():
    seeds = range(500, 520)
    expert_return, expert_success = play(make_policy(policy_spec("expert", "Reacher-v5")), seeds)
    random_return, random_success = play(make_policy(policy_spec("random", "Reacher-v5", seed=1)), seeds)
    assert expert_success >= 0.95
    assert random_success <= 0.2
    assert expert_return > -6.0 and random_return < -30.0


def test_mlp_policy_needs_weights_and_unknown_expert_is_an_error():
    with pytest.raises(ValueError, match="needs weights"):
        policy_spec("mlp", "Reacher-v5")
    with pytest.raises(ValueError, match="no scripted expert"):
        policy_spec("expert", "Ant-v5")


def fake_episode(eid, length=5, obs_dim=10, act_dim=2, reject=None):
    rng = np.random.default_rng(eid)
    return {"id": eid, "seed": 100 + eid, "length": length, "reject": reject, "return": -1.0 * eid,
            "success": eid % 2 == 0, "state": rng.normal(size=(length, obs_dim)).astype(np.float32),
            "action": rng.uniform(-1, 1, size=(length, act_dim)).astype(np.float32),
            "reward": rng.normal(size=length).astype(np.float32)}


def test_lerobot_writer_orders_episodes_and_writes_the_v3_layout(tmp_path):
    facts = env_facts("Reacher-v5")
    root = str(tmp_path / "episodes")
    writer = LeRobotWriter(root, "Reacher-v5", facts, "reach", expected=4, frames_per_file=7)
    episodes = {i: fake_episode(i, length=3 + i) for i in range(4)}
    episodes[2] = fake_episode(2, reject="non-finite state or reward")
    for i in (3, 1, 0, 2):  # out of order, as simulators deliver them
        writer.add(episodes[i])
    counts = writer.close()
    assert counts == {"episodes": 3, "frames": 3 + 4 + 6, "rejects": 1}
    assert writer.rejects[0]["id"] == "episode-2" and "non-finite" in writer.rejects[0]["reason"]

    for rel in ("data/chunk-000/file-000.parquet", "data/chunk-000/file-001.parquet",
                "meta/info.json", "meta/stats.json", "meta/tasks.parquet",
                "meta/episodes/chunk-000/file-000.parquet"):
        assert (tmp_path / "episodes" / rel).is_file(), rel
    frames = read_frames(root)
    assert frames.column_names == ["index", "episode_index", "frame_index", "timestamp", "observation.state",
                                   "action", "next.reward", "next.done", "task_index"]
    assert frames["index"].to_pylist() == list(range(13))
    assert frames["episode_index"].to_pylist() == [0] * 3 + [1] * 4 + [2] * 6  # contiguous, reject skipped
    assert frames["frame_index"].to_pylist() == [0, 1, 2, 0, 1, 2, 3, 0, 1, 2, 3, 4, 5]
    assert frames["next.done"].to_pylist().count(True) == 3
    # dataset episode 2 is source episode 3 (episode 2 was rejected)
    np.testing.assert_allclose(vectors(frames["action"])[7:], episodes[3]["action"])

    info = read_info(root)
    assert info["codebase_version"] == "v3.0" and info["total_episodes"] == 3 and info["total_frames"] == 13
    assert info["features"]["observation.state"]["shape"] == [10]
    assert info["fps"] == 50.0
    meta = read_episodes(root)
    assert meta["dataset_from_index"].to_pylist() == [0, 3, 7]
    assert meta["dataset_to_index"].to_pylist() == [3, 7, 13]
    assert meta["data/file_index"].to_pylist() == [0, 0, 1]
    assert meta["seed"].to_pylist() == [100, 101, 103]
    tasks = pq.read_table(tmp_path / "episodes" / "meta" / "tasks.parquet").to_pandas()
    assert tasks.loc["reach", "task_index"] == 0
    stats = json.loads((tmp_path / "episodes" / "meta" / "stats.json").read_text())
    all_actions = vectors(frames["action"])
    np.testing.assert_allclose(stats["action"]["mean"], all_actions.mean(0), rtol=1e-5)
    np.testing.assert_allclose(stats["action"]["std"], all_actions.std(0), rtol=1e-4)
    assert stats["action"]["count"] == [13]


PNG = b"\x89PNG\r\n\x1a\n"


def test_first_episodes_read_back_bounded_and_plotted(tmp_path):
    root = str(tmp_path / "episodes")
    writer = LeRobotWriter(root, "Reacher-v5", env_facts("Reacher-v5"), "reach", expected=5, frames_per_file=7)
    for i in range(5):
        writer.add(fake_episode(i, length=4 + i))  # 4+5 frames in file 0, 6+7 in 1, 8 in 2
    writer.close()
    frames = read_frames(root)
    (tmp_path / "episodes/data/chunk-000/file-002.parquet").write_bytes(b"not parquet")  # never opened
    first = read_first_episodes(root, 2, batch_rows=3)
    assert first["episode_index"].to_pylist() == [0] * 4 + [1] * 5
    np.testing.assert_array_equal(vectors(first["observation.state"]), vectors(frames["observation.state"])[:9])
    assert read_first_episodes(root, 3)["episode_index"].to_pylist() == [0] * 4 + [1] * 5 + [2] * 6

    out = str(tmp_path / "trajectories.png")
    assert plot_trajectories(root, out, "Reacher-v5") == out
    assert (tmp_path / "trajectories.png").read_bytes()[:8] == PNG


def test_trajectory_plot_of_a_dataset_without_frames(tmp_path):
    root = str(tmp_path / "episodes")
    writer = LeRobotWriter(root, "Reacher-v5", env_facts("Reacher-v5"), "reach", expected=1)
    writer.add(fake_episode(0, reject="non-finite state or reward"))
    writer.close()
    assert read_first_episodes(root, 3).num_rows == 0
    plot_trajectories(root, str(tmp_path / "t.png"), "Reacher-v5")
    assert (tmp_path / "t.png").read_bytes()[:8] == PNG


def test_lerobot_writer_refuses_duplicates_and_incomplete_datasets(tmp_path):
    facts = env_facts("Reacher-v5")
    writer = LeRobotWriter(str(tmp_path / "ds"), "Reacher-v5", facts, "reach", expected=3)
    writer.add(fake_episode(0))
    with pytest.raises(ValueError, match="twice"):
        writer.add(fake_episode(0))
    writer.add(fake_episode(2))
    with pytest.raises(RuntimeError, match="1 of 3 episodes never arrived"):
        writer.close()
    writer.abort()
    assert not (tmp_path / "ds").exists()
    assert list(tmp_path.iterdir()) == []


def test_simulator_returns_only_whole_episodes():
    sim = Simulator("Reacher-v5", num_envs=3, policy=policy_spec("expert", "Reacher-v5"))
    out = sim.advance([(0, 10), (1, 11), (2, 12), (3, 13)], steps=30)
    assert out["episodes"] == [] and out["env_steps"] == 90 and out["busy"] == 4
    ended = []
    while len(ended) < 4:
        ended += sim.advance([], steps=30)["episodes"]
    assert sorted(e["id"] for e in ended) == [0, 1, 2, 3]
    assert all(e["length"] == 50 and e["state"].shape == (50, 10) and e["success"] for e in ended)


def test_action_noise_records_the_executed_action_within_bounds_per_seed():
    expert = make_policy(policy_spec("expert", "Reacher-v5"))
    low, high = np.asarray(env_facts("Reacher-v5")["low"]), np.asarray(env_facts("Reacher-v5")["high"])

    def collect(noise):
        sim = Simulator("Reacher-v5", num_envs=2, policy=policy_spec("expert", "Reacher-v5"), action_noise=noise)
        return sorted(sim.advance([(0, 10), (1, 11), (2, 12)], steps=200)["episodes"], key=lambda e: e["id"])

    for e in collect(0.0):  # no noise: the expert's own actions
        np.testing.assert_allclose(e["action"], expert(e["state"]), atol=1e-6)
    noisy, again = collect(0.5), collect(0.5)
    for e, same in zip(noisy, again):
        np.testing.assert_array_equal(e["action"], same["action"])  # seeded per episode
        assert np.all(e["action"] >= low) and np.all(e["action"] <= high)
        assert np.abs(e["action"] - expert(e["state"])).mean() > 0.05
        env = make_env("Reacher-v5")  # replaying the recorded actions reproduces the recorded states
        obs, _ = env.reset(seed=e["seed"])
        for t, action in enumerate(e["action"]):
            np.testing.assert_allclose(obs, e["state"][t], atol=1e-5)
            obs, *_ = env.step(action)


def test_policy_server_batches_concurrent_requests():
    server = PolicyServer(policy_spec("expert", "Reacher-v5"), clients=3, batch_wait_ms=50)
    obs = np.zeros((4, 10), dtype=np.float32)
    obs[:, 0:2] = 1.0  # cos(q) = 1

    async def three_clients():
        return await asyncio.gather(*(server.act(obs[: n + 1]) for n in range(3)))

    actions = asyncio.run(three_clients())
    assert [len(a) for a in actions] == [1, 2, 3]
    assert server.stats() == {"batches": 1, "rows": 6, "mean_batch": 6.0}


def test_bad_config_is_one_line_naming_the_field():
    with pytest.raises(ConfigError, match=r"env\.id") as err:
        config_mod.load(None, ["env.id=CartPole-v1"])
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"simulator\.envs_per_actor"):
        config_mod.load(None, ["simulator.envs_per_actor=0"])


def test_auto_rollout_mode_batches_only_for_a_gpu_policy_actor():
    cpu = config_mod.load(None, [])
    gpu = config_mod.load(None, ["policy_server.num_gpus=0.5"])
    assert cpu.collect.mode == cpu.evaluate.mode == "auto"
    assert resolve_mode("auto", cpu) == "local"
    assert resolve_mode("auto", gpu) == "batched"
    assert resolve_mode("batched", cpu) == "batched" and resolve_mode("local", gpu) == "local"
    with pytest.raises(ValueError, match="unknown rollout mode 'remote'"):
        resolve_mode("remote", cpu)


def test_preflight_refuses_a_missing_expert_before_any_ray_work(capsys, monkeypatch):
    from embodied.policies import EXPERTS
    from embodied.template import TEMPLATE

    monkeypatch.delitem(EXPERTS, "Pusher-v5")   # both supported envs have an expert now
    assert TEMPLATE.main(["--set", "env.id=Pusher-v5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no scripted expert" in err[0]
    assert [s.name for s in TEMPLATE.steps] == ["collect", "train", "train_vision", "evaluate"]


@pytest.mark.gpu
def test_mlp_policy_runs_on_cuda_and_matches_cpu():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from embodied.policies import TorchPolicy, build_mlp, mlp_weights

    facts = env_facts("Reacher-v5")
    torch.manual_seed(0)
    weights = mlp_weights(build_mlp(10, 2, [64]), 10, 2, [64], facts["low"], facts["high"])
    obs = np.random.default_rng(0).normal(size=(32, 10)).astype(np.float32)
    gpu, cpu = TorchPolicy(weights), TorchPolicy(weights, device="cpu")
    assert gpu.device == "cuda"
    np.testing.assert_allclose(gpu(obs), cpu(obs), atol=1e-4)
