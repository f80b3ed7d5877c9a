"""Datasets written by ``embodied`` read back by the ``lerobot`` package's own ``LeRobotDataset`` (its
v3.0 reader, decoded video frames included), in the separate virtualenv ``make test`` builds
(``.venv-lerobot``: lerobot's pins clash with ours; see ``tests/embodied/fixtures/README.md``)."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from embodied.dataset import LeRobotWriter, read_frames, vectors
from embodied.envs import env_facts
from embodied.policies import policy_spec
from embodied.simulator import Simulator

REPO = Path(__file__).resolve().parents[2]
READER = Path(__file__).resolve().parent / "lerobot_reader" / "read_lerobot.py"
LEROBOT = "0.4.4"
COLUMNS = ("index", "episode_index", "frame_index", "timestamp")


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


def assert_same_frames(lerobot: dict, root: str) -> None:
    """lerobot's frame columns equal the ones ``embodied`` wrote, value for value."""
    ours = read_frames(root)
    for column in ("observation.state", "action"):
        assert np.array_equal(lerobot[column], vectors(ours[column])), column
    for column in COLUMNS:
        assert np.array_equal(lerobot[column], ours[column].to_numpy()), column


def test_state_only_dataset_reads_back_with_lerobot(tmp_path):
    facts = env_facts("Reacher-v5")
    root = str(tmp_path / "episodes")
    writer = LeRobotWriter(root, "Reacher-v5", facts, "reach", expected=3, frames_per_file=70)
    sim = Simulator("Reacher-v5", num_envs=3, policy=policy_spec("expert", "Reacher-v5"))
    for episode in sim.advance([(0, 40), (1, 41), (2, 42)], steps=50)["episodes"]:
        writer.add(episode)
    assert writer.close() == {"episodes": 3, "frames": 150, "rejects": 0}

    (read,) = read_with_lerobot(tmp_path, [root], [(0, 0), (2, 49)])
    meta = read["meta"]
    assert (meta["lerobot"], meta["torch"], meta["num_episodes"], meta["num_frames"]) == \
        (LEROBOT, "2.13.0+cpu", 3, 150)
    assert meta["fps"] == 50 and meta["robot_type"] == "Reacher-v5" and meta["camera_keys"] == []
    assert_same_frames(read, root)
    assert read["item/frame_index"].tolist() == [0, 49] and read["item/episode_index"].tolist() == [0, 2]
    assert np.array_equal(read["item/observation.state"], read["observation.state"][[0, 149]])
