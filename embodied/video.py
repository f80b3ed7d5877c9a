"""Camera frames as MP4 in the LeRobot v3 video layout (PyAV): encoding tasks and the episode decoder.

    <root>/videos/observation.images.<camera>/chunk-000/file-000.mp4

One MP4 file per camera holds a run of consecutive episodes back to back (frame ``k`` of the
file at ``k / fps`` s); each episode's row in ``meta/episodes`` names its file
(``videos/<key>/chunk_index``, ``file_index``) and its span (``from_timestamp``, ``to_timestamp``),
which is what LeRobot's ``LeRobotDataset`` reads. H.264 (``libx264``, ``yuv420p``, CRF 23,
a keyframe every 2 frames as LeRobot's own writer does for random access): at 96x96 a decoded
frame is ~1-2/255 off the rendered one on average.

:func:`encode_chunk` runs as a Ray task: it gets the rendered frames by object reference (the
simulators' return values) and returns only the compressed files, so raw frames never pass
through the driver.
"""
from __future__ import annotations

import io
from fractions import Fraction

import numpy as np

from pipelines.io import filesystem_for, join

from .dataset import IMAGE_PREFIX, VIDEO_PATH, feature_key, read_episodes, read_info

CODEC, PIX_FMT = "libx264", "yuv420p"


def _rate(fps: float) -> Fraction:
    return Fraction(fps).limit_denominator(1001)


def encode_frames(frames: np.ndarray, fps: float, crf: int = 23, gop: int = 2, threads: int = 1) -> bytes:
    """An MP4 (H.264, yuv420p) of ``frames`` (uint8 ``(T, H, W, 3)`` RGB), frame ``k`` at ``k / fps`` s."""
    import av

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as out:
        stream = out.add_stream(CODEC, rate=_rate(fps),
                                options={"crf": str(crf), "g": str(gop), "threads": str(threads)})
        stream.pix_fmt, stream.height, stream.width = PIX_FMT, frames.shape[1], frames.shape[2]
        for frame in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(stream.encode())
    return buffer.getvalue()


def image_stats(frames: np.ndarray) -> dict:
    """LeRobot's per-episode image statistics: per channel, pixels scaled to [0, 1], shape (3, 1, 1)."""
    x = np.asarray(frames, dtype=np.float64).reshape(-1, 3) / 255.0
    stats = {"min": x.min(0), "max": x.max(0), "mean": x.mean(0), "std": x.std(0)}
    out = {k: v.reshape(3, 1, 1) for k, v in stats.items()}
    out["count"] = np.array([len(frames)])
    return out


def encode_chunk(cameras: list[str], episodes: list[tuple[int, int]], fps: float, crf: int, gop: int,
                 threads: int, *frames: dict) -> dict:
    """A Ray task: one MP4 per camera of ``episodes`` in order.

    ``episodes`` lists ``(which, episode_id)``: the episode's frames are ``frames[which][episode_id]``
    (``{camera: uint8 (T, H, W, 3)}``, a simulator's return value). Returns ``{camera: {"mp4": bytes,
    "stats": [per-episode image stats]}}``.
    """
    out = {}
    for camera in cameras:
        clips = [frames[which][eid][camera] for which, eid in episodes]
        out[camera] = {"mp4": encode_frames(np.concatenate(clips), fps, crf, gop, threads),
                       "stats": [image_stats(c) for c in clips]}
    return out


def video_info(height: int, width: int, fps: float) -> dict:
    """The ``info`` of a video feature in ``meta/info.json`` (the keys LeRobot's ``get_video_info`` writes)."""
    return {"video.height": height, "video.width": width, "video.codec": "h264", "video.pix_fmt": PIX_FMT,
            "video.is_depth_map": False, "video.fps": round(fps) if float(fps).is_integer() else fps,
            "video.channels": 3, "has_audio": False}


def decode_frames(source, start: float = 0.0, end: float | None = None) -> np.ndarray:
    """The frames of an MP4 (path or file object) with ``start <= t < end`` (seconds), uint8 (T, H, W, 3)."""
    import av

    with av.open(source) as container:
        stream = container.streams.video[0]
        half = 0.5 / float(stream.average_rate or stream.base_rate or 1)  # half a frame: timestamp tolerance
        if start > 0:
            container.seek(int(max(0.0, start - half) / stream.time_base), stream=stream, backward=True)
        frames = []
        for frame in container.decode(stream):
            t = float(frame.pts * stream.time_base)
            if t < start - half:
                continue
            if end is not None and t >= end - half:
                break
            frames.append(frame.to_ndarray(format="rgb24"))
    if not frames:
        return np.zeros((0, 0, 0, 3), dtype=np.uint8)
    return np.stack(frames)


def decode_episode_frames(root: str, episode, camera: str) -> np.ndarray:
    """Frames of one episode's camera from a LeRobot v3 dataset: uint8 ``(T, H, W, 3)`` RGB.

    ``episode`` is an episode index or its row of ``meta/episodes`` (a dict, as from
    ``read_episodes(root).to_pylist()``); ``camera`` is the camera name or its feature key
    (``observation.images.<camera>``). ``root`` is a local folder or an ``oss://``/``s3://`` URI.
    """
    key = camera if camera.startswith(IMAGE_PREFIX) else feature_key(camera)
    if not isinstance(episode, dict):
        rows = read_episodes(root)
        index = int(episode)
        found = [r for r in rows.filter(rows["episode_index"].to_numpy() == index).to_pylist()]
        if not found:
            raise ValueError(f"{root}: no episode {index}")
        episode = found[0]
    if f"videos/{key}/file_index" not in episode:
        raise ValueError(f"{root}: episode {episode.get('episode_index')} has no video {key!r}")
    info = read_info(root)
    path = (info.get("video_path") or VIDEO_PATH).format(video_key=key, chunk_index=episode[f"videos/{key}/chunk_index"],
                                                         file_index=episode[f"videos/{key}/file_index"])
    fs, local = filesystem_for(join(root, path))
    with fs.open_input_file(local) as f:
        frames = decode_frames(f, episode[f"videos/{key}/from_timestamp"], episode[f"videos/{key}/to_timestamp"])
    if "length" in episode and len(frames) != episode["length"]:
        raise ValueError(f"{root}: episode {episode['episode_index']} {key}: decoded {len(frames)} frames, "
                         f"expected {episode['length']}")
    return frames


class VideoFiles:
    """The writer's side of the videos: groups consecutive episodes into MP4 files, one encoding task
    per file (at most ``max_encoding`` in flight; :meth:`add` waits for the oldest beyond that), writes
    each finished file through ``write(bytes, relpath)``.

    ``cameras``: names, width, height, crf, gop, encode_mb, encode_num_cpus, max_encoding (the
    ``cameras`` config section as a dict).
    """

    def __init__(self, cameras: dict, fps: float, chunks_size: int, write):
        import ray

        self.cameras, self.fps, self.chunks_size, self.write = cameras, fps, chunks_size, write
        self.names = list(cameras["names"])
        self.frame_bytes = cameras["width"] * cameras["height"] * 3 * len(self.names)
        self.limit = cameras.get("encode_mb", 64.0) * 1024 * 1024
        self.max_encoding = cameras.get("max_encoding", 2)
        threads = max(1, int(cameras.get("encode_num_cpus", 1.0)))
        self.task = ray.remote(num_cpus=cameras.get("encode_num_cpus", 1.0), max_retries=1)(encode_chunk)
        self.options = (fps, cameras.get("crf", 23), cameras.get("gop", 2), threads)
        self.pending: list[tuple[int, int, object]] = []  # (episode index, episode id, frames ref) of the open file
        self.file_frames = 0
        self.file_number = 0
        self.running: list[tuple[int, list[int], object]] = []  # (file number, episode indexes, task)
        self.stats: dict[int, dict] = {}  # episode index -> {camera: image stats}

    def add(self, index: int, episode_id: int, length: int, frames) -> dict:
        """Queue episode ``index`` (its frames: ``frames[episode_id]`` of the object ``frames``); return its
        ``videos/...`` columns of ``meta/episodes``."""
        chunk, file = divmod(self.file_number, self.chunks_size)
        start = self.file_frames / self.fps
        meta = {}
        for name in self.names:
            key = f"videos/{feature_key(name)}"
            meta.update({f"{key}/chunk_index": chunk, f"{key}/file_index": file,
                         f"{key}/from_timestamp": start, f"{key}/to_timestamp": start + length / self.fps})
        self.pending.append((index, episode_id, frames))
        self.file_frames += length
        if self.file_frames * self.frame_bytes >= self.limit:
            self.flush()
        return meta

    def flush(self) -> None:
        """Start the encoding task of the open file (if it has episodes) and open the next one."""
        if not self.pending:
            return
        refs = list(dict.fromkeys(ref for _, _, ref in self.pending))  # each simulator return value once
        which = {ref: k for k, ref in enumerate(refs)}
        episodes = [(which[ref], eid) for _, eid, ref in self.pending]
        task = self.task.remote(self.names, episodes, *self.options, *refs)
        self.running.append((self.file_number, [i for i, _, _ in self.pending], task))
        self.pending, self.file_frames = [], 0
        self.file_number += 1
        while len(self.running) > self.max_encoding:
            self._finish(block=True)
        self._finish(block=False)

    def _finish(self, block: bool) -> None:
        """Write the files of finished encoding tasks, in order (the oldest first; ``block``: wait for it)."""
        import ray

        while self.running:
            number, indexes, task = self.running[0]
            if not block and not ray.wait([task], timeout=0)[0]:
                return
            out = ray.get(task)
            self.running.pop(0)
            block = False
            chunk, file = divmod(number, self.chunks_size)
            for name in self.names:
                key = feature_key(name)
                self.write(out[name]["mp4"], VIDEO_PATH.format(video_key=key, chunk_index=chunk, file_index=file))
                for index, stats in zip(indexes, out[name]["stats"]):
                    self.stats.setdefault(index, {})[key] = stats

    def close(self) -> dict[int, dict]:
        """Encode what is left and wait for every file; return each episode's image stats."""
        self.flush()
        while self.running:
            self._finish(block=True)
        return self.stats

    def abort(self) -> None:
        """Cancel the encoding tasks still running (nothing of theirs has been written)."""
        import ray

        for _, _, task in self.running:
            ray.cancel(task)
        self.running, self.pending = [], []
