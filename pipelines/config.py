"""Config models loaded from YAML with ``--set a.b=c`` overrides.

Templates define pydantic models and call :func:`load_config`. Invalid config is
raised as :class:`ConfigError` with one line naming the field and, where the
field is a ``Literal``/enum, the allowed values. Overrides that carry secrets
reach a submitted job through the env var ``ADBRAY_SET`` (a JSON list of
``key=value``, set by ``adbray submit``), applied after the command line's.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

M = TypeVar("M", bound=BaseModel)
SET_ENV = "ADBRAY_SET"  # JSON list of secret-bearing ``key=value`` overrides (kept out of the job's command line)


URL_PASSWORD = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^\s/:@]*:)([^\s/]+)(@)")  # password: up to the last @
MASK = "***"


def redact(text) -> str:
    """``text`` with URL passwords masked (``mysql://u:***@host/db``), for anything printed or recorded."""
    return URL_PASSWORD.sub(lambda m: f"{m.group(1)}{MASK}{m.group(3)}", str(text))


class ConfigError(ValueError):
    """A one-line, user-facing configuration error."""


class StrictModel(BaseModel):
    """Base for config sections: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


# Ray 2.60 Serve's fast path: throughput-optimised request handling and an HAProxy ingress on each node. Serve's
# processes read these when they start: the Ray cluster's environment, not the deploying driver's.
FAST_SERVE_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"}


class LocalRayConfig(StrictModel):
    """Size of the in-process Ray started when no cluster address is given (ignored on a cluster).

    Every template has this section as ``local_ray``; ``connect()`` applies it only
    when it starts Ray itself, and preflight never counts it as a task request.
    """

    cpus: int = Field(4, ge=1)
    object_store_mb: int = Field(300, ge=75)
    env: dict[str, str] = Field(default_factory=dict, description="environment of the in-process Ray's processes")

    def add_env(self, defaults: dict[str, str]) -> None:
        """Start the in-process Ray with ``defaults`` too; what ``env`` already sets wins."""
        self.env = {**defaults, **self.env}


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split ``a.b=c`` into (["a", "b"], value parsed as YAML scalar)."""
    if "=" not in item:
        raise ConfigError(f"bad override {item!r}: expected key.path=value")
    key, raw = item.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"bad override {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(data: dict, overrides: Iterable[str]) -> dict:
    """Apply ``a.b=c`` overrides in place on a nested dict and return it."""
    for item in overrides or ():
        parts, value = parse_override(item)
        node = data
        for p in parts[:-1]:
            nxt = node.get(p)
            if not isinstance(nxt, dict):
                nxt = {}
                node[p] = nxt
            node = nxt
        node[parts[-1]] = value
    return data


def env_overrides() -> list[str]:
    """The overrides in ``$ADBRAY_SET`` (none when unset); a malformed value is a ConfigError."""
    raw = os.environ.get(SET_ENV)
    if not raw:
        return []
    try:
        items = json.loads(raw)
    except ValueError:
        items = None
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        raise ConfigError(f"{SET_ENV} must be a JSON list of key=value strings")
    return items


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping; a missing or malformed file is a ConfigError."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: invalid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping")
    return data


def format_validation_error(err: ValidationError, source: str = "config") -> str:
    """One line: the first failing field path, the message and allowed values."""
    first = err.errors()[0]
    loc = ".".join(str(x) for x in first.get("loc", ())) or "<root>"
    msg = first.get("msg", "invalid value")
    ctx = first.get("ctx") or {}
    extra = ""
    if "expected" in ctx:
        extra = f" (allowed: {ctx['expected']})"
    more = len(err.errors()) - 1
    tail = f" [+{more} more]" if more > 0 else ""
    value = first.get("input")
    shown = f", got {value!r}" if not isinstance(value, dict) and first.get("type") != "missing" else ""
    return f"{source}: {loc}: {msg}{extra}{shown}{tail}"


def validate(model: type[M], data: dict, source: str = "config") -> M:
    """Validate a dict into ``model`` or raise a one-line ConfigError."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from None


def load_config(
    model: type[M],
    path: str | Path | None = None,
    overrides: Iterable[str] = (),
    default_path: str | Path | None = None,
) -> M:
    """Load ``model`` from ``path`` (or ``default_path``) plus ``--set`` overrides."""
    src = path or default_path
    data = read_yaml(src) if src else {}
    apply_overrides(data, [*(overrides or ()), *env_overrides()])
    return validate(model, data, source=str(src or "config"))
