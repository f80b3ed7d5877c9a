"""Image stage: decode (Pillow with JPEG draft mode, or OpenCV), EXIF orientation, mode
conversion to RGB, resize + center crop, width/height/blur/brightness, perceptual hash.

Pillow is the default decoder: with ``draft`` it decodes JPEGs at a reduced DCT scale, which
measured faster here than OpenCV's full decode (see ``benchmarks/multimodal.py``).
"""
from __future__ import annotations

import hashlib
import io
import re
import time
import warnings

import cv2
import numpy as np
from PIL import Image, ImageOps

from pipelines.io import first_line

from .batches import fill_rows
from .sources import read_bytes

cv2.setNumThreads(1)  # Ray runs one task per core; OpenCV's own threads would oversubscribe
EXIF_SWAPS_AXES = (5, 6, 7, 8)
OBJECT_REPR = re.compile(r"\s*<[\w.]+ object at 0x[0-9a-fA-F]+>")


class ImageError(ValueError):
    """An image that cannot be decoded."""


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode (1, L, P, RGBA, LA, CMYK, I;16, I, F, ...) -> 8-bit RGB."""
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if im.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        return Image.fromarray((arr / hi * 255.0).clip(0, 255).astype(np.uint8)).convert("RGB")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def decode_pillow(data: bytes, min_side: int) -> tuple[np.ndarray, int, int, str]:
    """Decode with Pillow: ``(rgb, width, height, source_mode)``; width/height after EXIF
    orientation; the returned array may be reduced (JPEG draft) but keeps its shorter side
    >= ``min_side`` where the original allows."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            width, height = im.size
            mode = im.mode
            orientation = im.getexif().get(0x0112, 1)
            if im.format == "JPEG":
                im.draft("RGB", (min_side, min_side))
            im.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as e:
        # Pillow names the buffer by its repr (<_io.BytesIO object at 0x7f...>): noise in a reason
        raise ImageError("cannot decode image: " + OBJECT_REPR.sub("", first_line(e))) from None
    if orientation in EXIF_SWAPS_AXES:
        width, height = height, width
    im = ImageOps.exif_transpose(im)
    return np.asarray(_to_rgb(im)), width, height, mode


def decode_opencv(data: bytes, min_side: int) -> tuple[np.ndarray, int, int, str]:
    """Decode with OpenCV (EXIF orientation applied, any depth -> 8-bit): same contract."""
    buf = np.frombuffer(data, np.uint8)
    bgr = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    if bgr is None:
        raise ImageError("cannot decode image: OpenCV could not decode the bytes")
    h, w = bgr.shape[:2]
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), w, h, "BGR"


DECODERS = {"pillow": decode_pillow, "opencv": decode_opencv}


def fit(rgb: np.ndarray, size: int) -> np.ndarray:
    """Resize the shorter side to ``size`` and center-crop to ``size x size``."""
    h, w = rgb.shape[:2]
    scale = size / min(h, w)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(rgb, (nw, nh), interpolation=interp)
    top, left = (nh - size) // 2, (nw - size) // 2
    return np.ascontiguousarray(resized[top:top + size, left:left + size])


def analysis_gray(rgb: np.ndarray, max_side: int) -> np.ndarray:
    """Grayscale copy whose longest side is at most ``max_side`` (for blur/brightness/hash)."""
    h, w = rgb.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    if scale < 1.0:
        rgb = cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))),
                         interpolation=cv2.INTER_AREA)
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)


def blur_score(gray: np.ndarray) -> float:
    """Variance of the Laplacian: low means blurry."""
    return float(cv2.Laplacian(gray, cv2.CV_64F).var())


def phash(gray: np.ndarray) -> int:
    """64-bit perceptual hash: signs of the 8x8 low-frequency DCT of a 32x32 thumbnail
    against their median (DC term excluded from the median)."""
    small = cv2.resize(gray, (32, 32), interpolation=cv2.INTER_AREA).astype(np.float32)
    low = cv2.dct(small)[:8, :8].ravel()
    bits = low > np.median(low[1:])
    return int(np.packbits(bits).view(">u8")[0])


def hamming(a: int, b: int) -> int:
    """Bit distance between two 64-bit hashes."""
    return (a ^ b).bit_count()


def process_image(data: bytes, size: int, analysis_size: int, decoder: str = "pillow") -> dict:
    """All per-image work on raw bytes: pixels (size x size x 3) plus features."""
    rgb, width, height, mode = DECODERS[decoder](data, max(size, analysis_size))
    gray = analysis_gray(rgb, analysis_size)
    return {
        "width": width, "height": height, "mode": mode,
        "blur": blur_score(gray), "brightness": float(gray.mean() / 255.0),
        "phash": f"{phash(gray):016x}", "sha256": hashlib.sha256(data).hexdigest(),
        "pixels": fit(rgb, size),
    }


class ImageDecoder:
    """``map_batches`` stage: paths -> pixels (the encoder's input, unless ``keep_pixels`` is
    off) + features; failures keep a ``reason``."""

    def __init__(self, size: int, analysis_size: int, decoder: str = "pillow", endpoint: str | None = None,
                 keep_pixels: bool = True):
        self.size, self.analysis_size = size, analysis_size
        self.decoder, self.endpoint, self.keep_pixels = decoder, endpoint, keep_pixels

    def __call__(self, batch: dict) -> dict:
        start = time.perf_counter()
        paths = [str(p) for p in batch["path"]]
        n, s = len(paths), self.size
        out = {
            "path": np.array(paths, dtype=object),
            "width": np.zeros(n, np.int32), "height": np.zeros(n, np.int32),
            "mode": np.array([""] * n, dtype=object),
            "blur": np.zeros(n, np.float32), "brightness": np.zeros(n, np.float32),
            "phash": np.array([""] * n, dtype=object), "sha256": np.array([""] * n, dtype=object),
            "pixels": np.zeros((n, s, s, 3), np.uint8), "reason": np.array([""] * n, dtype=object),
            "format": np.array([str(f) for f in batch["format"]], dtype=object),
        }
        return fill_rows(
            out, paths,
            lambda i, path: process_image(read_bytes(path, self.endpoint), s, self.analysis_size, self.decoder),
            (ImageError, OSError, ValueError, cv2.error), start, drop=None if self.keep_pixels else "pixels")
