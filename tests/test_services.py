"""The service fixtures skip locally but fail in CI when a service is absent."""
from __future__ import annotations

import pytest

from deploy.local import free_port
from tests.conftest import require_service, service_up


def test_missing_service_skips_outside_ci(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    port = free_port()  # nothing listens there
    assert not service_up("127.0.0.1", port)
    with pytest.raises(pytest.skip.Exception):
        require_service("Nothing", "127.0.0.1", port)


def test_missing_service_fails_in_ci(monkeypatch):
    monkeypatch.setenv("CI", "true")
    port = free_port()
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        require_service("Nothing", "127.0.0.1", port)
