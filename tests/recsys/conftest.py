"""One end-to-end run of configs/local.yaml on the shared cluster, shared by the recsys tests."""
from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="session")
def recsys_run(ray_connected, tmp_path_factory):
    from recsys.template import TEMPLATE

    out = tmp_path_factory.mktemp("recsys") / "run"
    assert TEMPLATE.main(["--run-dir", str(out)]) == 0
    return out, json.loads((out / "summary.json").read_text())
