"""Config table names reach SQL only after the identifier check (a backtick must not break out)."""
import pytest

from riskcontrol import score
from riskcontrol.config import ScoreConfig

URL = "mysql://root@127.0.0.1:3306/test"
BAD = "t` WHERE 1; DROP TABLE riskcontrol_scores; -- "


def test_input_table_is_checked_before_any_query(monkeypatch):
    queries = []
    monkeypatch.setattr(score, "read_mysql", lambda url, query, **kw: queries.append(query))
    with pytest.raises(ValueError, match=r"^score\.input_table: invalid table name"):
        score.input_dataset(ScoreConfig(input_mysql_url=URL, input_table=BAD), None)
    assert queries == []
    score.input_dataset(ScoreConfig(input_mysql_url=URL, input_table="test.tx"), None)
    assert queries == ["SELECT * FROM `test`.`tx`"]


class NoWork:
    """A scores Dataset that must not be executed."""

    def materialize(self):
        raise AssertionError("scores executed before the output table was checked")


def test_output_table_is_checked_before_scoring():
    with pytest.raises(ValueError, match=r"^score\.output_table: invalid table name"):
        score.write_scores(NoWork(), ScoreConfig(output_mysql_url=URL, output_table=BAD), "/nonexistent")
