"""Audio stage: decode (WAV/FLAC/OGG/MP3 with soundfile, M4A/AAC with PyAV), mono, resample to
16 kHz, duration, loudness (RMS dBFS), silence ratio, log-mel features and their mean, and the
encoder's input: the builtin encoder's fixed-size log-mel, or the first ``embed_seconds`` of the
16 kHz wave for a hub model (its own feature extractor turns that into the model's input).

libsndfile silently clamps a WAV whose header claims more data than the file holds, so WAV
headers are checked first (:func:`check_wav_header`): a header that lies is a reject.
"""
from __future__ import annotations

import os
import struct
import time
from functools import lru_cache
from math import gcd

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

from pipelines.io import first_line

from .batches import fill_rows
from .sources import local_path, read_head

HOP_S, WIN_S = 0.010, 0.025
SOUNDFILE_FORMATS = {"wav", "flac", "ogg", "mp3"}  # libsndfile reads these; PyAV the rest (m4a, aac)


class AudioError(ValueError):
    """Audio that cannot be decoded or whose header is inconsistent."""


def check_wav_header(head: bytes, file_size: int) -> None:
    """Raise AudioError when a RIFF/WAVE header contradicts itself or the file size."""
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        raise AudioError("not a RIFF/WAVE file")
    riff_size = struct.unpack("<I", head[4:8])[0]
    if riff_size + 8 > file_size and riff_size != 0xFFFFFFFF:
        raise AudioError(f"WAV header declares {riff_size + 8} bytes but the file holds {file_size}")
    pos, fmt = 12, None
    while pos + 8 <= len(head):
        cid, csize = head[pos:pos + 4], struct.unpack("<I", head[pos + 4:pos + 8])[0]
        if cid == b"fmt " and pos + 24 <= len(head):
            tag, channels, rate, byte_rate, align, bits = struct.unpack("<HHIIHH", head[pos + 8:pos + 24])
            if channels == 0 or rate == 0:
                raise AudioError(f"WAV header: {channels} channels at {rate} Hz")
            if tag in (1, 3, 0xFFFE) and (align != channels * bits // 8 or byte_rate != rate * align):
                raise AudioError(f"WAV header inconsistent: {channels} ch x {bits} bit but block align "
                                 f"{align}, byte rate {byte_rate} at {rate} Hz")
            fmt = (channels, rate)
        elif cid == b"data":
            if fmt is None:
                raise AudioError("WAV data chunk before its fmt chunk")
            available = file_size - pos - 8
            if csize != 0xFFFFFFFF and csize > available:
                raise AudioError(f"WAV header declares {csize} data bytes but the file holds {available}")
            return
        pos += 8 + csize + (csize & 1)
    if fmt is None:
        raise AudioError("WAV header has no fmt chunk in the first bytes")


def to_mono_16k(samples: np.ndarray, rate: int, target: int) -> np.ndarray:
    """``(frames, channels)`` float -> mono float32 at ``target`` Hz (polyphase resampling)."""
    mono = samples.mean(axis=1) if samples.ndim == 2 else samples
    if rate != target:
        g = gcd(rate, target)
        mono = resample_poly(mono, target // g, rate // g)
    return np.asarray(mono, np.float32)


@lru_cache(maxsize=8)
def mel_filterbank(rate: int, n_fft: int, n_mels: int) -> np.ndarray:
    """Triangular HTK-mel filters, shape ``(n_mels, n_fft // 2 + 1)``."""
    def hz_to_mel(f):
        return 2595.0 * np.log10(1.0 + f / 700.0)

    mels = np.linspace(hz_to_mel(0.0), hz_to_mel(rate / 2), n_mels + 2)
    hz = 700.0 * (10 ** (mels / 2595.0) - 1.0)
    bins = np.fft.rfftfreq(n_fft, 1.0 / rate)
    fb = np.zeros((n_mels, len(bins)), np.float32)
    for m in range(n_mels):
        lo, mid, hi = hz[m], hz[m + 1], hz[m + 2]
        fb[m] = np.clip(np.minimum((bins - lo) / (mid - lo), (hi - bins) / (hi - mid)), 0, None)
    return fb


def log_mel(wave: np.ndarray, rate: int, n_mels: int) -> np.ndarray:
    """Log-mel spectrogram ``(frames, n_mels)``: 25 ms Hann window, 10 ms hop."""
    win, hop = int(WIN_S * rate), int(HOP_S * rate)
    n_fft = 1 << (win - 1).bit_length()
    if len(wave) < win:
        wave = np.pad(wave, (0, win - len(wave)))
    frames = np.lib.stride_tricks.sliding_window_view(wave, win)[::hop] * np.hanning(win).astype(np.float32)
    power = np.abs(np.fft.rfft(frames, n=n_fft, axis=1)) ** 2
    return np.log(power @ mel_filterbank(rate, n_fft, n_mels).T + 1e-10).astype(np.float32)


def frame_db(wave: np.ndarray, rate: int, frame_s: float = 0.02) -> np.ndarray:
    """RMS level in dBFS of consecutive ``frame_s`` frames."""
    n = max(1, int(frame_s * rate))
    usable = len(wave) // n * n
    if usable == 0:
        return np.array([20 * np.log10(np.sqrt(np.mean(wave ** 2)) + 1e-12)])
    rms = np.sqrt(np.mean(wave[:usable].reshape(-1, n) ** 2, axis=1))
    return 20 * np.log10(rms + 1e-12)


def fixed_frames(mel: np.ndarray, frames: int) -> np.ndarray:
    """Crop or pad (with the spectrogram's floor) to exactly ``frames`` rows."""
    if len(mel) >= frames:
        return mel[:frames]
    floor = float(mel.min()) if len(mel) else np.log(1e-10)
    return np.concatenate([mel, np.full((frames - len(mel), mel.shape[1]), floor, np.float32)])


def read_soundfile(local: str, max_seconds: float) -> tuple[int, int, int, np.ndarray]:
    """``(rate, channels, total frames, samples (frames, channels) float32)`` of the first
    ``max_seconds`` of a file libsndfile reads (WAV, FLAC, OGG, MP3)."""
    try:
        with sf.SoundFile(local) as f:
            rate, channels, total = f.samplerate, f.channels, f.frames
            samples = f.read(frames=int(max_seconds * rate), dtype="float32", always_2d=True)
    except sf.LibsndfileError as e:  # its message names the (possibly temporary) local file: drop that
        msg = e.error_string
        if "does not exist" in msg and os.path.isfile(local):  # what libsndfile says of a file it cannot parse
            msg = "no readable audio stream"
        raise AudioError(f"cannot decode audio: {first_line(RuntimeError(msg))}") from None
    except (RuntimeError, TypeError) as e:
        raise AudioError(f"cannot decode audio: {first_line(e)}") from None
    return rate, channels, total, samples


def read_av(local: str, max_seconds: float) -> tuple[int, int, int, np.ndarray]:
    """Like :func:`read_soundfile`, through FFmpeg (PyAV) for what libsndfile lacks (M4A, AAC):
    the first audio stream, as float32 at its own rate and channel count."""
    import av

    try:
        with av.open(local) as container:
            if not container.streams.audio:
                raise AudioError("no audio stream")
            stream = container.streams.audio[0]
            rate, channels = stream.codec_context.sample_rate, stream.codec_context.channels
            if not rate or not channels:
                raise AudioError(f"audio stream of {channels} channels at {rate} Hz")
            limit, parts, got = int(max_seconds * rate), [], 0
            resampler = av.AudioResampler(format="fltp", layout=stream.codec_context.layout, rate=rate)
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    parts.append(out.to_ndarray())
                    got += parts[-1].shape[1]
                if got >= limit:
                    break
            total = got if got < limit else round((container.duration or 0) / 1e6 * rate) or got
    except av.error.FFmpegError as e:  # strerror: FFmpeg's message without the errno and the file name
        raise AudioError(f"cannot decode audio: {first_line(RuntimeError(e.strerror or e))}") from None
    samples = np.concatenate(parts, axis=1).T[:limit] if parts else np.zeros((0, channels), np.float32)
    return rate, channels, total, np.ascontiguousarray(samples, np.float32)


def process_audio(path: str, fmt: str, size: int, rate: int, n_mels: int, silence_db: float,
                  max_seconds: float, embed_frames: int, endpoint: str | None = None) -> dict:
    """Decode one file and compute its features (see module doc)."""
    if fmt == "wav":
        check_wav_header(read_head(path, 4096, endpoint), size)
    with local_path(path, endpoint) as local:
        read = read_soundfile if fmt in SOUNDFILE_FORMATS else read_av
        src_rate, channels, total, samples = read(local, max_seconds)
    if samples.size == 0:
        raise AudioError("no audio samples")
    wave = to_mono_16k(samples, src_rate, rate)
    levels = frame_db(wave, rate)
    rms = float(np.sqrt(np.mean(wave.astype(np.float64) ** 2)))
    mel = log_mel(wave, rate, n_mels)
    return {
        "duration_s": total / src_rate, "source_rate": src_rate, "channels": channels,
        "loudness_dbfs": 20 * np.log10(rms + 1e-12), "peak": float(np.abs(wave).max()),
        "silence_ratio": float(np.mean(levels < silence_db)),
        "logmel_mean": mel.mean(axis=0), "logmel": fixed_frames(mel, embed_frames), "wave": wave,
    }


class AudioDecoder:
    """``map_batches`` stage: audio paths -> features + the encoder's input (``model_input``: ``logmel``
    for the builtin encoder, ``wave`` for a hub model, None without embedding); failures keep a
    ``reason``."""

    def __init__(self, sample_rate: int, n_mels: int, silence_db: float, max_seconds: float,
                 embed_seconds: float, endpoint: str | None = None, model_input: str | None = "logmel"):
        self.rate, self.n_mels, self.silence_db = sample_rate, n_mels, silence_db
        self.max_seconds, self.endpoint, self.model_input = max_seconds, endpoint, model_input
        self.embed_frames = embed_frames(embed_seconds)
        self.embed_samples = round(embed_seconds * sample_rate)

    def __call__(self, batch: dict) -> dict:
        start = time.perf_counter()
        paths = [str(p) for p in batch["path"]]
        n, m = len(paths), self.n_mels
        out = {"path": np.array(paths, dtype=object), "reason": np.array([""] * n, dtype=object),
               "format": np.array([str(f) for f in batch["format"]], dtype=object),
               "duration_s": np.zeros(n, np.float32), "source_rate": np.zeros(n, np.int32),
               "channels": np.zeros(n, np.int32), "loudness_dbfs": np.zeros(n, np.float32),
               "peak": np.zeros(n, np.float32), "silence_ratio": np.zeros(n, np.float32),
               "logmel_mean": np.zeros((n, m), np.float32),
               "logmel": np.zeros((n, self.embed_frames, m), np.float32)}
        if self.model_input == "wave":
            out["wave"] = np.zeros((n, self.embed_samples), np.float32)

        def work(i, path):
            row = process_audio(path, str(batch["format"][i]), int(batch["size"][i]), self.rate, m,
                                self.silence_db, self.max_seconds, self.embed_frames, self.endpoint)
            if self.model_input == "wave":  # the first embed_seconds, zero-padded
                row["wave"] = np.pad(row["wave"][:self.embed_samples],
                                     (0, max(0, self.embed_samples - len(row["wave"]))))
            else:
                del row["wave"]
            return row

        return fill_rows(out, paths, work, (AudioError, OSError, ValueError), start,
                         drop=None if self.model_input == "logmel" else "logmel")


def embed_frames(embed_seconds: float) -> int:
    """Log-mel frames in the encoder's input window."""
    return round(embed_seconds / HOP_S)
