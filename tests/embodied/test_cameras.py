"""Cameras: MuJoCo offscreen frames in the simulator actors -> MP4 (Ray tasks) in the LeRobot v3 layout."""
from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray

from embodied import config as config_mod
from embodied.dataset import LeRobotWriter, read_episodes, read_info
from embodied.envs import env_facts
from embodied.policies import policy_spec
from embodied.rollout import Rollout
from embodied.video import decode_episode_frames, decode_frames, encode_frames

MAX_MAE = 8.0  # of 255: decoded vs rendered, mean absolute pixel error


def mae(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def test_unknown_camera_is_a_one_line_config_error():
    with pytest.raises(ValueError, match=r"cameras.names: no camera 'front' for Reacher-v5 \(have: top, side\)"):
        config_mod.load(None, ["cameras.names=[front]"])
    assert config_mod.load(None, ["env.id=Pusher-v5", "cameras.names=[front,top]"]).cameras.width == 96


def test_encoded_episodes_decode_back_by_timestamp():
    frames = np.zeros((90, 32, 48, 3), dtype=np.uint8)
    for k, frame in enumerate(frames):  # each frame its own grey level and a square moving right
        frame[:] = (2 * k, 40, 200 - 2 * k)
        frame[10:20, k % 38:k % 38 + 10] = 255
    mp4 = encode_frames(frames, fps=20)
    whole = decode_frames(io.BytesIO(mp4))
    middle = decode_frames(io.BytesIO(mp4), 30 / 20, 70 / 20)  # an episode stored from frame 30 to 70
    assert whole.shape == frames.shape and middle.shape == (40, 32, 48, 3)
    assert mae(middle, frames[30:70]) < mae(middle, frames[31:71])  # the right frames, not neighbours
    with pytest.raises(ValueError, match="uint8"):
        encode_frames(frames.astype(np.float32), fps=20)


def test_rollout_with_cameras_writes_lerobot_video_that_decodes_to_the_rendered_frames(ray_connected, tmp_path):
    cameras = ["top", "side"]
    cfg = config_mod.load(None, ["simulator.envs_per_actor=2", f"cameras.names=[{','.join(cameras)}]",
                                 "cameras.encode_mb=6"])  # 6 MB: three 2x96x96 episodes per MP4 file
    episodes = 6
    facts = env_facts(cfg.env.id)
    root = str(tmp_path / "episodes")
    writer = LeRobotWriter(root, cfg.env.id, facts, cfg.env.task, expected=episodes,
                           cameras=cfg.cameras.model_dump())
    rendered = {}

    def sink(ep):  # the collect's sink (writer.add), keeping what the simulators rendered to compare
        rendered[ep["id"]] = ray.get(ep["frames"])[ep["id"]]
        writer.add(ep)

    rollout = Rollout(cfg, policy_spec("expert", cfg.env.id), "batched")
    try:
        rollout.run([(k, 300 + k) for k in range(episodes)], sink)
    finally:
        rollout.close()
    counts = writer.close()
    assert counts == {"episodes": episodes, "frames": episodes * 50, "rejects": 0}

    info = read_info(root)
    assert info["video_path"] == "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
    for camera in cameras:
        feature = info["features"][f"observation.images.{camera}"]
        assert feature["dtype"] == "video" and feature["shape"] == [96, 96, 3]
        assert feature["names"] == ["height", "width", "channels"]
        assert feature["info"] == {"video.height": 96, "video.width": 96, "video.codec": "h264",
                                   "video.pix_fmt": "yuv420p", "video.is_depth_map": False, "video.fps": 50,
                                   "video.channels": 3, "has_audio": False}
    stats = json.loads((tmp_path / "episodes" / "meta" / "stats.json").read_text())
    assert np.array(stats["observation.images.top"]["mean"]).shape == (3, 1, 1)
    assert stats["observation.images.top"]["count"] == [episodes * 50]

    rows = read_episodes(root).to_pylist()
    key = "videos/observation.images.top"
    assert [(r[f"{key}/file_index"], r[f"{key}/from_timestamp"], r[f"{key}/to_timestamp"]) for r in rows] == \
        [(0, 0.0, 1.0), (0, 1.0, 2.0), (0, 2.0, 3.0), (1, 0.0, 1.0), (1, 1.0, 2.0), (1, 2.0, 3.0)]
    assert np.array(rows[0]["stats/observation.images.top/mean"]).shape == (3, 1, 1)
    mp4 = tmp_path / "episodes" / "videos" / "observation.images.side" / "chunk-000" / "file-001.mp4"
    assert mp4.is_file() and len(decode_frames(str(mp4))) == 150
    # the data parquet carries no image columns: frames live in the videos only
    assert not any(c.startswith("observation.images") for c in
                   pq.read_schema(tmp_path / "episodes" / "data" / "chunk-000" / "file-000.parquet").names)

    # episode e's decoded frames are the frames the simulator rendered for episode e
    seeds = {r["episode_index"]: r["seed"] for r in rows}
    for e in (0, 4):
        own = rendered[seeds[e] - 300]
        other = rendered[seeds[(e + 1) % episodes] - 300]
        for camera in cameras:
            decoded = decode_episode_frames(root, e, camera)
            assert decoded.shape == own[camera].shape == (50, 96, 96, 3) and decoded.dtype == np.uint8
            errors = [mae(decoded[i], own[camera][i]) for i in range(50)]
            assert max(errors) <= MAX_MAE, (e, camera, max(errors))
            assert mae(decoded, own[camera]) < mae(decoded, other[camera])
    assert not np.array_equal(rendered[0]["top"][0], rendered[0]["side"][0])  # two distinct views
    row = rows[4]
    assert np.array_equal(decode_episode_frames(root, row, "observation.images.side"),
                          decode_episode_frames(root, 4, "side"))
