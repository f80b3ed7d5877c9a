"""Pass 2 (the driver's loop over the staging files) reports progress on a terminal, and is quiet
otherwise."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from multimodal.config import MultimodalConfig
from multimodal.pipeline import collect, finalize, output_schemas


def staging(folder, files: int = 3):
    """A staging folder of audio rows, one good row and one rejected row per file."""
    folder.mkdir()
    for i in range(files):
        pq.write_table(pa.table({
            "path": [f"/a/{i}.wav", f"/a/{i}.bad.wav"], "reason": ["", "cannot decode audio: x"],
            "format": ["wav", "wav"], "duration_s": [1.0, 0.0], "source_rate": [16000, 0], "channels": [1, 0],
            "loudness_dbfs": [-20.0, 0.0], "peak": [0.5, 0.0], "silence_ratio": [0.1, 0.0],
            "logmel_mean": [[0.0] * 8, [0.0] * 8], "embedding": [[1.0] * 8, [0.0] * 8], "decode_s": [0.1, 0.1]}),
            folder / f"part-{i}.parquet")
    return str(folder)


@pytest.mark.parametrize("flag,lines", [("1", 2), ("0", 0)])
def test_pass2_prints_progress_lines_only_when_asked(tmp_path, capsys, monkeypatch, flag, lines):
    monkeypatch.setenv("ADBRAY_PROGRESS", flag)
    cfg = MultimodalConfig.model_validate({"audio": {"n_mels": 8, "embed": {"dim": 8}}})
    src = staging(tmp_path / "staging")
    assert len(collect(src, ["path", "reason"], "audio: read keys")["path"]) == 6
    finalize(src, str(tmp_path / "audio"), output_schemas(cfg)["audio"], None, label="audio: write")
    assert pq.read_table(tmp_path / "audio").column("path").to_pylist() == ["/a/0.wav", "/a/1.wav", "/a/2.wav"]
    err = capsys.readouterr().err.splitlines()
    assert len(err) == lines, err
    if lines:
        assert err[0].startswith("[audio: read keys] 3/3 staging files (")
        assert err[1].startswith("[audio: write] 3/3 staging files (")
