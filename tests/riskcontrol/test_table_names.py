"""Config table names reach SQL only after the identifier check (a backtick must not break out)."""
import pytest

import pipelines.io
from pipelines.input import InputError, read_input
from riskcontrol import score
from riskcontrol.config import ScoreConfig, load
from riskcontrol.inputs import TRANSACTIONS
from riskcontrol.template import TEMPLATE

URL = "mysql://root@127.0.0.1:3306/test"
BAD = "t` WHERE 1; DROP TABLE riskcontrol_scores; -- "


class FakeMySQL:
    """A pymysql connection that records queries and answers ``LIMIT 0`` with the template's columns."""

    def __init__(self, queries):
        self.queries = queries
        self.description = [(name,) for name in TRANSACTIONS.names]

    def cursor(self):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def execute(self, query):
        self.queries.append(query)

    def close(self):
        pass


class LazyDataset:
    def map_batches(self, *args, **kwargs):
        return self


def test_input_table_is_checked_before_any_query(monkeypatch):
    """``input.table`` (MySQL input, e.g. for ``score --input mysql://...``) is checked before the column check's
    ``LIMIT 0`` and before the read; a good one is quoted."""
    queries = []
    monkeypatch.setattr(pipelines.io, "mysql_connect", lambda url: FakeMySQL(queries))
    monkeypatch.setattr(pipelines.io, "read_mysql", lambda url, query, **kw: queries.append(query) or LazyDataset())
    cfg = load(None, [f"input.path={URL}", f"input.table={BAD}"])
    with pytest.raises(InputError, match=r"input\.table: invalid table name") as err:
        TEMPLATE.check_inputs(cfg)
    assert "\n" not in str(err.value) and queries == []
    cfg = load(None, [f"input.path={URL}", "input.table=test.tx"])
    TEMPLATE.check_inputs(cfg)
    read_input(cfg.input, TRANSACTIONS)
    assert queries[0] == "SELECT * FROM `test`.`tx` LIMIT 0"
    assert queries[-1] == f"SELECT {', '.join(f'`{c}`' for c in TRANSACTIONS.names)} FROM `test`.`tx`"


def test_old_score_input_keys_name_the_new_ones():
    for key, new in (("score.input=x", "input.path"), ("score.input_mysql_url=mysql://h/db", "input.path=mysql"),
                     ("score.input_table=t", "input.table")):
        with pytest.raises(Exception, match=f"moved to the input section: use {new}"):
            load(None, [key])


class NoWork:
    """A scores Dataset that must not be executed."""

    def materialize(self):
        raise AssertionError("scores executed before the output table was checked")


def test_output_table_is_checked_before_scoring():
    with pytest.raises(ValueError, match=r"^score\.output_table: invalid table name"):
        score.write_scores(NoWork(), ScoreConfig(output_mysql_url=URL, output_table=BAD), "/nonexistent")
