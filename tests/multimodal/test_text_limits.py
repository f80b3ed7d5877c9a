"""Text files are read whole, so their size is capped (``text.max_file_mb``): larger files are
rejects with reason ``too_large``, never read into memory."""
import json

import numpy as np
import pytest

from multimodal import sources
from multimodal.config import TextConfig, load
from multimodal.text import TextReader


def test_default_cap_is_10_mib():
    assert TextConfig().max_file_mb == 10
    assert load(overrides=["text.max_file_mb=0.5"]).text.max_file_mb == 0.5


def test_text_file_over_the_cap_is_rejected_unread(tmp_path, monkeypatch):
    big, small = tmp_path / "big.txt", tmp_path / "small.txt"
    big.write_text("x" * 2000)
    small.write_text("hello world")
    reads = []
    real = sources.read_bytes
    monkeypatch.setattr("multimodal.text.read_bytes",
                        lambda path, *a, **kw: reads.append(path) or real(path, *a, **kw))
    (batch,) = list(TextReader(["utf-8"], max_bytes=1000)(
        {"path": np.array([str(big), str(small)], dtype=object)}))
    assert list(batch["path"]) == [str(big), str(small)]
    assert batch["reason"][0].startswith("too_large") and "2000 bytes" in batch["reason"][0]
    assert batch["reason"][1] == "" and batch["text"][1] == "hello world"
    assert batch["text"][0] == ""


def test_read_bytes_cap():
    with pytest.raises(sources.FileTooLarge, match="too_large"):
        sources.read_bytes(__file__, max_bytes=10)
    assert sources.read_bytes(__file__, max_bytes=1 << 20).startswith(b'"""')


def test_ray_too_large_text_is_in_the_rejects_table(adbray_run_dir, capsys):
    from multimodal.template import TEMPLATE
    from pipelines.io import join, read_table, write_bytes

    src = join(adbray_run_dir, "in")  # on the object store: the decode tasks run on other nodes
    big = write_bytes(join(src, "big.txt"), b"word " * 1000)  # 5000 bytes
    ok = write_bytes(join(src, "ok.txt"), b"a small document")
    code = TEMPLATE.main(["--input", src, "--run-dir", join(adbray_run_dir, "run"), "--set", "modalities=[text]",
                 "--set", "text.max_file_mb=0.004", "--set", "text.embed.enabled=false"])
    out = capsys.readouterr().out
    assert code == 0, out[-2000:]
    summary = json.loads(out.strip().splitlines()[-1])
    rejects = read_table(summary["outputs"]["rejects"]).to_pylist()
    assert [(r["path"], r["modality"], r["stage"]) for r in rejects] == [(big, "text", "decode")]
    assert rejects[0]["reason"].startswith("too_large")
    assert read_table(summary["outputs"]["text"]).column("path").to_pylist() == [ok]
