"""End to end on the shared session cluster: the generated sample (with broken files) through
``python -m multimodal`` (``TEMPLATE.main``); then a manifest re-run into the same folder, the
reject-ratio failure, and a step whose input is missing."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from multimodal.config import SampleConfig
from multimodal.sample import generate
from multimodal.template import TEMPLATE

BROKEN = {"truncated.jpg": ("images", "decode", "truncated"),
          "not_really.jpg": ("images", "route", "content is text"),
          "empty.png": ("images", "route", "empty file"),
          "corrupt.mp4": ("video", "decode", "cannot open video"),
          "lying_header.wav": ("audio", "decode", "header declares")}


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("mm-sample"), SampleConfig(images=6, videos=2, audio=3, texts=4))


@pytest.fixture(scope="module")
def first_run(ray_connected, sample, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("mm-run")
    capture = pytest.MonkeyPatch()
    import io
    import sys

    buf = io.StringIO()
    capture.setattr(sys, "stdout", buf)
    try:
        code = TEMPLATE.main(["--input", sample["root"], "--run-dir", str(run_dir)])
    finally:
        capture.undo()
    assert code == 0, buf.getvalue()[-2000:]
    return last_json(buf.getvalue())


def test_summary_contract(first_run, sample):
    s = first_run
    assert s["template"] == "multimodal" and s["steps"] == ["process"]  # --input given: no sample step
    assert set(s["outputs"]) == {"images", "video", "audio", "text", "rejects"}
    total = sum(len(v) for v in sample["good"].values()) + len(sample["broken"])
    m = s["metrics"]
    assert m["files"] == total and m["rejected_files"] == len(BROKEN) and s["rejects"] >= len(BROKEN)
    assert isinstance(s["rows"], int) and s["rows"] == sum(m["rows"].values()) > 0  # per modality in metrics
    assert set(m["rows"]) == {"images", "video", "audio", "text"}
    assert m["files_per_s"] > 0 and set(m["throughput"]) >= {"route", "images", "video", "audio", "text"}
    assert m["duplicates"]["images"]["exact"] == 1 and m["duplicates"]["images"]["near"] == 1
    assert m["duplicates"]["text"]["exact"] == 1 and m["duplicates"]["text"]["near"] >= 1


def test_every_broken_file_is_rejected_with_a_reason(first_run):
    rejects = pq.read_table(first_run["outputs"]["rejects"]).to_pylist()
    by_name = {r["path"].rsplit("/", 1)[-1]: r for r in rejects}
    for name, (modality, stage, text) in BROKEN.items():
        r = by_name[name]
        assert (r["modality"], r["stage"]) == (modality, stage) and text in r["reason"].lower(), r


def test_every_good_file_is_in_its_output(first_run, sample):
    for modality, paths in sample["good"].items():
        table = pq.read_table(first_run["outputs"][modality])
        assert set(paths) <= set(table.column("path").to_pylist()), modality
        emb = table.schema.field("embedding").type
        assert pa.types.is_fixed_size_list(emb) and emb.value_type == pa.float32()
        values = table.column("embedding").combine_chunks().flatten().to_numpy()
        assert values.size == table.num_rows * emb.list_size and abs(values).sum() > 0
    images = pq.read_table(first_run["outputs"]["images"]).to_pylist()
    assert len(images) == len(sample["good"]["images"])
    by_name = {r["path"].rsplit("/", 1)[-1]: r for r in images}
    assert by_name["photo_000_copy.jpg"]["dup_kind"] == "exact"
    assert by_name["photo_000_small.jpg"]["dup_kind"] == "near"
    assert by_name["photo_000_copy.jpg"]["dup_group"] == by_name["photo_000.jpg"]["dup_group"]
    assert by_name["photo_000.jpg"]["dup_of"] is None
    assert by_name["blurry.jpg"]["blur"] < min(r["blur"] for n, r in by_name.items() if n.startswith("photo"))
    video = pq.read_table(first_run["outputs"]["video"]).to_pylist()
    assert sorted(r["shot"] for r in video if r["path"].endswith("clip_00.mp4")) == [0, 1]
    audio = pq.read_table(first_run["outputs"]["audio"]).to_pylist()
    assert all(0 < r["silence_ratio"] < 1 and r["duration_s"] > 1 for r in audio)
    text = pq.read_table(first_run["outputs"]["text"]).to_pylist()
    encodings = {r["path"].rsplit("/", 1)[-1]: r["encoding"] for r in text}
    assert encodings["note_zh.txt"] == "gb18030" and encodings["note_fr.txt"] == "cp1252"


def test_manifest_rerun_overwrites(first_run, sample, tmp_path, capsys):
    run_dir = first_run["run_dir"]
    images = sample["good"]["images"] + [p for p in sample["broken"] if "/images/" in p]
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("path\n" + "\n".join(images) + "\n")
    code = TEMPLATE.main(["--manifest", str(manifest), "--run-dir", run_dir, "--set", "modalities=[images]",
                 "--set", "images.embed.enabled=false"])
    s = last_json(capsys.readouterr().out)
    assert code == 0 and s["metrics"]["files"] == len(images)
    table = pq.read_table(s["outputs"]["images"])
    assert table.num_rows == len(sample["good"]["images"])  # replaced, not appended
    assert table.column("embedding").null_count == table.num_rows  # embedding stage was off
    assert pq.read_table(s["outputs"]["video"]).num_rows == 0
    assert len(pq.read_table(s["outputs"]["rejects"])) == 3


def test_bad_config_is_one_line_error(capsys):
    assert TEMPLATE.main(["--set", "images.size=0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "images.size" in err[0]


def test_too_many_rejects_fail_in_one_line_after_writing(ray_connected, sample, tmp_path, capsys):
    images = sample["good"]["images"][:1] + [p for p in sample["broken"] if "/images/" in p]
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("path\n" + "\n".join(images) + "\n")
    run_dir = tmp_path / "run"
    code = TEMPLATE.main(["--manifest", str(manifest), "--run-dir", str(run_dir), "--set", "modalities=[images]",
                          "--set", "images.embed.enabled=false", "--set", "max_reject_ratio=0.5"])
    out, err = capsys.readouterr()
    err = err.strip().splitlines()  # Ray Data may log above the error
    assert code == 1 and [line for line in err if line.startswith("error:")] == err[-1:], err
    assert err[-1].startswith("error: step process: 3 of 4 files rejected, above max_reject_ratio 0.5"), err
    assert len(pq.read_table(run_dir / "rejects")) == 3 and pq.read_table(run_dir / "images").num_rows == 1
    summary = json.loads(out.strip().splitlines()[-1])  # the summary is still printed, with the failure
    assert summary["rejects"] == 3 and summary["failure"].startswith("step process: 3 of 4")


def test_process_without_an_input_or_a_sample_is_one_line_before_ray(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-m", "multimodal", "process", "--run-dir", str(tmp_path / "empty")],
                          check=False, capture_output=True, text=True, env=env, timeout=120)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(err) == 1 and "reads sample" in err[0], err
