"""The shared ``input`` section: format inference, column checks before any cluster work, mapping,
safe casts with reject reasons, MySQL column discovery, and the Ray read on the cluster's storage."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from pipelines.input import (
    InputConfig,
    InputError,
    cast_column,
    check_input,
    check_mapping,
    column,
    conform,
    schema_markdown,
    source_format,
    split_table,
    user_names,
)

SCHEMA = pa.schema([
    column("user_id", pa.string(), "who"),
    column("item_id", pa.string(), "what"),
    column("timestamp", pa.timestamp("s", tz="UTC"), "when (epoch seconds or ISO 8601)"),
    column("rating", pa.float32(), "explicit feedback", required=False),
])

CSV = """uid,item,ts,score,comment
u1,i1,1700000000,4.5,fine
u2,i2,2023-11-14T22:13:20Z,3,ok
,i3,1700000001,2,no user
u4,i4,yesterday,1,bad time
u5,i5,1700000002,abc,bad rating
u6,i6,1700000003,,no rating is fine
"""
MAPPING = {"user_id": "uid", "item_id": "item", "timestamp": "ts", "rating": "score"}


def _csv(tmp_path, text=CSV, name="ratings.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_format_is_inferred_from_the_path(tmp_path):
    assert source_format("mysql://root@127.0.0.1:3306/test") == "mysql"
    assert source_format(str(_csv(tmp_path))) == "csv"
    assert source_format("x.parquet") == "parquet"
    folder = tmp_path / "logs"
    folder.mkdir()
    _csv(folder, name="a.csv")
    _csv(folder, name="b.csv")
    assert source_format(str(folder)) == "csv"
    assert source_format(str(folder), "parquet") == "parquet"


def test_a_missing_required_column_is_one_line_naming_it_and_the_file(tmp_path):
    path = _csv(tmp_path)
    with pytest.raises(InputError) as e:
        check_input(InputConfig(path=str(path)), SCHEMA)
    message = str(e.value)
    assert "'user_id'" in message and str(path) in message and "input.columns.user_id" in message
    assert "\n" not in message
    with pytest.raises(InputError, match="your 'when'"):
        check_input(InputConfig(path=str(path), columns={**MAPPING, "timestamp": "when"}), SCHEMA)
    with pytest.raises(InputError, match="'label'"):
        check_mapping({"label": "x"}, [SCHEMA])
    check_mapping({"label": "x"}, [SCHEMA, pa.schema([column("label", pa.int8(), "a side input's")])])
    # mapped, the optional rating may be absent
    assert "uid" in check_input(InputConfig(path=str(path), columns={**MAPPING, "rating": "nope"}), SCHEMA)


def test_missing_path_and_unreadable_file_are_one_line(tmp_path):
    with pytest.raises(InputError, match="not found"):
        check_input(InputConfig(path=str(tmp_path / "nothing")), SCHEMA)
    bad = tmp_path / "broken.parquet"
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(InputError, match="broken.parquet: cannot read it as parquet"):
        check_input(InputConfig(path=str(bad)), SCHEMA)


def test_conform_maps_casts_and_gives_each_bad_row_a_reason(tmp_path):
    raw = pacsv.read_csv(_csv(tmp_path), convert_options=pacsv.ConvertOptions(
        column_types={c: pa.string() for c in ("uid", "item", "ts", "score")}))
    table = conform(raw, SCHEMA, user_names(SCHEMA, MAPPING), carry=["comment"], id_columns=["user_id", "item_id"])
    good, rejects = split_table(table)
    assert good.schema.names == ["user_id", "item_id", "timestamp", "rating", "comment"]
    assert good["user_id"].to_pylist() == ["u1", "u2", "u6"]
    assert good["timestamp"].type == pa.timestamp("s", tz="UTC")
    assert good["timestamp"][0].as_py() == good["timestamp"][1].as_py()  # epoch and ISO: the same instant
    assert good["rating"].to_pylist() == [4.5, 3.0, None]
    assert good["comment"].to_pylist() == ["fine", "ok", "no rating is fine"]
    reasons = dict(zip(rejects["id"].to_pylist(), rejects["reason"].to_pylist()))
    assert reasons == {
        "?/i3": "user_id (your 'uid') is empty",
        "u4/i4": "timestamp (your 'ts'): cannot read 'yesterday' as timestamp[s, tz=UTC]",
        "u5/i5": "rating (your 'score'): cannot read 'abc' as float",
    }
    assert set(rejects["stage"].to_pylist()) == {"input"}


def test_parquet_types_are_cast_where_safe():
    ints = pa.array([1, 2, None, 3], pa.int64())
    values, bad = cast_column(ints, pa.float64())
    assert values.to_pylist() == [1.0, 2.0, None, 3.0] and not bad.any()
    values, bad = cast_column(pa.array([1.0, 2.5, None]), pa.int32())
    assert values.to_pylist() == [1, None, None] and bad.tolist() == [False, True, False]
    values, bad = cast_column(pa.array(["yes", "0", "maybe"]), pa.bool_())
    assert values.to_pylist() == [True, False, None] and bad.tolist() == [False, False, True]
    nanos = pa.array([1_700_000_000_123_456_789, None], pa.timestamp("ns", tz="UTC"))
    values, bad = cast_column(nanos, pa.timestamp("us", tz="UTC"))  # Parquet from pandas: ns, truncated
    assert values[0].as_py().isoformat() == "2023-11-14T22:13:20.123456+00:00" and not bad.any()
    values, bad = cast_column(pa.array([0, 86400]), pa.timestamp("us"))
    assert [v.isoformat() for v in values.to_pylist()] == ["1970-01-01T00:00:00", "1970-01-02T00:00:00"]


def test_parquet_folder_columns_come_from_a_footer(tmp_path):
    folder = tmp_path / "events"
    folder.mkdir()
    pq.write_table(pa.table({"user_id": ["a"], "item_id": ["b"], "timestamp": [1]}), folder / "part-0.parquet")
    (folder / "_SUCCESS").write_text("")
    assert check_input(InputConfig(path=str(folder)), SCHEMA) == ["user_id", "item_id", "timestamp"]


def test_schema_markdown_lists_every_column():
    text = schema_markdown(SCHEMA)
    assert "| `rating` | float | no | explicit feedback |" in text and text.count("\n") == len(SCHEMA) + 1


def test_mysql_columns_before_any_cluster_work(mysql_url, monkeypatch):
    from pipelines.io import mysql_connect

    conn = mysql_connect(mysql_url)
    with conn.cursor() as cur:
        cur.execute("DROP TABLE IF EXISTS adbray_input_test")
        cur.execute("CREATE TABLE adbray_input_test (uid VARCHAR(20), item VARCHAR(20), ts BIGINT)")
    conn.commit()
    conn.close()
    cfg = InputConfig(path=mysql_url, table="adbray_input_test", columns=MAPPING)
    assert check_input(cfg, SCHEMA) == ["uid", "item", "ts"]
    with pytest.raises(InputError, match="set input.table"):
        check_input(InputConfig(path=mysql_url), SCHEMA)
    monkeypatch.setenv("MYSQL_PWD", "wrong-password")  # taken from the environment, never the command line
    with pytest.raises(InputError, match="cannot connect"):
        check_input(cfg, SCHEMA)


def test_read_input_on_the_cluster_from_its_object_store(tmp_path, adbray_run_dir, ray_connected):
    from pipelines.input import read_input, split_rejects
    from pipelines.io import upload_dir

    (tmp_path / "logs").mkdir()
    _csv(tmp_path / "logs", name="part-1.csv")
    uri = upload_dir(str(tmp_path / "logs"), f"{adbray_run_dir}/logs")
    ds = read_input(InputConfig(path=uri, columns=MAPPING), SCHEMA, carry=["comment"], id_columns=["user_id"])
    good, rejects = split_rejects(ds)
    assert sorted(good.to_pandas()["user_id"]) == ["u1", "u2", "u6"]
    assert sorted(rejects.to_pandas()["id"]) == ["?", "u4", "u5"]
