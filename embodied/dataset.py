"""Episodes in the LeRobot v3 dataset layout, written as episodes arrive.

    <root>/data/chunk-000/file-000.parquet     frames: index, episode_index, frame_index, timestamp,
                                               observation.state, action, next.reward, next.done, task_index
    <root>/meta/info.json                      codebase_version v3.0, fps, features, path templates
    <root>/meta/stats.json                     min/max/mean/std/count per numeric feature
    <root>/meta/tasks.parquet                  task (index) -> task_index
    <root>/meta/episodes/chunk-000/file-000.parquet   one row per episode: length, offsets, files, stats
    <root>/videos/observation.images.<camera>/chunk-000/file-000.mp4   with cameras: H.264, episodes
                                               back to back (see :mod:`embodied.video`)

Episodes arrive out of order from the simulators; the writer keeps them in
assignment order, so ``episode_index`` is contiguous from 0 and rejected
episodes (non-finite physics) go to ``rejects`` instead. The writer runs in the driver
(which receives the ended episodes); the root is a local path or an ``oss://``/``s3://``
URI, every file going through :func:`pipelines.io.filesystem_for`. A local dataset is
written beside its final folder and swapped in at the end: it is complete or absent. An
object-store dataset (no rename there) replaces the old one in place and is deleted when
the collect fails.

With cameras, each episode arrives with a reference to its rendered frames (a simulator's
return value in the object store); Ray tasks encode runs of episodes to MP4
(:class:`embodied.video.VideoFiles`) and the driver writes only the compressed files.
"""
from __future__ import annotations

import json
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.io import filesystem_for, join, list_files, read_json, read_table, reject

CODEBASE_VERSION = "v3.0"
CHUNKS_SIZE = 1000
DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
EPISODES_PATH = "meta/episodes/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
STAT_FEATURES = ("observation.state", "action", "next.reward")
VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
IMAGE_PREFIX = "observation.images."


def feature_key(camera: str) -> str:
    """The dataset feature of a camera (LeRobot's naming)."""
    return f"{IMAGE_PREFIX}{camera}"


def _vector(values: np.ndarray) -> pa.Array:
    values = np.asarray(values, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])


def _stats(values: np.ndarray) -> dict:
    values = np.asarray(values, dtype=np.float64).reshape(len(values), -1)
    return {"min": values.min(0), "max": values.max(0), "mean": values.mean(0), "std": values.std(0),
            "count": np.array([len(values)])}


class RunningStats:
    """Min/max/mean/std/count of a feature over many episodes (parallel-variance merge)."""

    def __init__(self):
        self.n, self.mean, self.m2, self.min, self.max = 0, None, None, None, None

    def update(self, values: np.ndarray) -> None:
        x = np.asarray(values, dtype=np.float64).reshape(len(values), -1)
        self.merge(len(x), x.mean(0), x.std(0), x.min(0), x.max(0))

    def merge(self, n_b: int, mean_b, std_b, min_b, max_b) -> None:
        """Add a batch given by its statistics (count, mean, std, min, max per element)."""
        mean_b, min_b, max_b = (np.asarray(v, dtype=np.float64).reshape(-1) for v in (mean_b, min_b, max_b))
        m2_b = np.asarray(std_b, dtype=np.float64).reshape(-1) ** 2 * n_b
        if self.n == 0:
            self.n, self.mean, self.m2, self.min, self.max = n_b, mean_b, m2_b, min_b, max_b
            return
        n = self.n + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * n_b / n
        self.m2 = self.m2 + m2_b + delta ** 2 * self.n * n_b / n
        self.n = n
        self.min, self.max = np.minimum(self.min, min_b), np.maximum(self.max, max_b)

    def as_json(self, shape=None) -> dict:
        """The statistics as JSON lists (each reshaped to ``shape``: images use ``(3, 1, 1)``)."""
        if self.n == 0:
            return {}
        stats = {"min": self.min, "max": self.max, "mean": self.mean, "std": np.sqrt(self.m2 / self.n)}
        out = {k: (v.reshape(shape) if shape else v).tolist() for k, v in stats.items()}
        return {**out, "count": [int(self.n)]}


class LeRobotWriter:
    """Write episodes ``0..expected-1`` (by assignment id) into a LeRobot v3 dataset."""

    def __init__(self, root: str, env_id: str, facts: dict, task: str, expected: int,
                 frames_per_file: int = 200_000, cameras: dict | None = None):
        """``cameras``: the ``cameras`` config section as a dict; with names, every episode must carry
        ``frames`` (a reference to ``{episode id: {camera: uint8 (T, H, W, 3)}}``)."""
        self.root, self.env_id, self.facts, self.task = root, env_id, facts, task
        self.expected, self.frames_per_file = expected, frames_per_file
        self.fs, final = filesystem_for(root)
        self.local = isinstance(self.fs, pafs.LocalFileSystem)
        self.final = final
        self.path = f"{final}.partial-{uuid.uuid4().hex[:8]}" if self.local else final
        if not self.local:
            self._delete(final)
        self.fs.create_dir(self.path)
        self.waiting: dict[int, dict] = {}
        self.next_id = 0
        self.frames = 0
        self.episodes: list[dict] = []
        self.rejects: list[dict] = []
        self.buffer: list[pa.Table] = []
        self.buffer_frames = 0
        self.file_number = 0
        self.stats = {name: RunningStats() for name in STAT_FEATURES}
        self.cameras = cameras if cameras and cameras.get("names") else None
        self.videos = None
        if self.cameras:
            from .video import VideoFiles

            self.videos = VideoFiles(self.cameras, facts["fps"], CHUNKS_SIZE, self._write_bytes)
            self.stats.update({feature_key(c): RunningStats() for c in self.cameras["names"]})

    # ------------------------------------------------------------ episodes in
    def add(self, episode: dict) -> None:
        """Accept one finished episode (any order); write it once all earlier ids are in."""
        eid = int(episode["id"])
        if eid < self.next_id or eid in self.waiting or eid >= self.expected:
            raise ValueError(f"episode id {eid} delivered twice or out of range 0..{self.expected - 1}")
        self.waiting[eid] = episode
        while self.next_id in self.waiting:
            self._append(self.waiting.pop(self.next_id))
            self.next_id += 1

    def _append(self, ep: dict) -> None:
        if ep.get("reject"):
            self.rejects.append(reject(f"episode-{ep['id']}", "collect", ep["reject"], seed=ep["seed"]))
            return
        length = int(ep["length"])
        index = len(self.episodes)
        fps = self.facts["fps"]
        done = np.zeros(length, dtype=bool)
        done[-1] = True
        table = pa.table({
            "index": pa.array(np.arange(self.frames, self.frames + length, dtype=np.int64)),
            "episode_index": pa.array(np.full(length, index, dtype=np.int64)),
            "frame_index": pa.array(np.arange(length, dtype=np.int64)),
            "timestamp": pa.array((np.arange(length) / fps).astype(np.float32)),
            "observation.state": _vector(ep["state"]),
            "action": _vector(ep["action"]),
            "next.reward": pa.array(np.asarray(ep["reward"], dtype=np.float32)),
            "next.done": pa.array(done),
            "task_index": pa.array(np.zeros(length, dtype=np.int64)),
        })
        chunk, file = divmod(self.file_number, CHUNKS_SIZE)
        meta = {"episode_index": index, "tasks": [self.task], "length": length,
                "data/chunk_index": chunk, "data/file_index": file,
                "dataset_from_index": self.frames, "dataset_to_index": self.frames + length,
                "meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0,
                "seed": int(ep["seed"]), "return": float(ep["return"]), "success": bool(ep["success"])}
        for name, values in (("observation.state", ep["state"]), ("action", ep["action"]),
                             ("next.reward", ep["reward"])):
            self.stats[name].update(values)
            for stat, value in _stats(values).items():
                meta[f"stats/{name}/{stat}"] = value.tolist()
        if self.videos is not None:
            if ep.get("frames") is None:
                raise ValueError(f"episode {ep['id']} came without camera frames (cameras: "
                                 f"{', '.join(self.cameras['names'])})")
            meta.update(self.videos.add(index, int(ep["id"]), length, ep["frames"]))
        self.episodes.append(meta)
        self.buffer.append(table)
        self.frames += length
        self.buffer_frames += length
        if self.buffer_frames >= self.frames_per_file:
            self._flush()

    def _flush(self) -> None:
        if not self.buffer:
            return
        chunk, file = divmod(self.file_number, CHUNKS_SIZE)
        self._write(pa.concat_tables(self.buffer), DATA_PATH.format(chunk_index=chunk, file_index=file))
        self.buffer, self.buffer_frames = [], 0
        self.file_number += 1

    def _write(self, table: pa.Table, relpath: str) -> None:
        target = f"{self.path}/{relpath}"
        self.fs.create_dir(target.rsplit("/", 1)[0])
        pq.write_table(table, target, filesystem=self.fs)

    def _write_text(self, text: str, relpath: str) -> None:
        self._write_bytes(text.encode(), relpath)

    def _write_bytes(self, data: bytes, relpath: str) -> None:
        target = f"{self.path}/{relpath}"
        self.fs.create_dir(target.rsplit("/", 1)[0])
        with self.fs.open_output_stream(target) as f:
            f.write(data)

    # ------------------------------------------------------------------ close
    def close(self) -> dict:
        """Write metadata, move the dataset into place; return counts."""
        missing = self.expected - self.next_id - len(self.waiting)
        if self.next_id < self.expected:
            raise RuntimeError(f"dataset incomplete: {missing} of {self.expected} episodes never arrived")
        self._flush()
        if self.videos is not None:
            for index, per_camera in sorted(self.videos.close().items()):
                for key, stats in per_camera.items():
                    self.stats[key].merge(int(stats["count"][0]), stats["mean"], stats["std"], stats["min"],
                                          stats["max"])
                    self.episodes[index].update({f"stats/{key}/{k}": v.tolist() for k, v in stats.items()})
        n = len(self.episodes)
        self.fs.create_dir(f"{self.path}/meta/episodes/chunk-000")
        if n:
            self._write(pa.Table.from_pylist(self.episodes), EPISODES_PATH.format(chunk_index=0, file_index=0))
        tasks = pa.table({"task_index": pa.array([0], pa.int64()), "task": [self.task]})
        tasks = tasks.replace_schema_metadata({b"pandas": json.dumps({
            "index_columns": ["task"], "column_indexes": [], "columns": [
                {"name": "task_index", "field_name": "task_index", "pandas_type": "int64",
                 "numpy_type": "int64", "metadata": None},
                {"name": "task", "field_name": "task", "pandas_type": "unicode",
                 "numpy_type": "object", "metadata": None}],
            "pandas_version": "2.0.0"}).encode()})
        self._write(tasks, "meta/tasks.parquet")
        self._write_text(json.dumps(self.info(n), indent=2), "meta/info.json")
        self._write_text(json.dumps({k: s.as_json((3, 1, 1) if k.startswith(IMAGE_PREFIX) else None)
                                     for k, s in self.stats.items()}, indent=2), "meta/stats.json")
        if self.local:
            self._delete(self.final)
            self.fs.move(self.path, self.final)
        return {"episodes": n, "frames": self.frames, "rejects": len(self.rejects)}

    def abort(self) -> None:
        """Drop the partial dataset (locally the previous one, if any, stays; an object-store
        dataset, written in place, is then absent)."""
        if self.videos is not None:
            self.videos.abort()
        self._delete(self.path)

    def _delete(self, path: str) -> None:
        if self.fs.get_file_info(path).type != pafs.FileType.NotFound:
            self.fs.delete_dir(path)

    def info(self, episodes: int) -> dict:
        f = self.facts
        scalar = {"shape": [1], "names": None}
        return {
            "codebase_version": CODEBASE_VERSION, "robot_type": self.env_id,
            "total_episodes": episodes, "total_frames": self.frames, "total_tasks": 1,
            "chunks_size": CHUNKS_SIZE, "data_files_size_in_mb": 100, "video_files_size_in_mb": 200,
            "fps": f["fps"], "splits": {"train": f"0:{episodes}"},
            "data_path": DATA_PATH, "video_path": VIDEO_PATH if self.cameras else None,
            "features": {
                "observation.state": {"dtype": "float32", "shape": [f["obs_dim"]], "names": None},
                "action": {"dtype": "float32", "shape": [f["act_dim"]], "names": None},
                "next.reward": {"dtype": "float32", **scalar},
                "next.done": {"dtype": "bool", **scalar},
                "timestamp": {"dtype": "float32", **scalar},
                "frame_index": {"dtype": "int64", **scalar},
                "episode_index": {"dtype": "int64", **scalar},
                "index": {"dtype": "int64", **scalar},
                "task_index": {"dtype": "int64", **scalar},
                **self.video_features(),
            },
        }

    def video_features(self) -> dict:
        """The ``observation.images.<camera>`` features (``dtype: video``) of the cameras, if any."""
        if not self.cameras:
            return {}
        from .video import video_info

        h, w = self.cameras["height"], self.cameras["width"]
        return {feature_key(c): {"dtype": "video", "shape": [h, w, 3], "names": ["height", "width", "channels"],
                                 "info": video_info(h, w, self.facts["fps"])} for c in self.cameras["names"]}


# ------------------------------------------------------------------- reading
def read_info(root: str) -> dict:
    """``meta/info.json`` of a dataset (local path or object-store URI)."""
    return read_json(join(root, "meta", "info.json"))


def read_frames(root: str, columns=None) -> pa.Table:
    """All frames of a dataset (``data/**.parquet``), ordered by ``index``."""
    table = read_table(join(root, "data"), columns=columns)
    return table.sort_by("index") if "index" in table.column_names else table


def read_first_episodes(root: str, n: int, columns=("episode_index", "timestamp", "observation.state"),
                        batch_rows: int = 4096) -> pa.Table:
    """The frames of episodes ``0..n-1`` only: data files and record batches in order, stopping at
    the first later episode (frames are stored by ``index``, so episodes are contiguous)."""
    columns = list(dict.fromkeys(["episode_index", *columns]))
    kept = []
    for uri in list_files(join(root, "data")):
        fs, path = filesystem_for(uri)
        with fs.open_input_file(path) as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_rows, columns=columns):
                episode = batch.column("episode_index").to_numpy()
                kept.append(batch.filter(pa.array(episode < n)))
                if len(episode) and episode[-1] >= n:
                    return pa.Table.from_batches(kept)
    if not kept:  # no frames: every episode was rejected
        return pa.table({"episode_index": pa.array([], pa.int64())})
    return pa.Table.from_batches(kept)


def read_episodes(root: str) -> pa.Table:
    """The per-episode metadata table (``meta/episodes/**.parquet``)."""
    return read_table(join(root, "meta", "episodes")).sort_by("episode_index")


def vectors(column: pa.ChunkedArray) -> np.ndarray:
    """A fixed-size-list column as a 2-D float32 array."""
    column = column.combine_chunks()
    return np.asarray(column.flatten(), dtype=np.float32).reshape(len(column), -1)
