"""Datasets written by ``embodied`` read back by the ``lerobot`` package's own ``LeRobotDataset`` (its
v3.0 reader, decoded video frames included), in the separate virtualenv ``make test`` builds
(``.venv-lerobot``: lerobot's pins clash with ours; see ``tests/embodied/fixtures/README.md``).

One module fixture writes three datasets (Reacher-v5 state only; Reacher-v5 and Pusher-v5 with two
cameras each, collected by simulator actors on the session cluster) and reads all three in one
lerobot subprocess: its imports are most of its time."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import ray

from embodied import config as config_mod
from embodied.dataset import LeRobotWriter, read_episodes, read_frames, vectors
from embodied.envs import env_facts
from embodied.policies import policy_spec
from embodied.rollout import Rollout
from embodied.simulator import Simulator

REPO = Path(__file__).resolve().parents[2]
READER = Path(__file__).resolve().parent / "lerobot_reader" / "read_lerobot.py"
LEROBOT = "0.4.4"
COLUMNS = ("index", "episode_index", "frame_index", "timestamp")
MAX_MAE = 8.0  # of 255: lerobot's decoded frame vs the rendered one, mean absolute pixel error
SAME = 0.05  # MAE difference below which two rendered frames match a decoded one equally well
EPISODES = 3
ITEMS = [(0, 0), (1, 17), (2, 49)]  # (episode, frame): start of a video file, inside one, a later file
CAMERAS = {"Reacher-v5": ["top", "side"], "Pusher-v5": ["top", "front"]}
POLICY = {"Reacher-v5": "expert", "Pusher-v5": "random"}  # any policy: the frames are what matters


def lerobot_python() -> str:
    """The lerobot virtualenv's Python (``LEROBOT_PYTHON``, else ``.venv-lerobot``); a missing one fails."""
    path = Path(os.environ.get("LEROBOT_PYTHON") or ".venv-lerobot/bin/python")
    path = path if path.is_absolute() else REPO / path
    if not path.exists():
        pytest.fail(f"no lerobot virtualenv at {path}: build it with `make install-lerobot`", pytrace=False)
    return str(path)


def read_with_lerobot(tmp_path: Path, roots: list[str], items: list[tuple[int, int]]) -> list[dict]:
    """What lerobot's ``LeRobotDataset`` reads from each dataset root (one subprocess, offline):
    ``read_lerobot.py``'s arrays, ``meta`` parsed."""
    outs = [tmp_path / f"lerobot-{k}.npz" for k in range(len(roots))]
    pairs = [str(x) for root, out in zip(roots, outs) for x in (root, out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    run = subprocess.run([lerobot_python(), str(READER), "--items", ",".join(f"{e}:{i}" for e, i in items),
                          *pairs], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    read = []
    for out in outs:
        with np.load(out) as npz:
            arrays = {key: npz[key] for key in npz.files}
        arrays["meta"] = json.loads(str(arrays["meta"]))
        read.append(arrays)
    return read


def write_state_only(root: str) -> None:
    """Three Reacher-v5 expert episodes, stepped in this process, in two data files."""
    writer = LeRobotWriter(root, "Reacher-v5", env_facts("Reacher-v5"), "reach", expected=EPISODES,
                           frames_per_file=70)
    sim = Simulator("Reacher-v5", num_envs=EPISODES, policy=policy_spec("expert", "Reacher-v5"))
    for episode in sim.advance([(k, 40 + k) for k in range(EPISODES)], steps=50)["episodes"]:
        writer.add(episode)
    assert writer.close() == {"episodes": EPISODES, "frames": EPISODES * 50, "rejects": 0}


def collect_with_cameras(env_id: str, root: str) -> dict[int, dict]:
    """Episodes of ``env_id`` with its two cameras, collected by simulator actors and encoded by Ray
    tasks as ``python -m embodied`` does; returns what the simulators rendered, by episode index."""
    cfg = config_mod.load(None, [f"env.id={env_id}", "simulator.envs_per_actor=2",
                                 f"cameras.names=[{','.join(CAMERAS[env_id])}]", "cameras.encode_mb=3"])
    writer = LeRobotWriter(root, env_id, env_facts(env_id), cfg.env.task, expected=EPISODES,
                           cameras=cfg.cameras.model_dump())
    rendered = {}

    def sink(episode):  # the collect's sink (writer.add), keeping the rendered frames to compare
        rendered[episode["id"]] = ray.get(episode["frames"])[episode["id"]]
        writer.add(episode)

    rollout = Rollout(cfg, policy_spec(POLICY[env_id], env_id, seed=3), "local")
    try:
        rollout.run([(k, 70 + k) for k in range(EPISODES)], sink)
    finally:
        rollout.close()
    assert writer.close()["episodes"] == EPISODES
    seeds = {row["episode_index"]: row["seed"] for row in read_episodes(root).to_pylist()}
    return {index: rendered[seed - 70] for index, seed in seeds.items()}


@pytest.fixture(scope="module")
def datasets(ray_connected, tmp_path_factory):
    """``{name: (root, what lerobot read, rendered frames by episode or None)}``."""
    tmp = tmp_path_factory.mktemp("lerobot-reader")
    roots = {"state-only": str(tmp / "state-only")}
    write_state_only(roots["state-only"])
    rendered = {"state-only": None}
    for env_id in CAMERAS:
        roots[env_id] = str(tmp / env_id)
        rendered[env_id] = collect_with_cameras(env_id, roots[env_id])
    read = read_with_lerobot(tmp, list(roots.values()), ITEMS)
    return {name: (roots[name], lerobot, rendered[name]) for name, lerobot in zip(roots, read)}


def mae(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def assert_same_frames(lerobot: dict, root: str) -> None:
    """lerobot's frame columns equal the ones ``embodied`` wrote, value for value, and ``dataset[i]``
    returns frame ``i``'s row."""
    ours = read_frames(root)
    for column in ("observation.state", "action"):
        assert np.array_equal(lerobot[column], vectors(ours[column])), column
    for column in COLUMNS:
        assert np.array_equal(lerobot[column], ours[column].to_numpy()), column
    episodes = read_episodes(root).to_pylist()
    rows = [episodes[e]["dataset_from_index"] + i for e, i in ITEMS]
    assert lerobot["item/index"].tolist() == rows
    assert lerobot["item/episode_index"].tolist() == [e for e, _ in ITEMS]
    assert lerobot["item/frame_index"].tolist() == [i for _, i in ITEMS]
    for column in ("observation.state", "action", "timestamp"):
        assert np.array_equal(lerobot[f"item/{column}"], lerobot[column][rows]), column


def test_state_only_dataset_reads_back_with_lerobot(datasets):
    root, lerobot, _ = datasets["state-only"]
    meta = lerobot["meta"]
    assert (meta["lerobot"], meta["torch"], meta["num_episodes"], meta["num_frames"]) == \
        (LEROBOT, "2.13.0+cpu", EPISODES, EPISODES * 50)
    assert meta["fps"] == 50 and meta["robot_type"] == "Reacher-v5" and meta["camera_keys"] == []
    assert_same_frames(lerobot, root)


@pytest.mark.parametrize("env_id", list(CAMERAS))
def test_camera_dataset_decodes_with_lerobot_to_the_rendered_frames(datasets, env_id):
    root, lerobot, rendered = datasets[env_id]
    meta, facts = lerobot["meta"], env_facts(env_id)
    keys = [f"observation.images.{camera}" for camera in CAMERAS[env_id]]
    assert (meta["lerobot"], meta["video_backend"], meta["torchcodec"]) == (LEROBOT, "torchcodec", "0.13.0")
    assert meta["video_keys"] == meta["camera_keys"] == keys and meta["robot_type"] == env_id
    assert meta["num_episodes"] == EPISODES and meta["fps"] == facts["fps"]
    assert all(meta["features"][key] == {"dtype": "video", "shape": [96, 96, 3]} for key in keys)
    assert_same_frames(lerobot, root)
    assert np.allclose(lerobot["timestamp"], lerobot["frame_index"] / facts["fps"])
    files = [row[f"videos/{keys[0]}/file_index"] for row in read_episodes(root).to_pylist()]
    assert files[ITEMS[-1][0]] > files[ITEMS[0][0]], files  # the items span two MP4 files

    for key, camera in zip(keys, CAMERAS[env_id]):
        decoded = lerobot[f"item/{key}"]
        assert decoded.shape == (len(ITEMS), 96, 96, 3), decoded.shape
        for n, (e, i) in enumerate(ITEMS):
            own, other = rendered[e][camera][i], rendered[(e + 1) % EPISODES][camera][i]
            assert mae(decoded[n], own) <= MAX_MAE, (env_id, camera, e, i, mae(decoded[n], own))
            assert mae(decoded[n], own) < mae(decoded[n], other), (env_id, camera, e, i)
            # the right time too: no frame 3+ steps away matches better (a still scene ties)
            away = [mae(decoded[n], frame) for j, frame in enumerate(rendered[e][camera]) if abs(j - i) >= 3]
            assert mae(decoded[n], own) <= min(away) + SAME, (env_id, camera, e, i, mae(decoded[n], own), min(away))
