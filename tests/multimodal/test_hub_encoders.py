"""A pretrained (non-builtin) encoder gets its own preprocessing and its own pooling: the Embedder's
vectors equal plain transformers called with the model's processor outputs. Tiny models are built
from config classes and saved into local folders here (no network)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from multimodal.audio import AudioDecoder
from multimodal.config import EmbedConfig
from multimodal.embed import Embedder, pooling_of

SMALL = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32}
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "cats", "and", "dogs", "run"]
TEXTS = ["hello world", "cats and dogs run", "dogs"]


@pytest.fixture(autouse=True)
def fp32_on_cpu(monkeypatch):
    """What is compared is preprocessing and pooling: in fp32 on the CPU, also on a CUDA machine."""
    monkeypatch.setattr("multimodal.embed.pick_device_dtype", lambda setting: ("cpu", torch.float32))


def good(n: int) -> np.ndarray:
    return np.array([""] * n, dtype=object)


def cfg(path, **kw) -> dict:
    return EmbedConfig(model=str(path), dim=16, **kw).model_dump()


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    """A tiny ViT with a pooler and an image processor whose size and mean/std are not the builtin's."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    path = tmp_path_factory.mktemp("vit")
    torch.manual_seed(0)
    ViTModel(ViTConfig(image_size=32, patch_size=16, **SMALL)).save_pretrained(path)
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.2, 0.4, 0.6],
                      image_std=[0.3, 0.2, 0.1]).save_pretrained(path)
    return path


def bert(folder, pooling: dict | None):
    """A tiny BERT (with a pooler) and its WordPiece tokenizer; ``pooling``: a sentence-transformers
    Pooling config written with modules.json (Transformer, Pooling, Normalize), or none."""
    from transformers import BertConfig, BertModel, BertTokenizer

    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(WORDS), max_position_embeddings=32, **SMALL)).save_pretrained(folder)
    (folder / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    BertTokenizer(str(folder / "vocab.txt")).save_pretrained(folder)
    if pooling is not None:
        (folder / "1_Pooling").mkdir()
        (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 16, **pooling}))
        (folder / "modules.json").write_text(json.dumps([
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    return folder


def plain(path):
    from transformers import AutoModel, AutoTokenizer

    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def test_images_and_video_get_the_model_image_processor(vit):
    from transformers import AutoImageProcessor, AutoModel

    pixels = np.random.default_rng(0).integers(0, 255, (3, 48, 48, 3), dtype=np.uint8)
    got = Embedder("images", cfg(vit), (48, 48, 3))({"pixels": pixels, "reason": good(3)})["embedding"]
    model, proc = AutoModel.from_pretrained(vit).eval(), AutoImageProcessor.from_pretrained(vit)
    with torch.inference_mode():
        want = model(**proc(images=list(pixels), return_tensors="pt")).pooler_output.numpy()
        crop = torch.from_numpy(pixels[:, 8:40, 8:40]).permute(0, 3, 1, 2).float() / 127.5 - 1
        hand_made = model(pixel_values=crop).pooler_output.numpy()  # the builtin's [-1, 1] scaling
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert not np.allclose(got, hand_made, atol=1e-3)
    clips = pixels[None].repeat(2, 0)  # 2 clips of 3 frames: the mean of the frame embeddings
    video = Embedder("video", cfg(vit), (3, 48, 48, 3))({"frames": clips, "reason": good(2)})["embedding"]
    np.testing.assert_allclose(video, want.mean(0, keepdims=True).repeat(2, 0), rtol=1e-4, atol=1e-5)


def test_pixels_at_the_model_size_are_scaled_on_the_device_as_the_processor_would(vit):
    """Once the first batch shows the processor only rescales and normalises (no resize or crop
    left to do), later batches skip its per-image CPU work: the same vectors, without it."""
    from transformers import AutoImageProcessor, AutoModel

    rng = np.random.default_rng(1)
    model, proc = AutoModel.from_pretrained(vit).eval(), AutoImageProcessor.from_pretrained(vit)
    at_size = Embedder("images", cfg(vit), (32, 32, 3))
    for _ in range(2):
        pixels = rng.integers(0, 255, (4, 32, 32, 3), dtype=np.uint8)
        got = at_size({"pixels": pixels, "reason": good(4)})["embedding"]
        with torch.inference_mode():
            want = model(**proc(images=list(pixels), return_tensors="pt")).pooler_output.numpy()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert at_size.scaling and at_size.scaling[1] == pytest.approx([0.2, 0.4, 0.6])
    larger = Embedder("images", cfg(vit), (48, 48, 3))
    larger({"pixels": rng.integers(0, 255, (2, 48, 48, 3), dtype=np.uint8), "reason": good(2)})
    assert larger.scaling is False  # a resize is left to do: the processor keeps doing it


def test_text_cls_then_l2_when_the_sentence_transformers_config_says_so(tmp_path):
    folder = bert(tmp_path / "bge", {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False})
    assert pooling_of(str(folder), "text") == ("cls", True)
    got = Embedder("text", cfg(folder), (16,), max_tokens=16)({"text": np.array(TEXTS, dtype=object),
                                                               "reason": good(3)})["embedding"]
    model, tok = plain(folder)
    with torch.inference_mode():
        out = model(**tok(TEXTS, padding=True, return_tensors="pt"))
    cls = torch.nn.functional.normalize(out.last_hidden_state[:, 0], dim=-1).numpy()
    np.testing.assert_allclose(got, cls, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)
    assert not np.allclose(got, out.pooler_output.numpy(), atol=1e-3)  # not BERT's pooler head


def test_text_mean_pooling_otherwise_and_the_override(tmp_path):
    folder = bert(tmp_path / "plain", None)
    assert pooling_of(str(folder), "text") == ("mean", False)
    batch = {"text": np.array(TEXTS, dtype=object), "reason": good(3)}
    got = Embedder("text", cfg(folder), (16,), max_tokens=16)(dict(batch))["embedding"]
    model, tok = plain(folder)
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    np.testing.assert_allclose(got, ((hidden * mask).sum(1) / mask.sum(1)).numpy(), rtol=1e-4, atol=1e-5)
    forced = Embedder("text", cfg(folder, pooling="cls", normalize=True), (16,), max_tokens=16)(dict(batch))
    np.testing.assert_allclose(forced["embedding"], torch.nn.functional.normalize(hidden[:, 0], dim=-1).numpy(),
                               rtol=1e-4, atol=1e-5)


def test_audio_gets_the_model_feature_extractor_over_the_wave(tmp_path):
    import soundfile as sf
    from transformers import (
        AutoFeatureExtractor,
        AutoModel,
        Wav2Vec2Config,
        Wav2Vec2FeatureExtractor,
        Wav2Vec2Model,
    )

    folder = tmp_path / "w2v"
    torch.manual_seed(0)
    Wav2Vec2Model(Wav2Vec2Config(conv_dim=(8, 8), conv_kernel=(10, 3), conv_stride=(5, 2), num_conv_pos_embeddings=16,
                                 num_conv_pos_embedding_groups=2, **SMALL)).save_pretrained(folder)
    Wav2Vec2FeatureExtractor(sampling_rate=16000, do_normalize=True).save_pretrained(folder)
    t = np.arange(8000) / 8000  # 1 s at 8 kHz: the decoder resamples to 16 kHz
    paths = []
    for i, f in enumerate((220, 440)):
        paths.append(str(tmp_path / f"t{i}.wav"))
        sf.write(paths[-1], (0.3 * np.sin(2 * np.pi * f * t)).astype(np.float32), 8000)
    decoded = AudioDecoder(16000, 40, -40.0, 60, 0.5, model_input="wave")(
        {"path": np.array(paths, dtype=object), "format": np.array(["wav"] * 2, dtype=object),
         "size": np.array([(tmp_path / f"t{i}.wav").stat().st_size for i in range(2)])})
    assert decoded["wave"].shape == (2, 8000) and "logmel" not in decoded and list(decoded["reason"]) == ["", ""]
    waves = decoded["wave"].copy()
    got = Embedder("audio", cfg(folder), (8000,), sample_rate=16000)(decoded)["embedding"]
    model, fe = AutoModel.from_pretrained(folder).eval(), AutoFeatureExtractor.from_pretrained(folder)
    inputs = fe(list(waves), sampling_rate=16000, return_tensors="pt")
    assert not np.allclose(inputs["input_values"].numpy(), waves, atol=1e-3)  # its own normalisation
    with torch.inference_mode():
        want = model(**inputs).last_hidden_state.mean(1).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_a_model_without_its_processor_is_one_clear_error(tmp_path):
    from transformers import ViTConfig, ViTModel

    ViTModel(ViTConfig(image_size=32, patch_size=16, **SMALL)).save_pretrained(tmp_path / "bare")
    with pytest.raises(ValueError, match="images.embed.model .* has no ImageProcessor of its own"):
        Embedder("images", cfg(tmp_path / "bare"), (32, 32, 3))
