"""``adbray new NAME [--from TEMPLATE] [--dir DIR]``: a template as a standalone package for a team repo.

Writes ``DIR/NAME/`` with its own ``pyproject.toml`` (depends on ``adbray``, registers the
template in the ``adbray.templates`` entry-point group), the package ``NAME/`` copied from an
installed template (``--from``, default the minimal ``squares`` example) with its name
replaced, a README, and ``tests/test_template.py`` using adbray's pytest fixtures (a
session-scoped local cluster). ``pip install -e DIR/NAME`` and it appears in ``adbray demo``,
``cluster up --template``, ``submit`` and ``group plan``.
"""
from __future__ import annotations

import keyword
import re
import shutil
import sys
from pathlib import Path

from pipelines.template import load_template

NAME_RE = re.compile(r"[a-z][a-z0-9_]{1,39}")
TEXT_SUFFIXES = {".py", ".yaml", ".yml", ".md", ".txt", ".toml", ".cfg"}


class ScaffoldError(ValueError):
    """The new template cannot be written (bad name, existing folder, unknown source)."""


def check_name(name: str) -> None:
    """A new template's name must be a fresh, importable package name."""
    if not NAME_RE.fullmatch(name) or keyword.iskeyword(name):
        raise ScaffoldError(f"template name {name!r} must match [a-z][a-z0-9_]{{1,39}} (a Python package name)")
    if name in sys.stdlib_module_names or name in ("pipelines", "deploy", "ray", "adbray", "tests"):
        raise ScaffoldError(f"template name {name!r} would shadow the module {name!r}: pick another")


def new_template(name: str, source: str = "squares", dest: str | Path = ".") -> Path:
    """Write the standalone template project ``dest/name``; returns its folder."""
    check_name(name)
    template = load_template(source)
    project = Path(dest).resolve() / name
    if project.exists():
        raise ScaffoldError(f"{project} already exists")
    package = project / name
    shutil.copytree(template.root, package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "runs"))
    renames = [(template.package, name), (template.name, name)]
    for path in package.rglob("*"):
        if path.is_file() and path.suffix in TEXT_SUFFIXES:
            text = path.read_text()
            for old, new in renames:
                text = re.sub(rf"(?<![\w.]){re.escape(old)}(?!\w)", new, text)
            path.write_text(text)
    (project / "tests").mkdir()
    (project / "pyproject.toml").write_text(PYPROJECT.format(name=name, source=source))
    (project / "README.md").write_text(README.format(name=name, source=source))
    (project / "tests" / "test_template.py").write_text(TESTS.format(name=name))
    return project


PYPROJECT = '''[build-system]
requires = ["setuptools>=64"]
build-backend = "setuptools.build_meta"

[project]
name = "{name}"
version = "0.1.0"
description = "A Ray workload template (from adbray's {source})"
requires-python = ">=3.10"
dependencies = ["adbray"]

[project.optional-dependencies]
dev = ["pytest>=8"]

# how adbray finds this template (adbray demo / cluster up --template / submit / group plan)
[project.entry-points."adbray.templates"]
{name} = "{name}.template:TEMPLATE"

[tool.setuptools]
packages = {{find = {{include = ["{name}*"]}}}}

[tool.setuptools.package-data]
"*" = ["configs/*.yaml", "*.yaml"]
'''

README = '''# {name}

A Ray workload template, started with `adbray new {name} --from {source}`.

```bash
pip install -e '.[dev]'          # next to an installed adbray
python -m {name} --help          # the steps and the common options
python -m {name}                 # every step, on a local in-process Ray
python -m {name} STEP --run-dir DIR   # one step on an existing run folder
adbray demo --template {name}    # on a local multi-node cluster
adbray submit {name} --group G   # on a managed resource group (see adbray's docs/deploy.md)
pytest                           # on a session-scoped local cluster (adbray's pytest fixtures)
```

The declaration is `{name}/template.py`; configs in `{name}/configs/`; the resource group in
`{name}/resource_group.yaml`.
'''

TESTS = '''"""{name}: the CLI lists its steps, its config loads, and a small run ends to end on a local cluster."""
import click
import pytest

from pipelines.config import ConfigError
from pipelines.io import read_json
from {name}.template import TEMPLATE


def test_help_lists_every_step_and_the_common_options():
    command = TEMPLATE.command()
    text = command.get_help(click.Context(command))
    for word in ["--config", "--set", "--address", "--run-dir", *[s.name for s in TEMPLATE.steps]]:
        assert word in text, word


def test_config_loads_and_a_bad_key_is_one_line():
    TEMPLATE.load_config(None, [])
    with pytest.raises(ConfigError) as e:
        TEMPLATE.load_config(None, ["no_such_section.value=1"])
    assert "no_such_section" in str(e.value) and "\\n" not in str(e.value)


def test_small_run_end_to_end(run_template, adbray_run_dir):
    """On a local cluster whose workers have their own disks, into a run folder on its OSS stand-in."""
    small = [x for item in TEMPLATE.test_overrides for x in ("--set", item)]
    code, summary = run_template(TEMPLATE, ["--run-dir", adbray_run_dir, *small])
    assert code == 0 and summary["template"] == "{name}" and summary["step"] == "all"
    assert read_json(adbray_run_dir + "/summary.json")["metrics"] == summary["metrics"]
    assert TEMPLATE.key_metric in summary["metrics"]
    assert summary["steps"] and list(summary["step_seconds"]) == summary["steps"]
'''
