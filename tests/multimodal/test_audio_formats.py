"""MP3 (libsndfile), M4A and AAC (PyAV) audio: routed, decoded like WAV, and a corrupt file of each
type is a one-line reject. Fixtures are encoded here, at test time."""
from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from multimodal.audio import AudioDecoder, AudioError, process_audio
from multimodal.sources import route_one

RATE = 22050


def tone(seconds: float = 1.0) -> np.ndarray:
    """Stereo 440 Hz tone, first half silent: ``(frames, 2)`` float32."""
    t = np.arange(int(seconds * RATE)) / RATE
    wave = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    wave[: len(t) // 2] = 0.0
    return np.stack([wave, wave], 1)


def encode_aac(path, muxer: str) -> None:
    """AAC through PyAV's encoder: ``ipod`` writes an .m4a (brand M4A), ``mp4`` an ISO-BMFF file of
    brand isom, ``adts`` raw .aac."""
    import av

    with av.open(str(path), "w", format=muxer) as out:
        stream = out.add_stream("aac", rate=RATE, layout="stereo")
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(tone().T), format="fltp", layout="stereo")
        frame.rate = RATE
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("audio")
    sf.write(d / "tone.mp3", tone(), RATE, format="MP3")
    encode_aac(d / "tone.m4a", "ipod")
    encode_aac(d / "isom.m4a", "mp4")
    encode_aac(d / "tone.aac", "adts")
    rng = np.random.default_rng(0)
    for ext in ("mp3", "m4a", "aac"):  # the real header, then noise; and the first 200 bytes only
        good = (d / f"tone.{ext}").read_bytes()
        (d / f"noise.{ext}").write_bytes(good[:16] + rng.integers(0, 256, 3000, dtype=np.uint8).tobytes())
        (d / f"cut.{ext}").write_bytes(good[:200])
    return d


@pytest.mark.parametrize("name,fmt", [("tone.mp3", "mp3"), ("tone.m4a", "m4a"), ("isom.m4a", "m4a"),
                                      ("tone.aac", "aac")])
def test_mp3_m4a_aac_are_routed_and_decoded(media, name, fmt):
    p = media / name
    rec = route_one(str(p), p.stat().st_size, p.read_bytes()[:64])
    assert rec["reason"] is None and (rec["modality"], rec["format"]) == ("audio", fmt)
    r = process_audio(str(p), fmt, p.stat().st_size, 16000, 40, -40.0, 60, 100)
    assert (r["source_rate"], r["channels"]) == (RATE, 2)
    assert r["duration_s"] == pytest.approx(1.0, abs=0.1)  # AAC adds an encoder delay of ~1024 samples
    assert r["silence_ratio"] == pytest.approx(0.5, abs=0.08) and r["peak"] == pytest.approx(0.5, abs=0.05)


def test_an_mp4_of_an_audio_brand_is_not_a_video(media):
    head = (media / "tone.m4a").read_bytes()[:64]
    assert "content is audio (m4a)" in route_one("/d/x.mp4", 100, head)["reason"]


@pytest.mark.parametrize("ext", ["mp3", "m4a", "aac"])
def test_a_corrupt_file_is_a_one_line_reject(media, ext):
    paths = [str(media / f"noise.{ext}"), str(media / f"tone.{ext}"), str(media / f"cut.{ext}")]
    for p in (paths[0], paths[2]):
        with pytest.raises(AudioError):
            process_audio(p, ext, 1, 16000, 40, -40.0, 60, 100)
    out = AudioDecoder(16000, 40, -40.0, 60, 1.0)({"path": np.array(paths, dtype=object),
                                                   "format": np.array([ext] * 3, dtype=object),
                                                   "size": np.array([1, 1, 1])})
    reasons = list(out["reason"])
    assert reasons[1] == "" and out["duration_s"][1] > 0.9
    for r in (reasons[0], reasons[2]):
        assert r and "\n" not in r and len(r) < 120 and str(media) not in r, r


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-32"])
def test_utf16_and_utf32_text_with_a_bom_is_text_not_mpeg_audio(encoding):
    """A little-endian byte-order mark (FF FE) is also an MPEG frame sync: the text must not be lost as audio."""
    data = ("\ufeff" if encoding == "utf-16-le" else "") + "héllo wörld, 你好\n"
    head = data.encode(encoding)[:64]
    assert head.startswith(b"\xff\xfe")
    rec = route_one("/d/notes.txt", len(head), head)
    assert rec["modality"] == "text" and rec["reason"] is None, rec
