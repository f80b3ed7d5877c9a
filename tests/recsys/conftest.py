"""One end-to-end run of configs/local.yaml on the shared cluster (isolated worker disks, outputs on
the OSS stand-in), shared by the recsys tests."""
from __future__ import annotations

import pytest

from pipelines.testing import local_run_traces, storage_run_dir


@pytest.fixture(scope="session")
def recsys_run(ray_connected):
    """``(run folder URI, summary dict, local run-root entries this run added)``."""
    from pipelines.io import read_json
    from recsys.template import TEMPLATE

    out = storage_run_dir("recsys")
    before = local_run_traces()
    assert TEMPLATE.main(["--run-dir", out]) == 0
    return out, read_json(f"{out}/summary.json"), local_run_traces() - before
