"""Unit tests of the multimodal stages on small in-memory inputs (no Ray)."""
from __future__ import annotations

import io
import struct

import cv2
import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from multimodal import dedup
from multimodal.audio import AudioError, check_wav_header, frame_db, log_mel, process_audio, to_mono_16k
from multimodal.config import EmbedConfig
from multimodal.embed import Embedder, hash_tokenize
from multimodal.images import ImageDecoder, ImageError, decode_pillow, fit, hamming, phash, process_image
from multimodal.sources import route_one, sniff
from multimodal.text import TextError, TextReader, decode_text, normalize, script_of
from multimodal.video import iter_clips


def jpeg(arr, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def gradient(w=120, h=80, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (w + h)], -1)
    img = np.ascontiguousarray(img.astype(np.uint8))
    cv2.circle(img, (int(rng.integers(20, w - 20)), int(rng.integers(20, h - 20))), 15, (255, 0, 0), -1)
    return img


# ------------------------------------------------------------------ routing
@pytest.mark.parametrize("name,data,reason", [
    ("a.jpg", b"hello, I am text\n" * 3, "content is text"),
    ("a.png", b"", "empty file"),
    ("a.xyz", b"\x00\x01", "unsupported extension"),
    ("a.wav", b"\xff\xd8\xff\xe0" + b"\x00" * 20, "content is images (jpeg)"),
    ("a.txt", b"\x89PNG\r\n\x1a\n" + b"\x00" * 20, "content is images (png)"),
])
def test_route_rejects_mismatched_or_empty_files(name, data, reason):
    rec = route_one(f"/d/{name}", len(data), data[:64])
    assert rec["reason"] and reason in rec["reason"]


def test_route_accepts_by_extension_and_magic():
    assert sniff(jpeg(gradient()))[0] == "images"
    rec = route_one("/d/A.JPG", 10, jpeg(gradient())[:64])
    assert rec["reason"] is None and rec["modality"] == "images" and rec["format"] == "jpeg"
    assert route_one("/d/x.jsonl", 5, b'{"text": "hi"}')["modality"] == "text"
    assert route_one("s3://b/k/x.flac", 5, b"fLaC\x00\x00\x00\x22")["reason"] is None


# ------------------------------------------------------------------ images
def test_exif_orientation_swaps_width_and_height():
    exif = Image.Exif()
    exif[0x0112] = 6
    rgb, w, h, _ = decode_pillow(jpeg(gradient(120, 80), exif=exif.tobytes()), 64)
    assert (w, h) == (80, 120) and rgb.shape[:2] == (120, 80)


@pytest.mark.parametrize("mode", ["RGBA", "L", "I;16", "CMYK", "P"])
def test_any_mode_becomes_rgb(mode):
    img = Image.fromarray(gradient())
    if mode == "I;16":
        img = Image.fromarray(np.asarray(img.convert("L")).astype(np.uint16) * 257)
    else:
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, "JPEG" if mode == "CMYK" else "PNG")
    r = process_image(buf.getvalue(), 32, 128)
    assert r["pixels"].shape == (32, 32, 3) and r["pixels"].dtype == np.uint8
    assert (r["width"], r["height"]) == (120, 80) and r["mode"] == mode
    assert r["pixels"].std() > 5  # real content survived the conversion (not all black/white)


def test_truncated_jpeg_is_an_error_and_batch_keeps_good_rows(tmp_path):
    good = tmp_path / "good.jpg"
    good.write_bytes(jpeg(gradient()))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(jpeg(gradient())[:300])
    with pytest.raises(ImageError, match="(?i)truncated"):
        process_image(bad.read_bytes(), 32, 64)
    out = ImageDecoder(32, 64)({"path": np.array([str(good), str(bad)], dtype=object),
                                "format": np.array(["jpeg", "jpeg"], dtype=object)})
    assert out["reason"][0] == "" and "truncated" in out["reason"][1].lower()
    assert out["width"][0] == 120 and out["pixels"][0].std() > 0


def test_reject_reasons_are_one_short_line_without_object_addresses():
    from multimodal.batches import fill_rows

    for data in (b"\x89PNG\r\n\x1a\n" + b"\x13" * 300, b"GIF89a" + b"\x00" * 5):
        with pytest.raises(ImageError) as e:
            process_image(data, 32, 64)
        assert str(e.value) == "cannot decode image: cannot identify image file"  # no <_io.BytesIO at 0x...>

    def work(i, path):
        raise ValueError("\n  first line\nTraceback (most recent call last):\n  File x")

    out = fill_rows({"reason": np.array([""], dtype=object)}, ["/p"], work, (ValueError,), 0.0)
    assert out["reason"][0] == "first line"


def test_fit_resizes_shorter_side_and_center_crops():
    assert fit(gradient(200, 100), 50).shape == (50, 50, 3)
    assert fit(gradient(50, 60), 64).shape == (64, 64, 3)


def test_blur_and_phash_behave():
    sharp = process_image(jpeg(gradient()), 32, 128)
    blurred = process_image(jpeg(cv2.GaussianBlur(gradient(), (0, 0), 3)), 32, 128)
    assert blurred["blur"] < sharp["blur"] / 3
    small = cv2.resize(gradient(), (90, 60), interpolation=cv2.INTER_AREA)
    near = process_image(jpeg(small), 32, 128)
    other = process_image(jpeg(np.ascontiguousarray(gradient()[::-1, ::-1])), 32, 128)
    a, b, c = (int(r["phash"], 16) for r in (sharp, near, other))
    assert hamming(a, b) <= 6 < hamming(a, c)
    assert phash(np.zeros((40, 40), np.uint8)) == phash(np.zeros((40, 40), np.uint8))


# ------------------------------------------------------------------ dedup
def test_image_groups_across_whole_list():
    base = 0x0F0F_F0F0_1234_5678
    paths = ["c.jpg", "a.jpg", "b.jpg", "d.jpg"]
    sha = ["s1", "s1", "s2", "s3"]
    hashes = [f"{base:016x}", f"{base:016x}", f"{base ^ 0b111:016x}", f"{~base & (2**64 - 1):016x}"]
    g = dedup.group_images(paths, sha, hashes, max_distance=4)
    assert g["dup_group"][0] == g["dup_group"][1] == g["dup_group"][2] != g["dup_group"][3]
    assert g["dup_of"] == ["a.jpg", None, "a.jpg", None]
    assert g["dup_kind"] == ["exact", None, "near", None]


def test_phash_banding_finds_every_pair_within_distance():
    rng = np.random.default_rng(0)
    base = [int(x) for x in rng.integers(0, 2**63, 50, dtype=np.int64)]
    hashes = base + [h ^ (1 << int(rng.integers(0, 64))) ^ (1 << int(rng.integers(0, 64))) for h in base]
    pairs = set(dedup.phash_near_pairs(hashes, 3))
    brute = {(i, j) for i in range(len(hashes)) for j in range(i + 1, len(hashes))
             if hamming(hashes[i], hashes[j]) <= 3}
    assert pairs == brute and len(brute) >= 50


def test_minhash_near_duplicates():
    texts = ["the quick brown fox jumps over the lazy dog near the river bank today",
             "the quick brown fox jumps over the lazy dog near the river bank tonight",
             "completely different words about distributed data processing with ray clusters"]
    sigs = np.stack([dedup.minhash(t, k=3) for t in texts])
    assert dedup.minhash_near_pairs(sigs, 0.5) == [(0, 1)]


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7, 0.9])
def test_minhash_recall_at_the_threshold(threshold):
    """Pairs of word sets with Jaccard ~= threshold (disjoint vocabularies across pairs): LSH (bands
    and rows from the threshold) returns >= 95% of the pairs whose signatures agree on >= threshold
    (a fixed 16 bands of 4 rows found 22% at 0.3, 86% at 0.5), and nothing else."""
    words = 60
    shared = round(2 * words * threshold / (1 + threshold))
    texts = []
    for p in range(200):
        vocab = [f"w{p}x{i}" for i in range(2 * words)]
        texts += [" ".join(vocab[:words]), " ".join(vocab[:shared] + vocab[words:2 * words - shared])]
    sigs = np.stack([dedup.minhash(t, k=1) for t in texts])
    estimate = (sigs[0::2] == sigs[1::2]).mean(1)
    want = {(2 * i, 2 * i + 1) for i in np.flatnonzero(estimate >= threshold)}
    found = set(dedup.minhash_near_pairs(sigs, threshold))
    assert len(want) >= 80 and found <= want and len(found) >= 0.95 * len(want), (len(found), len(want))
    bands, rows = dedup.lsh_params(threshold, 64)
    assert bands * rows <= 64 and 1 - (1 - threshold ** rows) ** bands >= 0.95  # candidate probability at t


# ------------------------------------------------------------------ audio
def wav_bytes(seconds=1.0, rate=22050, channels=2) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    tone[: len(t) // 2] = 0.0  # first half silent
    buf = io.BytesIO()
    sf.write(buf, np.stack([tone] * channels, 1), rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def test_wav_header_that_lies_is_rejected(tmp_path):
    data = wav_bytes()
    check_wav_header(data[:4096], len(data))  # the honest file passes
    with pytest.raises(AudioError, match="declares"):
        check_wav_header(data[:4096], 3000)  # sizes in the header exceed the file
    lying_rate = bytearray(data)
    lying_rate[22:24] = struct.pack("<H", 7)  # 7 channels, block align still says 2 x 16 bit
    with pytest.raises(AudioError, match="inconsistent"):
        check_wav_header(bytes(lying_rate[:4096]), len(lying_rate))
    p = tmp_path / "cut.wav"
    p.write_bytes(data[:3000])
    with pytest.raises(AudioError, match="declares"):
        process_audio(str(p), "wav", 3000, 16000, 40, -40.0, 60, 100)


def test_audio_features(tmp_path):
    p = tmp_path / "tone.wav"
    p.write_bytes(wav_bytes(seconds=2.0))
    r = process_audio(str(p), "wav", p.stat().st_size, 16000, 40, -40.0, 60, 300)
    assert r["duration_s"] == pytest.approx(2.0) and r["channels"] == 2 and r["source_rate"] == 22050
    assert r["silence_ratio"] == pytest.approx(0.5, abs=0.05)
    assert r["logmel"].shape == (300, 40) and r["logmel_mean"].shape == (40,)
    wave = to_mono_16k(np.ones((22050, 2), np.float32), 22050, 16000)
    assert len(wave) == 16000
    assert frame_db(np.full(1600, 1.0, np.float32), 16000).max() == pytest.approx(0.0, abs=1e-3)
    mel = log_mel(np.sin(2 * np.pi * 1000 * np.arange(16000) / 16000).astype(np.float32), 16000, 40)
    assert mel.shape[1] == 40 and abs(len(mel) - 98) <= 2


# ------------------------------------------------------------------ text
def test_encoding_detection_and_fallback():
    assert decode_text("hello wörld".encode(), ["utf-8", "gb18030", "cp1252"])[1] == "utf-8"
    assert decode_text("多模态数据处理".encode("gb18030"), ["utf-8", "gb18030", "cp1252"])[1] == "gb18030"
    assert decode_text("naïve café".encode("cp1252"), ["utf-8", "gb18030", "cp1252"]) == ("naïve café", "cp1252")
    assert decode_text("\ufeffbom".encode("utf-8"), ["cp1252"]) == ("bom", "utf-8-sig")
    with pytest.raises(TextError, match="binary"):
        decode_text(b"\x00\x01\x02abc", ["utf-8"])


ENCODINGS = ["utf-8", "gb18030", "cp1252"]  # the configured defaults


@pytest.mark.parametrize("text, encoding, detected", [
    ("멀티모달 데이터 처리: 이미지, 비디오, 오디오와 텍스트.\n분석형 데이터베이스 레이 클러스터.\n", "euc_kr", "cp949"),
    ("안녕하세요 세계", "euc_kr", "cp949"),
    ("多模態資料處理：影像、視訊、音訊與文字。\n", "big5", "big5"),
    ("マルチモーダルデータ処理：画像、動画、音声とテキスト。\n", "shift_jis", "cp932"),
])
def test_non_utf8_cjk_is_detected_not_read_as_gb18030(tmp_path, text, encoding, detected):
    data = text.encode(encoding)
    assert data.decode("gb18030") != text  # the old fallback decoded these bytes, wrongly, as Chinese
    p = tmp_path / "note.txt"
    p.write_bytes(data)
    (batch,) = list(TextReader(ENCODINGS)({"path": np.array([str(p)], dtype=object)}))
    assert batch["reason"][0] == "" and batch["text"][0] == normalize(text)
    assert batch["encoding"][0] == detected  # cp949/cp932: the supersets of EUC-KR/Shift-JIS


@pytest.mark.parametrize("text, encoding", [
    ("多模态数据处理：图像、视频、音频和文本。\n分析型数据库 Ray 集群。\n", "gb18030"),
    ("数据处理", "gb18030"),  # as valid EUC-KR: a tie the configured order breaks
    ("Café crème et pâtisserie à la française, déjà vu.", "cp1252"),  # also valid cp1250
    ("naïve café", "cp1252"),
])
def test_detection_ties_go_to_the_configured_encodings(text, encoding):
    assert decode_text(text.encode(encoding), ENCODINGS) == (text, encoding)
    assert decode_text(text.encode("utf-8"), ENCODINGS) == (text, "utf-8")


def test_normalize_and_script():
    assert normalize("  Ｈｅｌｌｏ\t\tworld \r\n\n\n\nbye\x07 ") == "Hello world\n\nbye"
    assert script_of("数据处理") == "han" and script_of("Привет мир") == "cyrillic"
    assert script_of("データ処理") == "kana" and script_of("123") == "none"


def test_jsonl_bad_lines_are_rejects_good_lines_kept(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text('{"text": "first good line"}\nnot json\n{"other": 1}\n{"text": "second good"}\n')
    (batch,) = list(TextReader(["utf-8"])({"path": np.array([str(p)], dtype=object)}))
    reasons = list(batch["reason"])
    assert reasons[0] == "" and reasons[3] == ""
    assert "invalid JSON" in reasons[1] and "no string field" in reasons[2]
    assert list(batch["record"]) == [1, 2, 3, 4] and batch["text"][3] == "second good"


# ------------------------------------------------------------------ video
def test_video_clips_follow_shot_changes(tmp_path):
    p = tmp_path / "v.mp4"
    w = cv2.VideoWriter(str(p), cv2.VideoWriter_fourcc(*"mp4v"), 10, (64, 48))
    for i in range(40):
        frame = np.full((48, 64, 3), (200, 30, 30) if i < 20 else (30, 200, 60), np.uint8)
        cv2.rectangle(frame, (i, 10), (i + 8, 18), (255, 255, 255), -1)
        w.write(frame)
    w.release()
    clips = list(iter_clips(str(p), "v.mp4", sample_fps=5, frame_size=32, frames_per_clip=3,
                            max_clip_s=1.5, shot_threshold=0.5, max_seconds=60))
    assert [c["shot"] for c in clips] == [0, 0, 1, 1]  # 2 shots, each split at 1.5 s
    assert clips[2]["start_s"] == pytest.approx(2.0) and clips[-1]["end_s"] == pytest.approx(4.0)
    assert all(c["frames"].shape == (3, 32, 32, 3) for c in clips)
    assert clips[0]["fps"] == 10 and (clips[0]["width"], clips[0]["height"]) == (64, 48)


# ------------------------------------------------------------------ embeddings
@pytest.mark.parametrize("modality,shape", [("images", (32, 32, 3)), ("video", (2, 32, 32, 3)),
                                            ("audio", (100, 40)), ("text", (16,))])
def test_embedder_is_deterministic_and_skips_rejected_rows(modality, shape):
    cfg = EmbedConfig(dim=16, layers=1, heads=2).model_dump()
    rng = np.random.default_rng(0)
    if modality == "text":
        x = np.array(["hello world", "多模态", "a b c"], dtype=object)
    elif modality == "audio":
        x = rng.normal(size=(3,) + shape).astype(np.float32)
    else:
        x = rng.integers(0, 255, (3,) + shape, dtype=np.uint8)
    column = {"images": "pixels", "video": "frames", "audio": "logmel", "text": "text"}[modality]
    outs = [Embedder(modality, cfg, shape, max_tokens=16)({column: x, "reason": np.array(["", "bad", ""], dtype=object)})
            for _ in range(2)]
    emb = outs[0]["embedding"]
    assert emb.shape == (3, 16) and emb.dtype == np.float32
    np.testing.assert_allclose(emb, outs[1]["embedding"], rtol=1e-5)  # same seed, same weights
    assert not emb[1].any() and emb[0].any() and not np.allclose(emb[0], emb[2])
    assert (column in outs[0]) == (modality == "text")  # model inputs are dropped, text is kept


def test_hash_tokenizer():
    ids, mask = hash_tokenize(["Hello world", "数据"], 5)
    assert ids.shape == (2, 5) and ids[0, 0] == 1 and mask.sum(1).tolist() == [3, 3]
    assert hash_tokenize(["hello"], 5)[0][0, 1] == ids[0, 1]  # case-insensitive, stable


# ------------------------------------------------------------------ sources
def test_listing_and_manifests(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from multimodal.config import MediaInput
    from multimodal.sources import list_files, read_manifest
    from pipelines.input import InputError

    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jpg").write_bytes(b"12345")
    (tmp_path / "a.txt").write_text("hi")
    (tmp_path / ".hidden.txt").write_text("x")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "c.txt").write_text("x")
    t = list_files(str(tmp_path) + "/")
    assert t.column("path").to_pylist() == [str(tmp_path / "a.txt"), str(tmp_path / "sub" / "b.jpg")]
    assert t.column("size").to_pylist() == [2, 5]
    with pytest.raises(FileNotFoundError, match="input not found"):
        list_files(str(tmp_path / "missing"))
    csv = tmp_path / "m.csv"
    csv.write_text(f"path\n{tmp_path / 'a.txt'}\n")
    assert read_manifest(MediaInput(path=str(csv))).files.column("size").to_pylist() == [-1]
    pq.write_table(pa.table({"path": ["/x.jpg"], "size": [7]}), tmp_path / "m.parquet")
    assert read_manifest(MediaInput(path=str(tmp_path / "m.parquet"))).files.to_pylist() == [{"path": "/x.jpg",
                                                                                                 "size": 7}]
    pq.write_table(pa.table({"file": ["x.jpg"]}), tmp_path / "bad.parquet")
    with pytest.raises(InputError, match="bad.parquet: no column 'path' for the required 'path'"):
        read_manifest(MediaInput(path=str(tmp_path / "bad.parquet")))


def test_encoder_from_a_local_path_and_dim_check(tmp_path):
    import torch
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    ViTModel(ViTConfig(image_size=32, patch_size=16, hidden_size=32, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=64)).save_pretrained(tmp_path / "vit")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "vit")
    cfg = EmbedConfig(model=str(tmp_path / "vit"), dim=32).model_dump()
    pixels = np.random.default_rng(0).integers(0, 255, (2, 32, 32, 3), dtype=np.uint8)
    out = Embedder("images", cfg, (32, 32, 3))({"pixels": pixels, "reason": np.array(["", ""], dtype=object)})
    assert out["embedding"].shape == (2, 32) and np.isfinite(out["embedding"]).all()
    with pytest.raises(ValueError, match="images.embed.dim is 64 .* set images.embed.dim=32"):
        Embedder("images", {**cfg, "dim": 64}, (32, 32, 3))


def test_long_video_streams_one_batch_per_clip(tmp_path):
    from multimodal.video import VideoDecoder

    p = tmp_path / "long.mp4"
    w = cv2.VideoWriter(str(p), cv2.VideoWriter_fourcc(*"mp4v"), 10, (32, 32))
    for i in range(100):  # 10 s, one shot
        w.write(np.full((32, 32, 3), 90 + i % 5, np.uint8))
    w.release()
    stage = VideoDecoder(sample_fps=2, frame_size=16, frames_per_clip=2, max_clip_s=2.0, shot_threshold=0.5,
                         max_seconds=60)
    batches = list(stage({"path": np.array([str(p), str(tmp_path / "missing.mp4")], dtype=object)}))
    assert len(batches) == 6 and all(len(b["path"]) == 1 for b in batches)  # 5 clips + 1 reject row
    assert [int(b["clip"][0]) for b in batches[:5]] == [0, 1, 2, 3, 4]
    assert batches[0]["frames"].shape == (1, 2, 16, 16, 3) and batches[4]["end_s"][0] == pytest.approx(10.0)
    assert batches[5]["reason"][0] and all(b["reason"][0] == "" for b in batches[:5])
