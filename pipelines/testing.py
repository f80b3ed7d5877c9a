"""pytest fixtures for template repos (a pytest plugin, registered as ``adbray`` in ``pytest11``).

Any project with adbray installed gets them without a conftest:

- ``adbray_cluster`` (session): a real local multi-node Ray cluster started through the
  local provider (head with 0 CPUs, two 2-CPU workers, token auth, small object stores),
  stopped at the end of the session;
  each worker raylet with its own disk where the OS allows (``deploy.isolate``), and the
  cluster's OSS stand-in (``deploy.objectstore``);
- ``adbray_ray`` (session): this pytest process attached to that cluster as a driver, with the
  stand-in's ``OSS_*`` variables and ``ADBRAY_STORAGE``/``ADBRAY_DISKS`` in its environment;
- ``adbray_run_dir``: a fresh ``oss://<bucket>/tests/<test>-<id>`` run folder on the stand-in;
- ``run_template``: runs a template's CLI in this process (``run_template(TEMPLATE, args)``)
  and returns ``(exit_code, summary_dict_or_None)``.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
import uuid
from pathlib import Path

import pytest

DEMO_SPEC = Path(__file__).resolve().parent.parent / "deploy" / "demo_cluster.yaml"


@pytest.fixture(scope="session")
def adbray_cluster():
    """A session-scoped local cluster (the spec of ``deploy/demo_cluster.yaml``)."""
    os.environ.setdefault("ADBRAY_STATE", tempfile.mkdtemp(prefix="adbray-test-state-"))
    os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
    from deploy import local
    from deploy.spec import load_spec

    spec = load_spec(str(DEMO_SPEC), name=f"test-{os.getpid()}")
    state = local.up(spec, log=lambda *_: None)
    yield state
    import ray

    if ray.is_initialized():
        ray.shutdown()
    local.down(state.name, log=lambda *_: None)


@pytest.fixture(scope="session")
def adbray_ray(adbray_cluster):
    """This process attached to ``adbray_cluster`` as a Ray driver."""
    import ray

    from pipelines.connect import use_token

    os.environ["RAY_ADDRESS"] = adbray_cluster.gcs_address
    os.environ.update(adbray_cluster.storage_env())
    use_token(token_path=adbray_cluster.token_path)
    if not ray.is_initialized():
        ray.init(address=adbray_cluster.gcs_address, log_to_driver=False)
    yield adbray_cluster


def storage_run_dir(name: str) -> str:
    """A new folder ``<cluster storage>/tests/<name>-<id>`` (after ``adbray_ray``; for fixtures of any scope)."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", name)[:60]
    return f"{os.environ['ADBRAY_STORAGE'].rstrip('/')}/tests/{name}-{uuid.uuid4().hex[:6]}"


@pytest.fixture
def adbray_run_dir(adbray_ray, request):
    """A new run folder on the cluster's object storage, named after the test."""
    return storage_run_dir(request.node.name)


def local_run_traces() -> set[str]:
    """What lies under this machine's run-folder root (``$ADBRAY_RUNS`` or ``./runs``, two levels:
    ``<template>/<run>``) plus stray ``./oss:``/``./s3:`` folders (a URI taken for a local path).
    Compare before and after a cluster run: a run into object storage must add nothing here."""
    from .io import runs_root

    root = Path(runs_root())
    found = {str(p) for pattern in ("*", "*/*") for p in root.glob(pattern)}
    return found | {name for name in ("oss:", "s3:") if Path(name).exists()}


@pytest.fixture
def run_template(capsys):
    """``run_template(template, args) -> (exit_code, summary)``: the template's CLI in this process;
    the summary is the last stdout line parsed as JSON (None when there is none)."""

    def run(template, args):
        code = template.main([str(a) for a in args])
        lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
        try:
            return code, json.loads(lines[-1]) if lines else None
        except json.JSONDecodeError:
            return code, None

    return run
