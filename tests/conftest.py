"""Shared fixtures: one session-scoped local cluster started through the local provider.

Tests that need Ray take ``ray_cluster`` (the cluster's state) or ``ray_connected``
(this pytest process attached as a driver): aliases of the ``adbray_cluster`` and
``adbray_ray`` fixtures that adbray's pytest plugin gives every template repo.
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# keep test clusters' state away from a user's own ~/.adbray
os.environ.setdefault("ADBRAY_STATE", tempfile.mkdtemp(prefix="adbray-test-state-"))
os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")


def service_up(host: str, port: int) -> bool:
    import socket

    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def ray_cluster(adbray_cluster):
    """The session cluster (adbray's pytest plugin, ``pipelines.testing``): head with 0 CPUs plus
    two 2-CPU workers of group ``cpu``, token auth on, small object stores."""
    return adbray_cluster


@pytest.fixture(scope="session")
def ray_connected(adbray_ray):
    """This process attached to the session cluster as a Ray driver."""
    return adbray_ray


def require_service(name: str, host: str, port: int) -> None:
    """Skip when a service is absent, except in CI (``CI=true``), where the run fails instead:
    a CI machine without MariaDB or Redis would otherwise go green with HA, replica-kill and
    every MySQL test silently skipped."""
    if service_up(host, port):
        return
    message = f"{name} is not running on {host}:{port}"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{message} (CI=true: a missing service fails the run)", pytrace=False)
    pytest.skip(message)


@pytest.fixture
def mysql_url():
    require_service("MariaDB", "127.0.0.1", 3306)
    return "mysql://root@127.0.0.1:3306/test"


@pytest.fixture
def redis_url():
    require_service("Redis", "127.0.0.1", 6379)
    return "redis://127.0.0.1:6379/0"
