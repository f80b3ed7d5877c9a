import os
import shutil

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from pipelines import io

OLD = pa.table({"id": [1, 2, 3]})
NEW = pa.table({"name": ["x", "y"]})


def test_run_dir_and_overwrite(tmp_path):
    d = io.run_dir("tmpl", "r1", root=str(tmp_path))
    assert d.endswith("tmpl/r1")
    out = f"{d}/scores"
    io.write_table(OLD, out, name="old.parquet")
    io.write_table(NEW, out)
    assert io.read_table(out).equals(NEW)
    assert os.listdir(out) == ["part-0.parquet"]
    assert os.listdir(d) == ["scores"]


def test_upload_dir_to_a_new_local_folder_and_back(tmp_path):
    """A local destination that does not exist yet (a laptop run's model folder) is created."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "model.json").write_text('{"a": 1}')
    target = io.upload_dir(str(tmp_path / "src"), str(tmp_path / "run" / "model"))
    assert io.read_json(io.join(target, "model.json")) == {"a": 1}
    back = io.download_dir(target, str(tmp_path / "back" / "model"))
    assert os.listdir(back) == ["model.json"]


def test_failed_write_keeps_previous_output(tmp_path):
    out = str(tmp_path / "t")
    io.write_table(pa.table({"id": [1]}), out)

    def boom(_):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        io.replace_dir(io.filesystem_for(out)[0], out, boom)
    assert io.read_table(out).num_rows == 1
    assert [p.name for p in tmp_path.iterdir()] == ["t"]


# ------------------------------------------------- crash safety of replace_dir
class Crash(BaseException):
    """The process died here: this call and every later file operation fail."""


def crash_after(monkeypatch, n: int, exchange: bool = True) -> None:
    """Let ``n`` folder operations (rename, exchange, rmtree) succeed, then 'die'."""
    done = [0]

    def op(real):
        def wrapped(*args, **kwargs):
            if done[0] >= n:
                raise Crash()
            done[0] += 1
            return real(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(os, "replace", op(os.replace))
    monkeypatch.setattr(os, "rename", op(os.rename))
    monkeypatch.setattr(shutil, "rmtree", op(shutil.rmtree))
    if exchange:
        monkeypatch.setattr(io, "_exchange", op(getattr(io, "_exchange", lambda a, b: False)), raising=False)
    else:
        monkeypatch.setattr(io, "_exchange", lambda a, b: False, raising=False)


def write(table):
    return lambda folder: pq.write_table(table, f"{folder}/part-0.parquet")


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
@pytest.mark.parametrize("n", range(5))
def test_replace_dir_crash_at_any_point_loses_nothing(tmp_path, monkeypatch, n, exchange):
    out = str(tmp_path / "scores")
    fs = pafs.LocalFileSystem()
    io.replace_dir(fs, out, write(OLD))
    with monkeypatch.context() as m:
        crash_after(m, n, exchange)
        try:
            io.replace_dir(fs, out, write(NEW))
        except Crash:
            pass
    if exchange or os.path.exists(out):
        # the target itself is complete at every instant (an atomic exchange, or not yet touched)
        assert io.read_table(out) in (OLD, NEW)
    # the next call first recovers a complete output, even if its own write then fails
    with pytest.raises(RuntimeError):
        io.replace_dir(fs, out, lambda folder: (_ for _ in ()).throw(RuntimeError("disk full")))
    assert io.read_table(out) in (OLD, NEW)
    assert os.listdir(tmp_path) == ["scores"]
    io.replace_dir(fs, out, write(OLD))
    assert io.read_table(out).equals(OLD) and os.listdir(out) == ["part-0.parquet"]
    assert os.listdir(tmp_path) == ["scores"]


def test_replace_dir_cleans_stale_temp_folders(tmp_path):
    out = tmp_path / "scores"
    (tmp_path / "scores.tmp-deadbeef").mkdir()
    (tmp_path / "scores.tmp-deadbeef" / "half.parquet").write_bytes(b"PAR1")
    (tmp_path / "scoresheet").mkdir()  # another output sharing the prefix stays
    io.write_table(NEW, str(out))
    assert sorted(os.listdir(tmp_path)) == ["scores", "scoresheet"]
    assert io.read_table(str(out)).equals(NEW)


class CrashingStore(pafs.FileSystemHandler):
    """An in-memory object store (pyarrow's mock filesystem) that 'dies' after ``n`` changes."""

    def __init__(self, n: int | None = None):
        self.fs, self.n, self.done = pafs._MockFileSystem(), n, 0

    def _change(self):
        if self.n is not None and self.done >= self.n:
            raise Crash()
        self.done += 1

    def get_type_name(self):
        return "crashing-mock"

    def normalize_path(self, path):
        return path

    def equals(self, other):
        return self is other

    def get_file_info(self, paths):
        return self.fs.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.fs.get_file_info(selector)

    def create_dir(self, path, recursive):
        self.fs.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self._change()
        self.fs.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self._change()
        self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        self._change()
        self.fs.delete_dir_contents("/", accept_root_dir=True)

    def delete_file(self, path):
        self._change()
        self.fs.delete_file(path)

    def move(self, src, dest):
        self._change()
        self.fs.move(src, dest)

    def copy_file(self, src, dest):
        self._change()
        self.fs.copy_file(src, dest)

    def open_input_stream(self, path):
        return self.fs.open_input_stream(path)

    def open_input_file(self, path):
        return self.fs.open_input_file(path)

    def open_output_stream(self, path, metadata):
        self._change()
        return self.fs.open_output_stream(path, metadata=metadata)

    def open_append_stream(self, path, metadata):
        self._change()
        return self.fs.open_append_stream(path, metadata=metadata)


def store_write(fs, table, names):
    def write_files(folder):
        for name in names:
            pq.write_table(table, f"{folder}/{name}", filesystem=fs)
    return write_files


def store_listing(fs, prefix):
    infos = fs.get_file_info(pafs.FileSelector(prefix, recursive=True, allow_not_found=True))
    return sorted(i.path[len(prefix) + 1:] for i in infos if i.type == pafs.FileType.File)


def store_read(fs, path):
    return pa.concat_tables(pq.read_table(f"{path}/{n}", filesystem=fs) for n in store_listing(fs, path))


@pytest.mark.parametrize("n", range(12))
def test_replace_dir_on_object_store_crash_is_recovered(n):
    handler = CrashingStore()
    fs = pafs.PyFileSystem(handler)
    fs.create_dir("bucket/run")
    out = "bucket/run/scores"
    io.replace_dir(fs, out, store_write(fs, OLD, ["a.parquet", "b.parquet"]))
    new_files = ["b.parquet", "c.parquet"]
    handler.n, handler.done = n, 0
    try:
        io.replace_dir(fs, out, store_write(fs, NEW, new_files))
    except Crash:
        pass
    handler.n = None
    # the next call completes (or rolls back) the interrupted one before its own write fails
    with pytest.raises(RuntimeError):
        io.replace_dir(fs, out, lambda folder: (_ for _ in ()).throw(RuntimeError("disk full")))
    assert store_listing(fs, out) in (["a.parquet", "b.parquet"], new_files)
    assert store_read(fs, out) in (pa.concat_tables([OLD, OLD]), pa.concat_tables([NEW, NEW]))
    assert store_listing(fs, "bucket/run") == [f"scores/{f}" for f in store_listing(fs, out)]
    io.replace_dir(fs, out, store_write(fs, OLD, ["z.parquet"]))
    assert store_listing(fs, "bucket/run") == ["scores/z.parquet"]


# ------------------------------------------------------------- corrupt Parquet
def corrupt_folder(tmp_path, kind: str):
    """A folder with one good and one corrupt Parquet file (bad footer, or bad data pages)."""
    d = tmp_path / "data"
    d.mkdir()
    pq.write_table(pa.table({"a": list(range(10))}), d / "good.parquet")
    bad = d / "bad.parquet"
    if kind == "footer":
        bad.write_bytes(b"PAR1" + b"x" * 100)
    else:
        pq.write_table(pa.table({"a": list(range(1000)), "s": [str(i) * 5 for i in range(1000)]}), bad)
        data = bytearray(bad.read_bytes())
        data[8:2000] = b"\xab" * (2000 - 8)
        bad.write_bytes(bytes(data))
    return d, bad


@pytest.mark.parametrize("kind", ["footer", "pages"])
def test_read_table_corrupt_file_is_one_line_naming_it(tmp_path, kind):
    d, bad = corrupt_folder(tmp_path, kind)
    with pytest.raises(io.CorruptParquet) as err:
        io.read_table(str(d))
    msg = str(err.value)
    assert "\n" not in msg and str(bad) in msg and msg.startswith(f"cannot read Parquet file {bad}: ")


def test_read_table_missing_column_is_not_called_corrupt(tmp_path):
    io.write_table(OLD, str(tmp_path / "t"))
    with pytest.raises(Exception) as err:
        io.read_table(str(tmp_path / "t"), columns=["nope"])
    assert not isinstance(err.value, io.CorruptParquet)


# ------------------------------------------------------------------- misc
def test_rejects_table_schema_and_one_line_reason():
    t = io.rejects_table([io.reject("a.jpg", "decode", "bad\nsecond line")])
    assert t.schema == io.REJECT_SCHEMA and t.column("reason").to_pylist() == ["bad"]
    assert io.rejects_table([]).num_rows == 0


def test_oss_needs_endpoint(monkeypatch):
    monkeypatch.delenv("OSS_ENDPOINT", raising=False)
    with pytest.raises(ValueError, match="OSS_ENDPOINT"):
        io.filesystem_for("oss://bucket/prefix")
    monkeypatch.setenv("OSS_ENDPOINT", "oss-cn-hangzhou.aliyuncs.com")
    monkeypatch.setenv("OSS_ACCESS_KEY_ID", "id")
    monkeypatch.setenv("OSS_ACCESS_KEY_SECRET", "secret")
    fs, path = io.filesystem_for("oss://bucket/prefix/x")
    assert path == "bucket/prefix/x" and fs.type_name == "s3"


# ------------------------------------------------------------------- MySQL
@pytest.mark.parametrize("name", ["scores", "Scores_2", "test.scores", "a" * 64])
def test_table_names_accepted(name):
    assert io.checked_table_name(name, "score.output_table") == name


@pytest.mark.parametrize("name", ["", "a`b", "t` ; DROP TABLE x; -- ", "a.b.c", "a" * 65, "db.", "sp ace",
                                  "naïve", "t\n", None])
def test_table_names_rejected_with_the_field(name):
    with pytest.raises(ValueError, match=r"^score\.output_table: ") as err:
        io.checked_table_name(name, "score.output_table")
    assert "\n" not in str(err.value)


def test_upsert_checks_the_table_name_before_connecting():
    with pytest.raises(ValueError, match="invalid table name"):
        io.upsert_mysql("mysql://root@127.0.0.1:1/test", "x`; DROP TABLE y", OLD, key=["id"])


def sql(url, *statements):
    conn = io.mysql_connect(url)
    try:
        with conn.cursor() as cur:
            for s in statements:
                cur.execute(s)
            rows = cur.fetchall()
        conn.commit()
        return rows
    finally:
        conn.close()


def test_mysql_upsert_is_idempotent(mysql_url):
    sql(mysql_url, "DROP TABLE IF EXISTS adbray_io_test")
    t = pa.table({"id": ["a", "b"], "score": [0.1, 0.2]})
    io.upsert_mysql(mysql_url, "adbray_io_test", t, key=["id"])
    io.upsert_mysql(mysql_url, "adbray_io_test", pa.table({"id": ["b", "c"], "score": [0.9, 0.3]}), key=["id"])
    rows = sql(mysql_url, "SELECT id, score FROM adbray_io_test ORDER BY id")
    assert rows == (("a", 0.1), ("b", 0.9), ("c", 0.3))
    # an identical re-run changes nothing
    io.upsert_mysql(mysql_url, "adbray_io_test", pa.table({"id": ["b", "c"], "score": [0.9, 0.3]}), key=["id"])
    assert sql(mysql_url, "SELECT id, score FROM adbray_io_test ORDER BY id") == rows


def test_mysql_upsert_db_qualified_table(mysql_url):
    sql(mysql_url, "DROP TABLE IF EXISTS adbray_io_qualified")
    for _ in range(2):
        io.upsert_mysql(mysql_url, "test.adbray_io_qualified", OLD, key=["id"])
    assert sql(mysql_url, "SELECT COUNT(*) FROM test.adbray_io_qualified") == ((3,),)


def test_mysql_upsert_refuses_a_table_without_the_key(mysql_url):
    sql(mysql_url, "DROP TABLE IF EXISTS adbray_io_nokey",
        "CREATE TABLE adbray_io_nokey (id VARCHAR(20), score DOUBLE)")
    t = pa.table({"id": ["a", "b"], "score": [0.1, 0.2]})
    for _ in range(2):
        with pytest.raises(ValueError, match=r"adbray_io_nokey.*no PRIMARY or UNIQUE key on \(id\)") as err:
            io.upsert_mysql(mysql_url, "adbray_io_nokey", t, key=["id"])
        assert "\n" not in str(err.value)
    assert sql(mysql_url, "SELECT COUNT(*) FROM adbray_io_nokey") == ((0,),)
    # a key on a different column set does not count either
    sql(mysql_url, "DROP TABLE adbray_io_nokey",
        "CREATE TABLE adbray_io_nokey (id VARCHAR(20), score DOUBLE, UNIQUE KEY (id, score))")
    with pytest.raises(ValueError, match="no PRIMARY or UNIQUE key"):
        io.upsert_mysql(mysql_url, "adbray_io_nokey", t, key=["id"])
    # an existing UNIQUE key on exactly the key columns is fine
    sql(mysql_url, "DROP TABLE adbray_io_nokey",
        "CREATE TABLE adbray_io_nokey (id VARCHAR(20) NOT NULL, score DOUBLE, UNIQUE KEY u (id))")
    for _ in range(2):
        io.upsert_mysql(mysql_url, "adbray_io_nokey", t, key=["id"])
    assert sql(mysql_url, "SELECT COUNT(*) FROM adbray_io_nokey") == ((2,),)


def test_mysql_upsert_writes_nan_and_inf_as_null(mysql_url):
    sql(mysql_url, "DROP TABLE IF EXISTS adbray_io_nan")
    t = pa.table({"id": [1, 2, 3, 4], "v": [float("nan"), float("inf"), float("-inf"), 1.5]})
    io.upsert_mysql(mysql_url, "adbray_io_nan", t, key=["id"])
    assert sql(mysql_url, "SELECT id, v FROM adbray_io_nan ORDER BY id") == \
        ((1, None), (2, None), (3, None), (4, 1.5))


def test_bad_mysql_url():
    with pytest.raises(ValueError, match="mysql://"):
        io.mysql_params("postgres://x")


# -------------------------------------------------------------- through Ray
def test_ray_mysql_read_through_ray_data(mysql_url, ray_connected):
    io.upsert_mysql(mysql_url, "adbray_io_read", pa.table({"id": list(range(50)), "v": [i * 2 for i in range(50)]}),
                    key=["id"])
    ds = io.read_mysql(mysql_url, "SELECT id, v FROM adbray_io_read")
    rows = ds.take_all()
    assert len(rows) == 50 and sum(r["v"] for r in rows) == 2 * sum(range(50))


def test_ray_read_parquet_corrupt_footer_names_the_file(tmp_path, adbray_run_dir):
    d, _ = corrupt_folder(tmp_path, "footer")
    uri = io.upload_dir(str(d), f"{adbray_run_dir}/data")  # the cluster's workers read object storage
    with pytest.raises(io.CorruptParquet) as err:
        io.read_parquet(uri).take_all()
    assert "\n" not in str(err.value) and f"{uri}/bad.parquet" in str(err.value)
    assert io.read_parquet(f"{uri}/good.parquet").count() == 10


def test_ray_cli_prints_a_corrupt_parquet_task_error_as_one_line(tmp_path, adbray_run_dir, capsys):
    import click

    from pipelines.cli import run_main

    d, _ = corrupt_folder(tmp_path, "pages")
    uri = io.upload_dir(str(d), f"{adbray_run_dir}/data")
    bad = io.filesystem_for(f"{uri}/bad.parquet")[1]  # Ray's reader names the file without its scheme

    @click.command()
    def count():
        io.read_parquet(uri).take_all()

    assert run_main(count, []) == 1
    err = capsys.readouterr().err.strip().splitlines()  # Ray's own loggers may write above it
    errors = [line for line in err if line.startswith("error:")]
    assert errors == err[-1:] and errors[0].startswith(f"error: cannot read Parquet file {bad}: "), err
