import pyarrow as pa
import pytest

from pipelines import io


def test_run_dir_and_overwrite(tmp_path):
    d = io.run_dir("tmpl", "r1", root=str(tmp_path))
    assert d.endswith("tmpl/r1")
    out = f"{d}/scores"
    io.write_table(pa.table({"id": [1, 2, 3]}), out)
    io.write_table(pa.table({"id": [1, 2, 3]}), out)
    assert io.read_table(out).num_rows == 3


def test_failed_write_keeps_previous_output(tmp_path):
    out = str(tmp_path / "t")
    io.write_table(pa.table({"id": [1]}), out)

    def boom(_):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        io.replace_dir(io.filesystem_for(out)[0], out, boom)
    assert io.read_table(out).num_rows == 1
    assert [p.name for p in tmp_path.iterdir()] == ["t"]


def test_rejects_table_schema_and_one_line_reason():
    t = io.rejects_table([io.reject("a.jpg", "decode", "bad\nsecond line")])
    assert t.schema == io.REJECT_SCHEMA and t.column("reason").to_pylist() == ["bad"]
    assert io.rejects_table([]).num_rows == 0


def test_oss_needs_endpoint(monkeypatch):
    monkeypatch.delenv("OSS_ENDPOINT", raising=False)
    with pytest.raises(ValueError, match="OSS_ENDPOINT"):
        io.filesystem_for("oss://bucket/prefix")
    monkeypatch.setenv("OSS_ENDPOINT", "oss-cn-hangzhou.aliyuncs.com")
    fs, path = io.filesystem_for("oss://bucket/prefix/x")
    assert path == "bucket/prefix/x" and fs.type_name == "s3"


def test_mysql_upsert_is_idempotent(mysql_url):
    conn = io.mysql_connect(mysql_url)
    with conn.cursor() as cur:
        cur.execute("DROP TABLE IF EXISTS adbray_io_test")
    conn.close()
    t = pa.table({"id": ["a", "b"], "score": [0.1, 0.2]})
    io.upsert_mysql(mysql_url, "adbray_io_test", t, key=["id"])
    io.upsert_mysql(mysql_url, "adbray_io_test", pa.table({"id": ["b", "c"], "score": [0.9, 0.3]}), key=["id"])
    conn = io.mysql_connect(mysql_url)
    with conn.cursor() as cur:
        cur.execute("SELECT id, score FROM adbray_io_test ORDER BY id")
        rows = cur.fetchall()
    conn.close()
    assert rows == (("a", 0.1), ("b", 0.9), ("c", 0.3))


def test_mysql_read_through_ray_data(mysql_url, ray_connected):
    io.upsert_mysql(mysql_url, "adbray_io_read", pa.table({"id": list(range(50)), "v": [i * 2 for i in range(50)]}),
                    key=["id"])
    ds = io.read_mysql(mysql_url, "SELECT id, v FROM adbray_io_read")
    rows = ds.take_all()
    assert len(rows) == 50 and sum(r["v"] for r in rows) == 2 * sum(range(50))


def test_bad_mysql_url():
    with pytest.raises(ValueError, match="mysql://"):
        io.mysql_params("postgres://x")
