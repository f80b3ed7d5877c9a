"""The vision policy: the CNN learns from rendered frames; the Ray Data reader yields the frames the dataset
holds; collect with cameras -> train_vision -> evaluate end to end on the test cluster."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from embodied.policies import ReacherExpert, make_policy, policy_spec
from embodied.vision import build_cnn, from_units, to_units, train_epoch

os.environ.setdefault("MUJOCO_GL", "egl")


@pytest.fixture(scope="module")
def rendered_reacher():
    """12 expert episodes of Reacher-v5 seen by the ``top`` camera at 96x96: frames, states, actions."""
    from embodied.cameras import CameraRig
    from embodied.envs import make_env

    env = make_env("Reacher-v5")
    rig = CameraRig("Reacher-v5", env.unwrapped.model, ["top"], 96, 96)
    expert = ReacherExpert()
    images, states, actions = [], [], []
    try:
        for seed in range(12):
            obs, _ = env.reset(seed=seed)
            for _ in range(50):
                images.append(rig.render(env.unwrapped.data)["top"])
                states.append(obs.astype(np.float32))
                actions.append(expert(obs[None])[0])
                obs, *_ = env.step(actions[-1])
    finally:
        rig.close()
        env.close()
    return np.stack(images), np.stack(states), np.stack(actions)


def fit(images, states, targets, state_dim, epochs, low, high, seed=0):
    """Train a fresh CNN with the template's own epoch function; the loss of each epoch (bound units)."""
    import torch

    torch.manual_seed(seed)
    model = build_cnn(96, 96, state_dim, targets.shape[1], state_mean=states.mean(0), state_std=states.std(0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = {"image": torch.as_tensor(images), "state": torch.as_tensor(states), "action": torch.as_tensor(targets)}
    generator = torch.Generator().manual_seed(seed)
    history = []
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        batches = ({k: v[order[i:i + 64]] for k, v in data.items()} for i in range(0, len(images), 64))
        total = train_epoch(model, optimizer, batches, low, high)
        history.append(float(total[0] / total[1]))
    return model, history


@pytest.fixture
def one_thread():
    """Torch on one thread, as in a Ray Train worker of 1 CPU (a second thread spins on a busy machine)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_cnn_learns_actions_from_rendered_frames(rendered_reacher, one_thread):
    images, states, actions = rendered_reacher
    low, high = [-1.0, -1.0], [1.0, 1.0]
    units = to_units(actions, low, high)
    baseline = float(((units - units.mean(0)) ** 2).mean())  # always predicting the mean action
    # the template's policy (frames + state) on the expert's actions
    _, history = fit(images, states, actions, states.shape[1], 8, low, high)
    assert history[-1] < 0.3 * baseline, (history, baseline)
    # the frames alone: the direction of the arm's first link (cos, sin of joint 0) is only in the pixels here
    link = states[:, [0, 2]]
    link_baseline = float(((link - link.mean(0)) ** 2).mean())
    _, history = fit(images, states, link, 0, 8, low, high)
    assert history[-1] < 0.3 * link_baseline, (history, link_baseline)


def test_vision_policy_acts_within_bounds_and_needs_its_camera(rendered_reacher):
    from embodied.vision import arch_of, vision_weights

    images, states, _ = rendered_reacher
    model = build_cnn(96, 96, 10, 2, state_mean=states.mean(0), state_std=states.std(0))
    arch = {"camera": "top", "height": 96, "width": 96, "state_dim": 10, "act_dim": 2, "channels": [8, 16, 32, 32],
            "hidden": 256}
    weights = vision_weights(model, {**arch, "low": [-0.5, -1.0], "high": [0.5, 1.0]})
    assert arch_of(weights) == arch
    policy = make_policy(policy_spec("vision", "Reacher-v5", weights=weights), device="cpu")
    out = policy(states[:5], images={"top": images[:5]})
    assert out.shape == (5, 2) and out.dtype == np.float32
    assert np.all(out[:, 0] >= -0.5) and np.all(out[:, 0] <= 0.5)
    with pytest.raises(ValueError, match="needs frames of camera 'top'"):
        policy(states[:5])
    with pytest.raises(ValueError, match="trained on"):
        policy(states[:5], images={"top": images[:5, :48]})
    with pytest.raises(ValueError, match="needs weights"):
        policy_spec("vision", "Reacher-v5")
    np.testing.assert_allclose(from_units(to_units([[0.25, -1.0]], [-0.5, -1], [0.5, 1]), [-0.5, -1], [0.5, 1]),
                               [[0.25, -1.0]])




def test_train_vision_joins_the_run_with_cameras_and_checks_its_camera_before_ray(capsys):
    from embodied.config import load
    from embodied.template import TEMPLATE
    from embodied.vision import recorded_cameras, training_vision, vision_camera

    assert not training_vision(load())  # no cameras: state only, as before
    with_camera = load(None, ["cameras.names=[top, side]"])
    assert training_vision(with_camera) and vision_camera(with_camera) == "top"
    assert not training_vision(load(None, ["cameras.names=[top]", "vision.enabled=false"]))
    info = {"features": {"observation.images.side": {"dtype": "video"}, "observation.state": {"dtype": "float32"}}}
    assert recorded_cameras(info) == ["side"] and vision_camera(load(), info) == "side"
    assert TEMPLATE.main(["--set", "cameras.names=[top]", "--set", "vision.camera=side"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "vision.camera 'side' is not recorded" in err[0], err

@pytest.mark.gpu
def test_vision_policy_runs_on_cuda_and_matches_cpu(rendered_reacher):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from embodied.vision import vision_weights

    images, states, _ = rendered_reacher
    torch.manual_seed(0)
    arch = {"camera": "top", "height": 96, "width": 96, "state_dim": 10, "act_dim": 2, "channels": [8, 16, 32, 32],
            "hidden": 64}
    weights = vision_weights(build_cnn(96, 96, 10, 2, hidden=64), {**arch, "low": [-1, -1], "high": [1, 1]})
    gpu, cpu = make_policy(policy_spec("vision", "Reacher-v5", weights=weights)), make_policy(
        policy_spec("vision", "Reacher-v5", weights=weights), device="cpu")
    assert gpu.device == "cuda"
    frames = {"top": images[:32]}
    np.testing.assert_allclose(gpu(states[:32], images=frames), cpu(states[:32], images=frames), atol=1e-4)

@pytest.mark.slow
def test_collect_with_cameras_train_vision_evaluate(ray_connected, adbray_run_dir, capsys):
    """The all-in-one run with a camera: the Ray Data reader yields the frames the dataset holds, the vision
    policy is trained and rolled out beside bc, expert and random, and its learning curve is a report plot."""
    from embodied.dataset import read_frames, read_info, vectors
    from embodied.template import TEMPLATE
    from embodied.video import decode_episode_frames
    from embodied.vision import read_vision_dataset
    from pipelines.io import read_bytes, read_json

    overrides = [*TEMPLATE.test_overrides, "collect.episodes=8", "simulator.envs_per_actor=2",
                 "evaluate.episodes=4", "cameras.names=[top]", "vision.epochs=2", "vision.checkpoint_every=1"]
    code = TEMPLATE.main(["--run-dir", adbray_run_dir, *[a for o in overrides for a in ("--set", o)]])
    assert code == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["steps"] == ["collect", "train", "train_vision", "evaluate"]
    m = out["metrics"]
    for key in ("vision_return", "vision_success_rate", "vision_gap_closed", "vision_train_loss",
                "vision_baseline_loss"):
        assert np.isfinite(m[key]), (key, m)
    assert m["vision_train_epochs"] == 2 and m["vision_train_frames"] == 8 * 50
    report = read_json(out["outputs"]["evaluation"])
    assert report["policies"]["vision"]["episodes"] == 4
    assert report["policies"]["vision"]["return"] == m["vision_return"]
    history = read_json(f"{out['outputs']['vision_policy']}/metrics.json")["loss_history"]
    assert len(history) == 2 and history[-1] == m["vision_train_loss"]
    assert read_bytes(out["outputs"]["plot_loss_vision"])[:8] == b"\x89PNG\r\n\x1a\n"

    # the Ray Data reader yields exactly the frames the dataset holds (by global frame index)
    episodes = out["outputs"]["episodes"]
    rows = sorted(read_vision_dataset(episodes, "top").take_all(), key=lambda r: r["index"])
    frames = read_frames(episodes, columns=["index", "episode_index", "observation.state", "action"])
    assert len(rows) == frames.num_rows == read_info(episodes)["total_frames"]
    assert [r["index"] for r in rows] == frames["index"].to_pylist()
    np.testing.assert_array_equal(np.stack([r["state"] for r in rows]), vectors(frames["observation.state"]))
    np.testing.assert_array_equal(np.stack([r["action"] for r in rows]), vectors(frames["action"]))
    images = np.stack([r["image"] for r in rows])
    assert images.shape == (8 * 50, 96, 96, 3) and images.dtype == np.uint8
    for episode in (0, 7):
        np.testing.assert_array_equal(images[episode * 50:(episode + 1) * 50],
                                      decode_episode_frames(episodes, episode, "top"))
