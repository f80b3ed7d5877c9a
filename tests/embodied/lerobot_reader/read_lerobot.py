"""Read a LeRobot v3 dataset with the ``lerobot`` package's own ``LeRobotDataset`` and dump what it
returns to an ``.npz``, for tests that compare it with what ``embodied`` wrote.

Runs in the separate virtualenv ``make`` builds (``.venv-lerobot``: lerobot 0.4.4 with ``--no-deps``,
torch 2.13.0+cpu, torchcodec 0.13.0 for video; see ``tests/embodied/fixtures/README.md``), offline::

    HF_HUB_OFFLINE=1 .venv-lerobot/bin/python tests/embodied/lerobot_reader/read_lerobot.py \
        --items 0:0,0:17,3:49 ROOT OUT.npz [ROOT OUT.npz ...]

Without datasets it only imports lerobot's reader and the video decoder and prints their versions:
``make`` runs it so to check the venv and to write the bytecode of exactly what the reads import.

For each dataset (several per run: the imports take most of the time) it writes: ``meta`` (JSON: versions, episode/frame counts, fps, features, camera keys), the frame columns
as lerobot's ``hf_dataset`` holds them (``index``, ``episode_index``, ``frame_index``, ``timestamp``,
``observation.state``, ``action``), and for each ``episode:frame`` item what ``dataset[i]`` returns:
``item/<column>`` and ``item/<camera key>`` (uint8 ``(N, H, W, 3)``, lerobot's float CHW frames x 255).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from importlib.metadata import version
from pathlib import Path

import numpy as np

COLUMNS = ("index", "episode_index", "frame_index", "timestamp", "observation.state", "action")


def parse_items(text: str) -> list[tuple[int, int]]:
    """``"0:0,3:49"`` -> ``[(0, 0), (3, 49)]`` (episode, frame in episode)."""
    if not text:
        return []
    return [tuple(int(x) for x in part.split(":")) for part in text.split(",")]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("datasets", nargs="*", metavar="ROOT OUT", help="dataset folder, .npz to write, ...; "
                        "none: import and print the versions only")
    parser.add_argument("--items", default="", help="episode:frame pairs, comma-separated (every dataset)")
    parser.add_argument("--repo-id", default="adbray/local", help="any name: the data is read from ROOT")
    args = parser.parse_args(argv)
    if len(args.datasets) % 2:
        parser.error("give ROOT OUT pairs")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import torchvision_stand_in

    stand_in = torchvision_stand_in.install()
    import torch
    import torchcodec.decoders  # noqa: F401 - lerobot imports it at the first video read
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    if not args.datasets:
        print(f"lerobot {version('lerobot')}, torch {torch.__version__}, torchcodec {version('torchcodec')}, "
              f"torchvision {'stand-in' if stand_in else version('torchvision')}")
        return
    items = parse_items(args.items)
    for root, out in zip(args.datasets[::2], args.datasets[1::2]):
        ds = LeRobotDataset(args.repo_id, root=root)
        np.savez(out, **dump(ds, items, "stand-in" if stand_in else version("torchvision")))
        print(f"read {root} with lerobot {version('lerobot')}: {ds.num_episodes} episodes, "
              f"{ds.num_frames} frames, {len(items)} items")


def dump(ds, items: list[tuple[int, int]], torchvision: str) -> dict:
    """What ``ds`` (a ``LeRobotDataset``) holds and returns, as arrays for an ``.npz``."""
    import torch
    from lerobot.datasets.video_utils import get_safe_default_codec

    backend = ds.video_backend or get_safe_default_codec()
    meta = {"lerobot": version("lerobot"), "torch": torch.__version__,
            "torchcodec": version("torchcodec") if backend == "torchcodec" else None,
            "torchvision": torchvision, "video_backend": backend,
            "num_episodes": ds.num_episodes, "num_frames": ds.num_frames, "fps": ds.fps,
            "camera_keys": list(ds.meta.camera_keys), "video_keys": list(ds.meta.video_keys),
            "features": {k: {"dtype": v["dtype"], "shape": list(v["shape"])} for k, v in ds.features.items()},
            "robot_type": ds.meta.robot_type}
    out = {"meta": np.array(json.dumps(meta))}
    frames = ds.hf_dataset.with_format("numpy")
    for column in COLUMNS:
        out[column] = np.asarray(frames[column])

    starts = ds.meta.episodes["dataset_from_index"]
    got: dict[str, list] = {}
    for episode, frame in items:
        item = ds[int(starts[episode]) + frame]
        for key, value in item.items():
            if key in ds.meta.camera_keys:  # float (C, H, W) in [0, 1] -> uint8 (H, W, C)
                value = (value.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            elif isinstance(value, torch.Tensor):
                value = value.numpy()
            else:
                continue  # task strings
            got.setdefault(key, []).append(value)
    out.update({f"item/{key}": np.stack(values) for key, values in got.items()})
    return out


if __name__ == "__main__":
    main()
