"""Bring your own data: a manifest in a user's shape (its own name for the path column, label and
metadata columns, relative paths, bad rows) mapped with ``input.columns``; its columns arrive on
the output rows made from each file, its bad rows in ``rejects`` with reasons. The column checks
happen before any cluster work. One run on the session cluster, into an ``oss://`` run folder."""
from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from multimodal.config import MediaInput, load
from multimodal.pipeline import reserved_names
from multimodal.sources import MANIFEST_SCHEMA, read_manifest
from multimodal.template import TEMPLATE
from pipelines.input import InputError, schema_markdown
from pipelines.io import join, read_table, write_bytes
from pipelines.testing import storage_run_dir


def jpeg(seed: int, w: int = 48, h: int = 40) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


# ------------------------------------------------------------------ without Ray
def test_a_users_manifest_is_mapped_carried_and_its_bad_rows_named(tmp_path):
    (tmp_path / "media").mkdir()
    pq.write_table(pa.table({
        "file_uri": ["media/a.jpg", "", "/abs/b.png", "media/a.jpg", "oss://bucket/c.wav"],
        "label": [3, 1, 5, 9, 2], "split": ["train", "test", "val", "val", "train"],
        "width": [48, 10, 20, 48, 0],            # an output column's name: carried as manifest_width
        "bytes": [None, None, 10, None, 7],
    }), tmp_path / "m.parquet")
    cfg = load(None, [f"input.path={tmp_path / 'm.parquet'}", "input.columns.path=file_uri",
                      "input.columns.size=bytes"])
    m = read_manifest(cfg.input, reserved_names(cfg))
    a = str(tmp_path / "media" / "a.jpg")  # relative to the manifest's folder
    assert m.files.to_pylist() == [{"path": a, "size": -1}, {"path": "/abs/b.png", "size": 10},
                                   {"path": "oss://bucket/c.wav", "size": 7}]
    assert [f.name for f in m.extra_fields()] == ["label", "split", "manifest_width"]
    assert m.carried(["oss://bucket/c.wav", a, a]).to_pylist() == [
        {"label": 2, "split": "train", "manifest_width": 0}, {"label": 3, "split": "train", "manifest_width": 48},
        {"label": 3, "split": "train", "manifest_width": 48}]
    where = str(tmp_path / "m.parquet")
    assert m.rows == 5 and m.rejects == [
        {"path": f"{where}#row=2", "modality": None, "stage": "manifest", "reason": "path (your 'file_uri') is empty"},
        {"path": f"{where}#row=4", "modality": None, "stage": "manifest",
         "reason": f"path {a} is listed again (first at {where}#row=1)"}]


def test_every_row_made_from_a_file_gets_its_manifest_row(tmp_path):
    from multimodal.pipeline import finalize_batch, output_schema

    (tmp_path / "m.csv").write_text("uri,label,source\n/v/a.mp4,cat,web\n/v/b.mp4,dog,cam\n")
    cfg = load(None, [f"input.path={tmp_path / 'm.csv'}", "input.columns.path=uri"])
    manifest = read_manifest(cfg.input, reserved_names(cfg))
    schema = output_schema(cfg, "video", manifest)
    assert schema.names[-3:] == ["embedding", "label", "source"]
    n = 4  # three clips of b.mp4 and one of a.mp4, plus a failed row
    batch = {"path": np.array(["/v/b.mp4", "/v/a.mp4", "/v/b.mp4", "/v/a.mp4", "/v/b.mp4"], object),
             "reason": np.array(["", "", "", "cannot open video", ""], object),
             "embedding": np.ones((n + 1, 64), np.float32)}
    for f in schema:
        if f.name not in batch and f.name not in ("label", "source"):
            batch[f.name] = np.zeros(n + 1, np.float32 if pa.types.is_floating(f.type) else np.int32)
    out = finalize_batch(batch, schema, None, manifest)
    assert out.select(["path", "label", "source"]).to_pylist() == [
        {"path": "/v/b.mp4", "label": "dog", "source": "cam"}, {"path": "/v/a.mp4", "label": "cat", "source": "web"},
        {"path": "/v/b.mp4", "label": "dog", "source": "cam"}, {"path": "/v/b.mp4", "label": "dog", "source": "cam"}]


def test_a_manifest_in_mysql(mysql_url):
    from pipelines.io import mysql_connect

    conn = mysql_connect(mysql_url)
    with conn.cursor() as cur:
        cur.execute("DROP TABLE IF EXISTS adbray_mm_manifest")
        cur.execute("CREATE TABLE adbray_mm_manifest (uri VARCHAR(200), label INT, source VARCHAR(20))")
        cur.execute("INSERT INTO adbray_mm_manifest VALUES ('oss://b/x.jpg', 4, 'cam'), ('', 1, 'web')")
    conn.commit()
    conn.close()
    m = read_manifest(MediaInput(path=mysql_url, table="adbray_mm_manifest", columns={"path": "uri"}))
    assert m.files.column("path").to_pylist() == ["oss://b/x.jpg"]
    assert m.carried(["oss://b/x.jpg"]).to_pylist() == [{"label": 4, "source": "cam"}]
    assert [(r["path"], r["reason"]) for r in m.rejects] == [
        (f"{mysql_url} table adbray_mm_manifest#row=2", "path (your 'uri') is empty")]


def test_a_missing_path_column_is_one_line_before_any_cluster_work(tmp_path, capsys, monkeypatch):
    manifest = tmp_path / "labels.csv"
    manifest.write_text("file_uri,label\nimg/a.jpg,3\n")
    monkeypatch.setattr(type(TEMPLATE), "connect", lambda *a, **k: pytest.fail("connected"))
    for args, expect in [
        ([], (f"input.path {manifest}: no column 'path' for the required 'path'; map yours with "
             "--set input.columns.path=YOUR_COLUMN (columns there: file_uri, label)")),
        (["--set", "input.columns.path=uri"], (f"input.path {manifest}: no column 'uri' for the required 'path' "
                                              "(your 'uri', from input.columns)")),
        (["--set", "input.columns.label=cls"], "input.columns maps 'label', which is not a column"),
        (["--set", "source.manifest=x.csv"], "source.input and source.manifest are now input.path (--input)"),
    ]:
        code = TEMPLATE.main(["--input", str(manifest), "--run-dir", str(tmp_path / "run"), *args])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and expect in err[0], err
    assert not (tmp_path / "run").exists()


def test_a_folder_of_media_is_not_checked_as_a_table(tmp_path):
    (tmp_path / "a.jpg").write_bytes(jpeg(0))
    TEMPLATE.check_inputs(load(None, [f"input.path={tmp_path}"]))  # no columns to check: no error
    assert TEMPLATE.inputs == {"path": MANIFEST_SCHEMA}
    cfg = load(None, [f"input.path={tmp_path}", "input.format=parquet"])  # format set: a manifest folder
    with pytest.raises(InputError, match="cannot read it as parquet"):
        TEMPLATE.check_inputs(cfg)


def test_the_guide_shows_the_manifest_schema():
    from pathlib import Path

    guide = (Path(__file__).resolve().parents[2] / "docs" / "multimodal.md").read_text()
    assert schema_markdown(MANIFEST_SCHEMA) in guide


# ------------------------------------------------------------------ on the cluster
def test_labels_arrive_on_the_output_rows_and_bad_rows_in_rejects(adbray_run_dir, capsys):
    data = storage_run_dir("multimodal-your-data")
    good = {f"media/cat_{i}.jpg": jpeg(i) for i in range(3)}
    for name, body in {**good, "media/corrupt.jpg": jpeg(9)[:300],
                       "notes/qa.jsonl": b'{"text": "first record"}\n{"text": "second record here"}\n'}.items():
        write_bytes(join(data, name), body)
    absolute = join(data, "media/cat_2.jpg")  # one absolute URI among relative paths
    rows = [("media/cat_0.jpg", 0, "train", "web"), ("media/cat_1.jpg", 1, "train", "cam"),
            (absolute, 2, "test", "web"), ("", 5, "train", "web"), ("media/missing.jpg", 6, "val", "cam"),
            ("media/corrupt.jpg", 7, "val", "web"), ("notes/qa.jsonl", 8, "test", "forum")]
    csv = "file_uri,label,split,source\n" + "".join(f"{p},{lab},{s},{src}\n" for p, lab, s, src in rows)
    manifest = write_bytes(join(data, "manifest.csv"), csv.encode())
    code = TEMPLATE.main(["--input", manifest, "--set", "input.columns.path=file_uri", "--run-dir", adbray_run_dir,
                          "--set", "modalities=[images,text]", "--set", "text.embed.enabled=false"])
    s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0, s
    expect = {join(data, p) if not p.startswith("oss://") else p: (lab, split, src) for p, lab, split, src in rows}

    images = read_table(s["outputs"]["images"]).to_pylist()
    assert sorted(r["path"] for r in images) == sorted(join(data, p) for p in good)
    for r in images:  # the manifest's columns, on the row made from that file, beside its embedding
        assert (r["label"], r["split"], r["source"]) == expect[r["path"]], r
        assert len(r["embedding"]) == 64 and any(r["embedding"])
    text = read_table(s["outputs"]["text"]).to_pylist()
    assert len(text) == 2 and all((r["label"], r["split"], r["source"]) == (8, "test", "forum") for r in text)
    for m in ("video", "audio"):  # no files: empty, same columns
        assert read_table(s["outputs"][m]).schema.names[-3:] == ["label", "split", "source"]

    rejects = {r["path"]: r for r in read_table(s["outputs"]["rejects"]).to_pylist()}
    assert set(rejects) == {f"{manifest}#row=4", join(data, "media/missing.jpg"), join(data, "media/corrupt.jpg")}
    assert (rejects[f"{manifest}#row=4"]["stage"], rejects[f"{manifest}#row=4"]["reason"]) == \
        ("manifest", "path (your 'file_uri') is empty")
    missing = rejects[join(data, "media/missing.jpg")]
    assert missing["stage"] == "route" and missing["reason"].startswith("cannot read"), missing
    corrupt = rejects[join(data, "media/corrupt.jpg")]
    assert (corrupt["modality"], corrupt["stage"]) == ("images", "decode"), corrupt
    assert corrupt["reason"].startswith("cannot decode image"), corrupt
    assert s["rejects"] == 3 and (s["metrics"]["files"], s["metrics"]["rejected_files"]) == (7, 3)
