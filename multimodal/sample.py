"""Generate a small mixed-media sample: images (incl. an exact and a near duplicate, EXIF
rotation, RGBA, grayscale, 16-bit, CMYK), short videos with shot changes, speech-like audio,
text in several encodings, plus broken files (truncated JPEG, text named .jpg, zero-byte
file, corrupt MP4, WAV whose header lies). ``python -m multimodal`` without ``--input``
writes it into the run folder (local or ``oss://``/``s3://``, through :mod:`pipelines.io`) and
processes it."""
from __future__ import annotations

import io
import json
import os
import tempfile

import cv2
import numpy as np
import soundfile as sf
from PIL import Image

from pipelines.io import filesystem_for, is_remote, join, write_bytes

from .config import SampleConfig

EXIF_ORIENTATION = 0x0112


def _photo(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """A synthetic 'photo': colour gradient, a few filled shapes, sensor noise."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    c = rng.uniform(0, 255, (3, 3))
    img = np.stack([c[i, 0] * x / w + c[i, 1] * y / h + c[i, 2] * 0.2 for i in range(3)], -1)
    img = np.ascontiguousarray(img.clip(0, 255).astype(np.uint8))
    for _ in range(4):
        color = tuple(int(v) for v in rng.integers(0, 256, 3))
        center = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        if rng.random() < 0.5:
            cv2.circle(img, center, int(rng.integers(8, max(9, h // 3))), color, -1)
        else:
            cv2.rectangle(img, center, (center[0] + int(rng.integers(10, w // 2)),
                                        center[1] + int(rng.integers(10, h // 2))), color, -1)
    return (img + rng.normal(0, 6, img.shape)).clip(0, 255).astype(np.uint8)


def _jpeg(arr: np.ndarray, quality: int = 90, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=quality, **kw)
    return buf.getvalue()


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def _speech_like(rng: np.random.Generator, seconds: float, rate: int) -> np.ndarray:
    """Voiced 'syllables' (harmonics of a gliding pitch, 4 Hz envelope) with pauses."""
    t = np.arange(int(seconds * rate)) / rate
    pitch = 120 + 30 * np.sin(2 * np.pi * 0.5 * t) + rng.uniform(-10, 10)
    phase = 2 * np.pi * np.cumsum(pitch) / rate
    voice = sum(np.sin(k * phase) / k for k in range(1, 8))
    envelope = np.clip(np.sin(2 * np.pi * 4 * t), 0, None) ** 2
    envelope[(t % 1.0) > 0.7] = 0.0  # a pause in every second
    return (0.3 * voice * envelope + rng.normal(0, 1e-4, len(t))).astype(np.float32)


def _video(rng: np.random.Generator, seconds: float, fps: int, shots: int) -> bytes:
    """An MP4 (OpenCV writes files only: encoded in a temp folder, returned as bytes)."""
    with tempfile.TemporaryDirectory(prefix="mm-video-") as tmp:
        path = os.path.join(tmp, "clip.mp4")
        _write_video(path, rng, seconds, fps, shots)
        with open(path, "rb") as f:
            return f.read()


def _write_video(path: str, rng: np.random.Generator, seconds: float, fps: int, shots: int) -> None:
    w, h = 96, 64
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    if not writer.isOpened():
        raise RuntimeError("OpenCV cannot write mp4v video here")
    frames = int(seconds * fps)
    colors = [rng.integers(0, 256, 3) for _ in range(shots)]
    for i in range(frames):
        shot = min(shots - 1, i * shots // frames)
        frame = np.empty((h, w, 3), np.uint8)
        frame[:] = colors[shot]
        x = (i * 3) % (w - 16)
        cv2.rectangle(frame, (x, 20), (x + 16, 36), tuple(int(255 - c) for c in colors[shot]), -1)
        writer.write(frame)
    writer.release()


def generate(out: str, cfg: SampleConfig | None = None) -> dict:
    """Write the sample into ``out`` (a local folder or an ``oss://``/``s3://`` prefix) and return
    ``{"root": out, "good": {modality: [paths]}, "broken": {path: expected_stage}}``; the paths
    are written as the listing of ``out`` names them (absolute local paths, or URIs)."""
    cfg = cfg or SampleConfig()
    out = str(out).rstrip("/") if is_remote(str(out)) else filesystem_for(str(out))[1]
    rng = np.random.default_rng(cfg.seed)
    good: dict[str, list[str]] = {m: [] for m in ("images", "video", "audio", "text")}
    broken: dict[str, str] = {}

    def put(modality: str, name: str, data: bytes, ok: bool = True, stage: str = "") -> str:
        uri = write_bytes(join(out, modality, name), data)
        if ok:
            good[modality].append(uri)
        else:
            broken[uri] = stage
        return uri

    # ---- images
    photos = [_photo(rng, int(rng.integers(120, 220)), int(rng.integers(90, 160))) for _ in range(max(cfg.images, 2))]
    for i, arr in enumerate(photos[:cfg.images]):
        put("images", f"photo_{i:03d}.jpg", _jpeg(arr))
    if cfg.images:
        first = photos[0]
        put("images", "photo_000_copy.jpg", _jpeg(first))  # exact duplicate (same bytes)
        h, w = first.shape[:2]
        put("images", "photo_000_small.jpg",  # near duplicate: resized and recompressed
            _jpeg(cv2.resize(first, (w * 3 // 4, h * 3 // 4), interpolation=cv2.INTER_AREA), quality=60))
        variants = [_photo(rng, int(rng.integers(120, 220)), int(rng.integers(90, 160))) for _ in range(6)]
        exif = Image.Exif()
        exif[EXIF_ORIENTATION] = 6  # stored landscape, displayed portrait
        put("images", "rotated_exif.jpg", _jpeg(variants[0], exif=exif.tobytes()))
        rgba = np.dstack([variants[1], np.full(variants[1].shape[:2], 128, np.uint8)])
        put("images", "alpha.png", _png(Image.fromarray(rgba)))
        put("images", "gray.png", _png(Image.fromarray(cv2.cvtColor(variants[2], cv2.COLOR_RGB2GRAY))))
        deep = cv2.cvtColor(variants[3], cv2.COLOR_RGB2GRAY).astype(np.uint16) * 257
        put("images", "deep16.png", _png(Image.fromarray(deep)))
        cmyk = io.BytesIO()
        Image.fromarray(variants[4]).convert("CMYK").save(cmyk, "JPEG", quality=90)
        put("images", "cmyk.jpg", cmyk.getvalue())
        put("images", "blurry.jpg", _jpeg(cv2.GaussianBlur(variants[5], (0, 0), 4)))
    # ---- video
    for i in range(cfg.videos):
        put("video", f"clip_{i:02d}.mp4", _video(rng, seconds=3.0, fps=10, shots=2 if i % 2 == 0 else 1))
    # ---- audio
    formats = [("wav", 22050, 2), ("flac", 16000, 1), ("ogg", 44100, 1)]
    for i in range(cfg.audio):
        ext, rate, channels = formats[i % len(formats)]
        wave = _speech_like(rng, 1.5 + 0.5 * (i % 3), rate)
        data = np.stack([wave] * channels, 1) if channels > 1 else wave
        buf = io.BytesIO()
        sf.write(buf, data, rate, format=ext.upper(), subtype="VORBIS" if ext == "ogg" else "PCM_16")
        put("audio", f"speech_{i:02d}.{ext}", buf.getvalue())
    # ---- text
    texts = [
        ("note_en.txt", "The quick brown fox jumps over the lazy dog.\n\n\nRay Data streams   blocks.\n", "utf-8"),
        ("note_zh.txt", "多模态数据处理：图像、视频、音频和文本。\n分析型数据库 Ray 集群。\n", "gb18030"),
        ("note_fr.txt", "Café crème et pâtisserie à la française, déjà vu.\n", "cp1252"),
        ("note_en_copy.txt", "The quick brown fox jumps over the lazy dog.\nRay Data streams blocks!\n", "utf-8"),
        ("note_ko.txt", "멀티모달 데이터 처리: 이미지, 비디오, 오디오와 텍스트.\n", "euc_kr"),
    ]
    for name, body, enc in texts[:cfg.texts]:
        put("text", name, body.encode(enc))
    if cfg.texts:
        records = [{"id": i, "text": t} for i, t in enumerate([
            "Distributed image decoding with Ray Data actor pools and bounded memory usage.",
            "Audio embeddings are computed from log-mel spectrograms at sixteen kilohertz.",
            "Distributed image decoding with Ray Data actor pools and bounded memory usage.",
            "Distributed image decoding with Ray Data actor pools and bounded memory use.",
            "Video shots are detected from colour histogram changes between sampled frames.",
        ])]
        put("text", "corpus.jsonl", ("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n").encode())
    # ---- broken files
    if cfg.broken:
        whole = _jpeg(photos[1])
        put("images", "truncated.jpg", whole[: len(whole) // 2], ok=False, stage="decode")
        put("images", "not_really.jpg", b"this is plain text, not a JPEG image\n" * 4, ok=False, stage="route")
        put("images", "empty.png", b"", ok=False, stage="route")
        put("video", "corrupt.mp4", b"\x00\x00\x00\x18ftypmp42" + rng.bytes(4096), ok=False, stage="decode")
        wav = io.BytesIO()
        sf.write(wav, _speech_like(rng, 1.0, 16000), 16000, format="WAV", subtype="PCM_16")
        lying = bytearray(wav.getvalue()[:2000])  # cut the data, keep the header's sizes
        put("audio", "lying_header.wav", bytes(lying), ok=False, stage="decode")
    return {"root": out, "good": good, "broken": broken}
