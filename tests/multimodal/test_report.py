"""The process step's plots (multimodal.report), without Ray: what each plot is drawn from, and
that the files are PNGs."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from multimodal import report
from multimodal.config import SampleConfig, load
from multimodal.sample import generate
from pipelines.io import read_bytes, write_table

PNG = b"\x89PNG\r\n\x1a\n"


def embeddings(n: int, dim: int, null: bool = False, seed: int = 0) -> pa.Table:
    typ = pa.list_(pa.float32(), dim)
    values = np.random.default_rng(seed).normal(size=n * dim).astype(np.float32)
    arr = pa.nulls(n, typ) if null else pa.FixedSizeListArray.from_arrays(pa.array(values), dim)
    return pa.table({"path": [f"p{i}" for i in range(n)], "embedding": arr})


def test_reject_bars_keep_every_reject():
    by_reason = {f"decode: reason number {i} " + "x" * 80: i + 1 for i in range(10)}
    bars = report.reject_bars(by_reason)
    assert sum(bars.values()) == sum(by_reason.values()) == 55
    assert len(bars) == report.MAX_REASONS + 1 and bars["other"] == 1 + 2 + 3 + 4 + 5 + 6  # the smallest
    assert list(bars.values())[:2] == [10, 9] and all(len(k) < 50 for k in bars)
    assert all(k.count("\n") <= 1 for k in bars), bars  # two short lines at most: labels must not overlap
    assert report.reject_bars({"route: empty file": 2}) == {"1. route: empty file": 2}
    five = report.reject_bars({f"reason {i}": 1 for i in range(report.MAX_REASONS + 1)})
    assert "other" not in five and len(five) == report.MAX_REASONS + 1  # no "other" for a single reason


def test_duplicate_groups_representative_first_and_bounded():
    dups = {"b.jpg": {"dup_group": 0, "dup_kind": "exact"}, "a.jpg": {"dup_group": 0, "dup_kind": None},
            "c.jpg": {"dup_group": 2, "dup_kind": None},  # a group of one: not shown
            **{f"d{i}.jpg": {"dup_group": 3, "dup_kind": None if i == 0 else "near"} for i in range(9)}}
    groups = report.duplicate_groups(dups)
    assert groups[0] == [("a.jpg", "first"), ("b.jpg", "exact")]
    assert len(groups) == 2 and len(groups[1]) == report.MAX_MEMBERS and groups[1][0] == ("d0.jpg", "first")
    many = {f"g{g}_{i}.jpg": {"dup_group": g, "dup_kind": None if i == 0 else "near"} for g in range(9) for i in range(2)}
    assert len(report.duplicate_groups(many)) == report.MAX_GROUPS


def test_embedding_projection_is_pca_by_modality(tmp_path, monkeypatch):
    x = np.random.default_rng(1).normal(size=(30, 8)) * [10, 3, 1, 1, 1, 1, 1, 1]  # variance on axes 0, 1
    typ = pa.list_(pa.float32(), 8)
    table = pa.table({"embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel().astype(np.float32)), 8)})
    outputs = {"images": write_table(table.slice(0, 20), str(tmp_path / "images")),
               "text": write_table(table.slice(20), str(tmp_path / "text")),
               "audio": write_table(pa.table({"embedding": pa.nulls(4, typ)}), str(tmp_path / "audio")),
               "video": write_table(pa.table({"embedding": pa.nulls(0, typ)}), str(tmp_path / "video"))}
    points = report.embedding_points(outputs)
    assert set(points) == {"images", "text"} and [len(points[m][0]) for m in points] == [20, 10]
    xy = np.concatenate([np.stack(points[m], 1) for m in points])
    centred = x - x.mean(0)
    assert np.allclose(np.abs(xy[:, 0]), np.abs(centred[:, 0]), atol=1.5)  # PC 1 ~ the widest axis
    assert xy[:, 0].var() > xy[:, 1].var() > 3 * centred[:, 2:].var(0).max()
    monkeypatch.setattr(report, "MAX_POINTS", 7)
    assert [len(v[0]) for v in report.embedding_points(outputs).values()] == [7, 7]
    mixed = {**outputs, "text": write_table(embeddings(5, 4), str(tmp_path / "text4"))}  # other size: padded
    assert [len(v[0]) for v in report.embedding_points(mixed).values()] == [7, 5]


def test_write_plots_draws_the_metrics_as_pngs(tmp_path, monkeypatch):
    sample = generate(str(tmp_path / "sample"), SampleConfig(images=2, videos=0, audio=0, texts=0, broken=False))
    photos = {p.rsplit("/", 1)[-1]: p for p in sample["good"]["images"]}
    groups = [[(photos["photo_000.jpg"], "first"), (photos["photo_000_copy.jpg"], "exact"),
               (str(tmp_path / "gone.jpg"), "near"), (photos["photo_000_small.jpg"], "near")]]
    outputs = {"images": write_table(embeddings(6, 8), str(tmp_path / "images")),
               "text": write_table(embeddings(3, 8, seed=1), str(tmp_path / "text"))}
    metrics = {"files_in_by_modality": {"images": 7, "video": 1, "audio": 0, "text": 3},
               "files_kept_by_modality": {"images": 6, "video": 0, "audio": 0, "text": 3},
               "rejects_by_reason": {"decode: cannot decode image": 1, "decode: cannot open video": 1},
               "duplicates": {"images": {"exact": 1, "near": 1, "groups_with_duplicates": 1}}}
    drawn = {}

    def recording(real):
        def plot(path, data, *args, **kwargs):
            drawn[str(path).rsplit("/", 1)[-1]] = data
            return real(path, data, *args, **kwargs)
        return plot

    for name in ("plot_bars", "plot_images", "plot_scatter"):
        monkeypatch.setattr(report, name, recording(getattr(report, name)))
    out = report.write_plots(load(), str(tmp_path / "run"), outputs, metrics, groups)
    assert sorted(out) == sorted(report.PLOTS) and all(read_bytes(v)[:8] == PNG for v in out.values())
    assert out["plot_files"] == str(tmp_path / "run" / "plot_files.png")
    files = drawn["plot_files.png"]
    assert sum(v for k, v in files.items() if k.endswith("in")) == 11 and files["image\nkept"] == 6
    assert sum(drawn["plot_rejects.png"].values()) == 2
    (row,) = drawn["plot_duplicates.png"]  # the missing file is skipped
    assert [c for c, _ in row] == ["first\nphoto_000.jpg", "exact\nphoto_000_copy.jpg", "near\nphoto_000_small.jpg"]
    assert all(img.shape == (report.THUMB, report.THUMB, 3) and img.dtype == np.uint8 for _, img in row)
    assert np.array_equal(row[0][1], row[1][1]) and not np.array_equal(row[0][1], row[2][1])
    assert {m: len(xy[0]) for m, xy in drawn["plot_embeddings.png"].items()} == {"images": 6, "text": 3}


def test_plots_of_an_empty_run_are_still_written(tmp_path):
    outputs = {"images": write_table(embeddings(0, 8), str(tmp_path / "images"))}
    zero = dict.fromkeys(("images", "video", "audio", "text"), 0)
    metrics = {"files_in_by_modality": zero, "files_kept_by_modality": zero, "rejects_by_reason": {},
               "duplicates": {"images": {}, "text": {}}}
    out = report.write_plots(load(), str(tmp_path / "run"), outputs, metrics, [])
    assert sorted(out) == sorted(report.PLOTS) and all(read_bytes(v)[:8] == PNG for v in out.values())
