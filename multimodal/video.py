"""Video stage: OpenCV decode, frames sampled at ``sample_fps``, shot boundaries from HSV
histogram changes, clips (a shot, split at ``max_clip_s``) with duration/fps/resolution stats
and a few frames for the clip embedding.

The stage is a generator: it yields one small batch per clip while decoding, so a long video
streams through as many small blocks, never one giant one.
"""
from __future__ import annotations

import time

import cv2
import numpy as np

from pipelines.io import first_line

from .images import fit
from .sources import local_path

cv2.setNumThreads(1)


class VideoError(ValueError):
    """A video that cannot be opened or has no decodable frames."""


def hsv_hist(rgb: np.ndarray) -> np.ndarray:
    """Normalised 8x8x8 HSV colour histogram (for shot-change detection)."""
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    hist = cv2.calcHist([hsv], [0, 1, 2], None, [8, 8, 8], [0, 180, 0, 256, 0, 256])
    return cv2.normalize(hist, hist).flatten()


def shot_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Bhattacharyya distance between two histograms: 0 same, 1 disjoint."""
    return float(cv2.compareHist(a, b, cv2.HISTCMP_BHATTACHARYYA))


def _clip_row(path, meta, clip, shot, frames, times, frames_per_clip, step_s):
    stack = np.stack(frames)
    pick = np.linspace(0, len(frames) - 1, frames_per_clip).round().astype(int)
    diffs = np.abs(np.diff(stack.astype(np.int16), axis=0)).mean() / 255.0 if len(frames) > 1 else 0.0
    end = min(times[-1] + step_s, meta["video_duration_s"]) if meta["video_duration_s"] > 0 else times[-1] + step_s
    return {"path": path, "clip": clip, "shot": shot, "start_s": times[0], "end_s": end,
            "duration_s": end - times[0], "n_sampled": len(frames),
            "brightness": float(stack.mean() / 255.0), "motion": float(diffs),
            "frames": stack[pick], **meta}


def iter_clips(local: str, path: str, sample_fps: float, frame_size: int, frames_per_clip: int,
               max_clip_s: float, shot_threshold: float, max_seconds: float):
    """Yield one row per clip of the video at ``local`` (``path`` is what rows record)."""
    cap = cv2.VideoCapture(local)
    try:
        if not cap.isOpened():
            raise VideoError("cannot open video (corrupt or unsupported container)")
        fps = cap.get(cv2.CAP_PROP_FPS)
        if not 0 < fps < 1000:
            raise VideoError(f"invalid frame rate {fps}")
        count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        meta = {"fps": float(fps), "width": int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)),
                "height": int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)),
                "video_duration_s": count / fps if count > 0 else 0.0}
        step = max(1, round(fps / sample_fps))
        step_s = step / fps
        limit = int(max_seconds * fps)
        frames, times, prev_hist = [], [], None
        clip = shot = index = 0
        while index < limit and cap.grab():
            if index % step == 0:
                ok, bgr = cap.retrieve()
                if not ok or bgr is None:
                    break
                rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
                hist = hsv_hist(cv2.resize(rgb, (64, 64), interpolation=cv2.INTER_AREA))
                t = index / fps
                new_shot = prev_hist is not None and shot_distance(prev_hist, hist) > shot_threshold
                if frames and (new_shot or t - times[0] >= max_clip_s):
                    yield _clip_row(path, meta, clip, shot, frames, times, frames_per_clip, step_s)
                    clip, frames, times = clip + 1, [], []
                    shot += int(new_shot)
                frames.append(fit(rgb, frame_size))
                times.append(t)
                prev_hist = hist
            index += 1
        if frames:
            yield _clip_row(path, meta, clip, shot, frames, times, frames_per_clip, step_s)
        elif clip == 0:
            raise VideoError("no decodable frames")
    finally:
        cap.release()


NUMERIC = {"clip": np.int32, "shot": np.int32, "start_s": np.float32, "end_s": np.float32,
           "duration_s": np.float32, "n_sampled": np.int32, "brightness": np.float32,
           "motion": np.float32, "fps": np.float32, "width": np.int32, "height": np.int32,
           "video_duration_s": np.float32}


class VideoDecoder:
    """``map_batches`` generator stage: video paths -> one batch per clip (failures: one
    row with a ``reason``)."""

    def __init__(self, sample_fps: float, frame_size: int, frames_per_clip: int, max_clip_s: float,
                 shot_threshold: float, max_seconds: float, endpoint: str | None = None,
                 keep_frames: bool = True):
        self.kw = {"sample_fps": sample_fps, "frame_size": frame_size, "frames_per_clip": frames_per_clip,
                   "max_clip_s": max_clip_s, "shot_threshold": shot_threshold, "max_seconds": max_seconds}
        self.endpoint, self.keep_frames = endpoint, keep_frames

    def _batch(self, row: dict, seconds: float) -> dict:
        s, k = self.kw["frame_size"], self.kw["frames_per_clip"]
        out = {"path": np.array([row["path"]], dtype=object),
               "reason": np.array([row.get("reason") or ""], dtype=object),
               "frames": row["frames"][None] if "frames" in row else np.zeros((1, k, s, s, 3), np.uint8),
               "decode_s": np.array([seconds], np.float32)}
        for name, dtype in NUMERIC.items():
            out[name] = np.array([row.get(name, 0)], dtype)
        if not self.keep_frames:  # no embedding stage downstream
            del out["frames"]
        return out

    def __call__(self, batch: dict):
        for path in batch["path"]:
            path, start = str(path), time.perf_counter()
            try:
                with local_path(path, self.endpoint) as local:
                    for row in iter_clips(local, path, **self.kw):
                        yield self._batch(row, time.perf_counter() - start)
                        start = time.perf_counter()
            except (VideoError, OSError, cv2.error) as e:
                yield self._batch({"path": path, "reason": first_line(e)}, time.perf_counter() - start)
