"""One end-to-end run of configs/local.yaml on the shared cluster, shared by the recsys tests."""
from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="session")
def recsys_run(ray_connected, tmp_path_factory):
    from pipelines.cli import run_main
    from recsys.__main__ import main

    out = tmp_path_factory.mktemp("recsys") / "run"
    assert run_main(main, ["--run-dir", str(out)]) == 0
    return out, json.loads((out / "summary.json").read_text())
