"""A corrupt transactions Parquet file (the features step reads the run's transactions) is a one-line error naming it."""
import pyarrow as pa
import pytest

from pipelines.io import CorruptParquet, join, write_bytes, write_table
from riskcontrol.data import read_transactions


def test_ray_corrupt_input_file_is_named(adbray_run_dir):
    folder = join(adbray_run_dir, "transactions")
    write_table(pa.table({"transaction_id": ["a"]}), folder, name="good.parquet")
    bad = write_bytes(join(folder, "bad.parquet"), b"PAR1 truncated upload")
    with pytest.raises(CorruptParquet) as err:
        read_transactions(folder).take_all()
    assert str(err.value).startswith(f"cannot read Parquet file {bad}: ") and "\n" not in str(err.value)
