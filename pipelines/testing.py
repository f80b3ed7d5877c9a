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
    """A session-scoped local cluster (the spec of ``deploy/demo_cluster.yaml``); with
    ``ADBRAY_TEST_CLUSTER=NAME``, the running local cluster NAME (e.g. ``adbray demo --keep``'s
    ``adbray-demo``), left running afterwards."""
    os.environ.setdefault("ADBRAY_STATE", tempfile.mkdtemp(prefix="adbray-test-state-"))
    os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
    from deploy import local
    from deploy.spec import load_spec

    if os.environ.get("ADBRAY_TEST_CLUSTER"):
        state = local.load_state(os.environ["ADBRAY_TEST_CLUSTER"])
        if not local.alive_nodes(state):
            pytest.exit(f"ADBRAY_TEST_CLUSTER={state.name}: the cluster is not running", returncode=1)
        yield state
        return

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


def chromium_path() -> str:
    """The system Chromium (Debian's ``chromium`` package; ``.ci/run`` installs it)."""
    import shutil

    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    raise RuntimeError("no Chromium on PATH: apt-get install chromium (as .ci/run does)")


def open_in_browser(page_path: str | Path, screenshot: str | Path) -> dict:
    """Open a local HTML file in headless Chromium (Playwright driving the system browser) and report
    what a person would see: ``{"errors": console errors and page exceptions, "requests": URLs it
    fetched beyond file:/data:, "images": [(alt, naturalWidth)], "text": the page's text}``; the full
    page is saved as a PNG to ``screenshot``."""
    from playwright.sync_api import sync_playwright

    errors, requests = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: None if r.url.startswith(("file:", "data:")) else requests.append(r.url))
            page.goto(Path(page_path).resolve().as_uri(), wait_until="load")
            images = page.eval_on_selector_all("img", "els => els.map(e => [e.alt, e.naturalWidth])")
            text = page.inner_text("body")
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return {"errors": errors, "requests": requests, "images": [tuple(i) for i in images], "text": text}


def blank_image(path: str | Path) -> bool:
    """Whether a PNG is (nearly) one flat colour, e.g. a screenshot of a page that rendered nothing."""
    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(path).convert("L"), dtype=float)
    return pixels.std() < 2.0 or len(np.unique(pixels)) < 8


def run_locust(locustfile: str | Path, host: str, folder: str | Path, seconds: int = 5, users: int = 4) -> dict:
    """Run a locustfile headless against ``host`` for ``seconds``; ``{request name: Locust's stats row}``
    (``Request Count``, ``Failure Count``, percentiles ... as strings), ``Aggregated`` included."""
    import csv
    import subprocess
    import sys

    prefix = Path(folder) / "locust"
    done = subprocess.run([sys.executable, "-m", "locust", "-f", str(locustfile), "--headless", "--host", host,
                           "-u", str(users), "-r", str(users), "-t", f"{seconds}s", "--csv", str(prefix),
                           "--only-summary", "--exit-code-on-error", "0"], check=False,
                          cwd=Path(locustfile).resolve().parent.parent, capture_output=True, text=True,
                          timeout=seconds + 120)
    if done.returncode != 0:
        raise RuntimeError(f"locust exited {done.returncode}: {done.stderr[-2000:]}")
    with open(f"{prefix}_stats.csv") as f:
        return {row["Name"]: row for row in csv.DictReader(f)}
