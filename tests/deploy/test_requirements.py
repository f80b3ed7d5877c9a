"""What the cluster image needs: every third-party import of a template and of the toolkit it runs with
(``pipelines/``, less the test and benchmark helpers) is in the base image (the dependency closure of
``ray[data,serve,train]``) or in the template's ``requirements``; each requirement is one the code uses
or the toolkit's own, and its version range admits what this project is tested with."""
from __future__ import annotations

import ast
import re
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from deploy.spec import load_spec

ROOT = Path(__file__).resolve().parents[2]
TEMPLATES = ["riskcontrol", "recsys", "multimodal", "embodied"]
OWN = {"pipelines", "deploy", "tests", *TEMPLATES}
NOT_ON_THE_CLUSTER = {"testing.py", "bench.py", "locustfile.py"}  # pytest plugin, benchmarks, load tests


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _closure(requirements: list[str]) -> set[str]:
    """Distribution names a set of requirements installs (extras followed, as pip would)."""
    seen, todo = set(), [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        key = (_norm(req.name), tuple(sorted(req.extras)))
        if key in seen:
            continue
        seen.add(key)
        try:
            deps = metadata.distribution(req.name).requires or []
        except metadata.PackageNotFoundError:
            continue
        for line in deps:
            dep = Requirement(line)
            if dep.marker is None or any(dep.marker.evaluate({"extra": e}) for e in (*req.extras, "")):
                todo.append(dep)
    return {name for name, _ in seen}


BASE_IMAGE = _closure(["ray[data,serve,train]"])


def _imports(paths) -> dict[str, str]:
    """Top-level third-party modules imported anywhere in ``paths`` (lazy imports too) -> a file importing it."""
    found = {}
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                if top not in sys.stdlib_module_names and top not in OWN and top != "__future__":
                    found.setdefault(top, str(path.relative_to(ROOT)))
    return found


def _code(package: str):
    return [p for p in (ROOT / package).rglob("*.py") if p.name not in NOT_ON_THE_CLUSTER]


PACKAGES = metadata.packages_distributions()  # module -> distributions (a scan of site-packages: once)


def _distributions(module: str) -> set[str]:
    return {_norm(d) for d in PACKAGES.get(module, [module])}


@pytest.mark.parametrize("template", TEMPLATES)
def test_every_import_is_in_the_base_image_or_the_templates_requirements(template):
    requirements = load_spec(template).requirements
    covered = BASE_IMAGE | _closure(requirements)
    missing = {module: where for module, where in _imports(_code(template) + _code("pipelines")).items()
               if not _distributions(module) & covered}
    assert not missing, f"{template}/resource_group.yaml requirements miss: {missing}"


@pytest.mark.parametrize("template", TEMPLATES)
def test_every_requirement_is_used_and_admits_the_tested_version(template):
    used = {d for module in _imports(_code(template) + _code("pipelines")) for d in _distributions(module)}
    for line in load_spec(template).requirements:
        req = Requirement(line)
        assert _norm(req.name) in used, f"{template} requires {line} but imports nothing from it"
        assert _norm(req.name) not in BASE_IMAGE, f"{template}: {line} is already in the base image"
        installed = metadata.version(req.name)
        assert req.specifier.contains(installed, prereleases=True), (line, installed)


def test_a_missing_requirement_is_caught():
    """The check itself: without lightgbm, riskcontrol's imports are not covered."""
    requirements = [r for r in load_spec("riskcontrol").requirements if not r.startswith("lightgbm")]
    covered = BASE_IMAGE | _closure(requirements)
    missing = {m for m in _imports(_code("riskcontrol")) if not _distributions(m) & covered}
    assert missing == {"lightgbm"}
