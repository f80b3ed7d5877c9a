"""A corrupt transactions Parquet file given as ``score.input`` is a one-line error naming it."""
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.io import CorruptParquet
from riskcontrol.data import read_transactions


def test_ray_corrupt_input_file_is_named(tmp_path, ray_connected):
    pq.write_table(pa.table({"transaction_id": ["a"]}), tmp_path / "good.parquet")
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 truncated upload")
    with pytest.raises(CorruptParquet) as err:
        read_transactions(str(tmp_path)).take_all()
    assert str(err.value).startswith(f"cannot read Parquet file {bad}: ") and "\n" not in str(err.value)
