"""End to end on the shared session cluster (isolated worker disks, the OSS stand-in): the
generated sample (with broken files, written to the object store) through ``python -m
multimodal`` (``TEMPLATE.main``) with an ``oss://`` run folder; then a manifest re-run into the
same folder, the reject-ratio failure, the refusals of local folders, and a step whose input is
missing."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from collections import Counter

import pyarrow as pa
import pytest

from multimodal.config import SampleConfig
from multimodal.pipeline import reason_class
from multimodal.report import MAX_GROUPS, MAX_MEMBERS, PLOTS
from multimodal.sample import generate
from multimodal.template import TEMPLATE
from pipelines.io import exists, join, list_files, read_bytes, read_json, read_table, write_bytes
from pipelines.testing import local_run_traces, storage_run_dir

BROKEN = {"truncated.jpg": ("images", "decode", "truncated"),
          "not_really.jpg": ("images", "route", "content is text"),
          "empty.png": ("images", "route", "empty file"),
          "corrupt.mp4": ("video", "decode", "cannot open video"),
          "lying_header.wav": ("audio", "decode", "header declares")}


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def storage(ray_connected):
    """A fresh prefix on the cluster's object storage for this module."""
    return storage_run_dir("multimodal-e2e")


@pytest.fixture(scope="module")
def sample(storage):
    return generate(join(storage, "sample"), SampleConfig(images=6, videos=2, audio=3, texts=5))


@pytest.fixture(scope="module")
def first_run(sample, storage):
    run_dir = join(storage, "run")
    before = local_run_traces()
    capture = pytest.MonkeyPatch()
    import io

    buf = io.StringIO()
    capture.setattr(sys, "stdout", buf)
    try:
        code = TEMPLATE.main(["--input", sample["root"], "--run-dir", run_dir])
    finally:
        capture.undo()
    assert code == 0, buf.getvalue()[-2000:]
    return {**last_json(buf.getvalue()), "new_local_runs": local_run_traces() - before}


def test_outputs_are_in_the_object_store_and_nothing_local(first_run, sample):
    s = first_run
    assert s["run_dir"].startswith("oss://") and all(v.startswith("oss://") for v in s["outputs"].values())
    assert s["new_local_runs"] == set()  # nothing under the driver's run-folder root
    rows = {m: read_table(s["outputs"][m]).num_rows for m in ("images", "video", "audio", "text")}
    assert rows == s["metrics"]["rows"] and rows["images"] == len(sample["good"]["images"])
    assert read_table(s["outputs"]["rejects"]).num_rows == s["rejects"]
    assert read_json(join(s["run_dir"], "summary.json"))["run_dir"] == s["run_dir"]
    assert read_json(join(s["run_dir"], "run.json"))["outputs"] == s["outputs"]
    assert not exists(join(s["run_dir"], "_staging"))  # pass-1 staging removed


def test_summary_contract(first_run, sample):
    s = first_run
    assert s["template"] == "multimodal" and s["steps"] == ["process"]  # --input given: no sample step
    assert set(s["outputs"]) == {"images", "video", "audio", "text", "rejects", *PLOTS}
    total = sum(len(v) for v in sample["good"].values()) + len(sample["broken"])
    m = s["metrics"]
    assert m["files"] == total and m["rejected_files"] == len(BROKEN) and s["rejects"] >= len(BROKEN)
    assert isinstance(s["rows"], int) and s["rows"] == sum(m["rows"].values()) > 0  # per modality in metrics
    assert set(m["rows"]) == {"images", "video", "audio", "text"}
    assert m["files_per_s"] > 0 and set(m["throughput"]) >= {"route", "images", "video", "audio", "text"}
    assert m["duplicates"]["images"]["exact"] == 1 and m["duplicates"]["images"]["near"] == 1
    assert m["duplicates"]["text"]["exact"] == 1 and m["duplicates"]["text"]["near"] >= 1


def test_every_broken_file_is_rejected_with_a_reason(first_run):
    rejects = read_table(first_run["outputs"]["rejects"]).to_pylist()
    by_name = {r["path"].rsplit("/", 1)[-1]: r for r in rejects}
    for name, (modality, stage, text) in BROKEN.items():
        r = by_name[name]
        assert (r["modality"], r["stage"]) == (modality, stage) and text in r["reason"].lower(), r


def test_every_good_file_is_in_its_output(first_run, sample):
    for modality, paths in sample["good"].items():
        table = read_table(first_run["outputs"][modality])
        assert set(paths) <= set(table.column("path").to_pylist()), modality
        emb = table.schema.field("embedding").type
        assert pa.types.is_fixed_size_list(emb) and emb.value_type == pa.float32()
        values = table.column("embedding").combine_chunks().flatten().to_numpy()
        assert values.size == table.num_rows * emb.list_size and abs(values).sum() > 0
    images = read_table(first_run["outputs"]["images"]).to_pylist()
    assert len(images) == len(sample["good"]["images"])
    by_name = {r["path"].rsplit("/", 1)[-1]: r for r in images}
    assert by_name["photo_000_copy.jpg"]["dup_kind"] == "exact"
    assert by_name["photo_000_small.jpg"]["dup_kind"] == "near"
    assert by_name["photo_000_copy.jpg"]["dup_group"] == by_name["photo_000.jpg"]["dup_group"]
    assert by_name["photo_000.jpg"]["dup_of"] is None
    assert by_name["blurry.jpg"]["blur"] < min(r["blur"] for n, r in by_name.items() if n.startswith("photo"))
    video = read_table(first_run["outputs"]["video"]).to_pylist()
    assert sorted(r["shot"] for r in video if r["path"].endswith("clip_00.mp4")) == [0, 1]
    audio = read_table(first_run["outputs"]["audio"]).to_pylist()
    assert all(0 < r["silence_ratio"] < 1 and r["duration_s"] > 1 for r in audio)
    text = read_table(first_run["outputs"]["text"]).to_pylist()
    by_name = {r["path"].rsplit("/", 1)[-1]: r for r in text}
    assert by_name["note_zh.txt"]["encoding"] == "gb18030" and by_name["note_fr.txt"]["encoding"] == "cp1252"
    assert (by_name["note_ko.txt"]["encoding"], by_name["note_ko.txt"]["script"]) == ("cp949", "hangul")  # EUC-KR
    assert by_name["note_ko.txt"]["text"].startswith("멀티모달 데이터 처리")


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", data[:16]
    return struct.unpack(">II", data[16:24])


def test_plots_are_pngs_drawn_from_the_summary(first_run, sample):
    s, m = first_run, first_run["metrics"]
    plots = {k: v for k, v in s["outputs"].items() if k.startswith("plot_")}
    assert sorted(plots) == sorted(PLOTS) and all(v.startswith(s["run_dir"] + "/") for v in plots.values())
    sizes = {k: png_size(read_bytes(v)) for k, v in plots.items()}  # read back from the object store
    rejects = read_table(s["outputs"]["rejects"]).to_pylist()
    assert sum(m["rejects_by_reason"].values()) == s["rejects"] == len(rejects)  # plot_rejects' bars
    assert Counter(f"{r['stage']}: {reason_class(r['reason'])}" for r in rejects) == m["rejects_by_reason"]
    broken = Counter(BROKEN[p.rsplit("/", 1)[-1]][0] for p in sample["broken"])
    assert m["files_in_by_modality"] == {k: len(v) + broken[k] for k, v in sample["good"].items()}  # plot_files
    assert sum(m["files_in_by_modality"].values()) == m["files"]
    kept = {k: len(set(read_table(s["outputs"][k], ["path"]).column("path").to_pylist())) for k in sample["good"]}
    assert m["files_kept_by_modality"] == kept == {k: len(v) for k, v in sample["good"].items()}
    images = read_table(s["outputs"]["images"], ["dup_group"]).column("dup_group").to_pylist()
    groups = sorted(n for n in Counter(images).values() if n > 1)  # plot_duplicates: a row per group
    assert len(groups) == m["duplicates"]["images"]["groups_with_duplicates"] == 1
    rows, cols = min(len(groups), MAX_GROUPS), min(max(groups), MAX_MEMBERS)
    assert sizes["plot_duplicates"] == (200 * cols, 200 * rows) == (600, 200)  # 2-inch cells at 100 dpi


def test_manifest_rerun_overwrites(first_run, sample, storage, capsys):
    run_dir = first_run["run_dir"]
    images = sample["good"]["images"] + [p for p in sample["broken"] if "/images/" in p]
    manifest = write_bytes(join(storage, "manifest.csv"), ("path\n" + "\n".join(images) + "\n").encode())
    code = TEMPLATE.main(["--manifest", manifest, "--run-dir", run_dir, "--set", "modalities=[images]",
                 "--set", "images.embed.enabled=false"])
    s = last_json(capsys.readouterr().out)
    assert code == 0 and s["metrics"]["files"] == len(images)
    table = read_table(s["outputs"]["images"])
    assert table.num_rows == len(sample["good"]["images"])  # replaced, not appended
    assert table.column("embedding").null_count == table.num_rows  # embedding stage was off
    assert read_table(s["outputs"]["video"]).num_rows == 0
    assert len(read_table(s["outputs"]["rejects"])) == 3


def test_bad_config_is_one_line_error(capsys):
    assert TEMPLATE.main(["--set", "images.size=0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "images.size" in err[0]


def test_too_many_rejects_fail_in_one_line_after_writing(sample, adbray_run_dir, tmp_path, capsys):
    images = sample["good"]["images"][:1] + [p for p in sample["broken"] if "/images/" in p]
    manifest = tmp_path / "manifest.csv"  # a manifest on the driver's disk: only the driver reads it
    manifest.write_text("path\n" + "\n".join(images) + "\n")
    run_dir = adbray_run_dir
    code = TEMPLATE.main(["--manifest", str(manifest), "--run-dir", run_dir, "--set", "modalities=[images]",
                          "--set", "images.embed.enabled=false", "--set", "input.max_reject_ratio=0.5"])
    out, err = capsys.readouterr()
    err = err.strip().splitlines()  # Ray Data may log above the error
    assert code == 1 and [line for line in err if line.startswith("error:")] == err[-1:], err
    assert err[-1].startswith("error: step process: 3 of 4 files rejected, above input.max_reject_ratio 0.5"), err
    assert len(read_table(join(run_dir, "rejects"))) == 3 and read_table(join(run_dir, "images")).num_rows == 1
    summary = json.loads(out.strip().splitlines()[-1])  # the summary is still printed, with the failure
    assert summary["rejects"] == 3 and summary["failure"].startswith("step process: 3 of 4")


def test_sample_step_writes_into_a_remote_run_folder(adbray_run_dir, capsys):
    before = local_run_traces()
    code = TEMPLATE.main(["sample", "--run-dir", adbray_run_dir, *(f"--set=sample.{k}=1" for k in
                                                                    ("images", "videos", "audio", "texts"))])
    s = last_json(capsys.readouterr().out)
    folder = join(adbray_run_dir, "sample")
    assert code == 0 and s["outputs"] == {"sample": folder}, s
    assert read_json(join(adbray_run_dir, "run.json"))["outputs"] == {"sample": folder}  # what process reads
    names = {f.rsplit("/", 1)[-1] for f in list_files(folder)}
    assert {"photo_000.jpg", "clip_00.mp4", "speech_00.wav", "note_en.txt", *BROKEN} <= names
    assert len(names) == s["metrics"]["sample_files"] and local_run_traces() == before


def test_local_folders_are_refused_before_ray_on_isolated_disks(sample, adbray_run_dir, tmp_path, capsys):
    local_run = tmp_path / "run"
    cases = [(["--input", sample["root"], "--run-dir", str(local_run)], "--run-dir oss://"),
             (["--input", str(tmp_path), "--run-dir", adbray_run_dir], "--input oss://"),
             (["process", "--run-dir", adbray_run_dir], "reads sample")]
    for args, fix in cases:
        assert TEMPLATE.main(args) == 1, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and fix in err[0], err
    assert not local_run.exists() and not exists(adbray_run_dir) and not list_files(adbray_run_dir)


def test_process_without_an_input_or_a_sample_is_one_line_before_ray(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-m", "multimodal", "process", "--run-dir", str(tmp_path / "empty")],
                          check=False, capture_output=True, text=True, env=env, timeout=120)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(err) == 1 and "reads sample" in err[0], err


def test_encoder_loads_from_the_object_store(storage, tmp_path):
    """``embed.model`` may be an oss:// folder: each embedding actor copies it to its own node."""
    import numpy as np
    import torch
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    from multimodal.config import EmbedConfig
    from multimodal.embed import Embedder
    from pipelines.io import upload_dir

    torch.manual_seed(0)
    ViTModel(ViTConfig(image_size=32, patch_size=16, hidden_size=32, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=64)).save_pretrained(tmp_path / "vit")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "vit")
    remote = upload_dir(str(tmp_path / "vit"), join(storage, "models", "vit"))
    batch = {"pixels": np.random.default_rng(0).integers(0, 255, (2, 32, 32, 3), dtype=np.uint8),
             "reason": np.array(["", ""], dtype=object)}
    embed = {m: Embedder("images", EmbedConfig(model=m, dim=32).model_dump(), (32, 32, 3))(dict(batch))["embedding"]
             for m in (remote, str(tmp_path / "vit"))}
    assert embed[remote].shape == (2, 32) and np.array_equal(embed[remote], embed[str(tmp_path / "vit")])
