"""The batch MySQL table name is checked before any work and before it reaches SQL."""
import pytest

from pipelines.template import Run
from recsys import batch
from recsys import config as C


def test_mysql_table_is_checked_before_any_work(monkeypatch):
    def no_build(*_):
        raise AssertionError("recommendations built before the table name was checked")

    monkeypatch.setattr(batch, "build", no_build)
    cfg = C.load(overrides=["batch.output=mysql", "batch.mysql_table=recs` WHERE 1; DROP TABLE users; -- "])
    with pytest.raises(ValueError, match=r"^batch\.mysql_table: invalid table name"):
        batch.run(cfg, Run("/nonexistent"))
