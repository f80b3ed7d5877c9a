from typing import Literal

import pytest
from pydantic import Field

from pipelines.config import ConfigError, StrictModel, apply_overrides, load_config, parse_override


class Train(StrictModel):
    num_workers: int = Field(2, ge=0)
    mode: Literal["fast", "exact"] = "fast"


class Cfg(StrictModel):
    name: str = "x"
    train: Train = Train()


def test_overrides_parse_yaml_scalars():
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("a=true") == (["a"], True)
    assert parse_override("a=[1,2]") == (["a"], [1, 2])
    data = apply_overrides({"train": {"num_workers": 1}}, ["train.mode=exact", "name=y"])
    assert data == {"train": {"num_workers": 1, "mode": "exact"}, "name": "y"}


def test_load_yaml_with_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  num_workers: 4\n")
    cfg = load_config(Cfg, p, ["train.mode=exact"])
    assert cfg.train.num_workers == 4 and cfg.train.mode == "exact"


def test_bad_literal_is_one_line_naming_field_and_allowed(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train: {mode: turbo}\n")
    with pytest.raises(ConfigError) as e:
        load_config(Cfg, p)
    msg = str(e.value)
    assert "\n" not in msg
    assert "train.mode" in msg and "'fast' or 'exact'" in msg and "turbo" in msg


def test_unknown_field_and_range_errors(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("{}")
    with pytest.raises(ConfigError, match="train.nope"):
        load_config(Cfg, p, ["train.nope=1"])
    with pytest.raises(ConfigError, match="train.num_workers"):
        load_config(Cfg, p, ["train.num_workers=-1"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(Cfg, tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="bad override"):
        load_config(Cfg, p, ["novalue"])
