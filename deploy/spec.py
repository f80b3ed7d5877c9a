"""The resource-group spec (``resource_group.yaml``), validated like the service.

The spec-name table (cores/memory per spec) lives here and only here.
"""
from __future__ import annotations

import re
from fractions import Fraction
from pathlib import Path
from typing import Literal

from packaging.requirements import InvalidRequirement, Requirement
from pydantic import Field, field_validator, model_validator

from pipelines.config import ConfigError, StrictModel, read_yaml, validate

# AnalyticDB Spark resource specs: name -> (cores, memory GiB)
SPECS: dict[str, tuple[int, int]] = {
    "small": (1, 4),
    "m.xlarge": (8, 64),
    "m.2xlarge": (16, 128),
}
HEAD_SPECS = tuple(SPECS)
STORAGE_RE = re.compile(r"oss://[a-z0-9][a-z0-9-]{1,61}[a-z0-9](/[A-Za-z0-9._/-]*)?")
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,254}")  # always .fullmatch: "$" lets "\n" through
SHELL_META = re.compile(r"[;&|`$\\\n\r]")
MAX_REQUIREMENTS = 200
REPO_ROOT = Path(__file__).resolve().parent.parent


def check_requirement(line: str) -> None:
    """A requirement specifier (``name[extras] op version``) or ValueError naming the line: no pip options
    (``--extra-index-url``, ``-e``, ``-r``) and no URL requirements (``pkg @ https://…``, ``git+…``)."""
    if line.strip().startswith("-"):
        raise ValueError(f"requirement {line!r}: pip options are not accepted, only requirement specifiers")
    try:
        req = Requirement(line)
    except InvalidRequirement:
        raise ValueError(f"requirement {line!r} is not a requirement specifier (like lightgbm>=4.5)") from None
    if req.url:
        raise ValueError(f"requirement {line!r}: URL requirements are not accepted, only name and version")


def parse_unit(unit: str) -> Fraction:
    """``"1/3"`` -> Fraction(1, 3); ``"1"``/``"2"`` -> whole GPUs. Must be > 0."""
    text = str(unit).strip()
    m = re.fullmatch(r"(\d+)(?:/(\d+))?", text)
    if not m:
        raise ValueError(f"distribution_unit {unit!r} must look like 1, 2 or 1/3")
    num, den = int(m.group(1)), int(m.group(2) or 1)
    if den == 0:
        raise ValueError(f"distribution_unit {unit!r} divides by zero")
    if num == 0:
        raise ValueError(f"distribution_unit {unit!r} must be > 0")
    return Fraction(num, den)


class HeadSpec(StrictModel):
    spec: Literal["small", "m.xlarge", "m.2xlarge"] = "small"
    disk_gb: int = Field(100, ge=30, le=2000)


class WorkerGroup(StrictModel):
    name: str
    type: Literal["CPU", "GPU"] = "CPU"
    spec: str = "m.xlarge"
    disk_gb: int = Field(100, ge=30, le=2000)
    min_workers: int = Field(1, ge=1, le=8)
    max_workers: int = Field(1, ge=1, le=8)
    distribution_unit: str | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.fullmatch(v):
            raise ValueError("must match [A-Za-z0-9][A-Za-z0-9_-]{0,254}")
        return v

    @field_validator("distribution_unit")
    @classmethod
    def _unit(cls, v):
        if v is not None:
            parse_unit(v)
        return v

    @model_validator(mode="after")
    def _check(self):
        if self.min_workers > self.max_workers:
            raise ValueError(f"min_workers {self.min_workers} > max_workers {self.max_workers}")
        if self.type == "CPU" and self.spec not in SPECS:
            raise ValueError(f"unknown CPU spec {self.spec!r} (allowed: {', '.join(SPECS)})")
        if self.type == "GPU" and not self.spec.strip():
            raise ValueError("GPU spec name must not be empty")
        if self.type == "CPU" and self.distribution_unit is not None:
            raise ValueError("distribution_unit is only for GPU groups")
        return self

    @property
    def cores(self) -> int:
        """Cores per worker: from the table for CPU specs; GPU specs default to 8."""
        return SPECS.get(self.spec, (8, 64))[0]

    @property
    def memory_gb(self) -> int:
        return SPECS.get(self.spec, (8, 64))[1]

    @property
    def gpus(self) -> float:
        """GPUs per worker (the distribution unit; 1 if a GPU group gives none)."""
        if self.type != "GPU":
            return 0.0
        return float(parse_unit(self.distribution_unit or "1"))


class ResourceGroupSpec(StrictModel):
    name: str
    category: Literal["BASIC", "HIGH_AVAILABILITY"] = "BASIC"
    head: HeadSpec = HeadSpec()
    worker_groups: list[WorkerGroup] = Field(min_length=1)
    requirements: list[str] = Field(default_factory=list)
    auth_token: str | None = None
    # the group's OSS location (oss://bucket/prefix/), sent as the service's storage mount; where runs
    # go by default (`adbray submit` without --run-dir). A local cluster's stand-in uses its bucket name.
    storage: str | None = None

    @field_validator("storage")
    @classmethod
    def _storage(cls, v: str | None) -> str | None:
        if v is not None and not STORAGE_RE.fullmatch(v):
            raise ValueError(f"storage must be oss://BUCKET/[PREFIX/] (bucket: 3-63 of a-z, 0-9, -), got {v!r}")
        return v if v is None or v.endswith("/") else v + "/"

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.fullmatch(v):
            raise ValueError("must match [A-Za-z0-9][A-Za-z0-9_-]{0,254}")
        return v

    @field_validator("requirements")
    @classmethod
    def _reqs(cls, v: list[str]) -> list[str]:
        if len(v) > MAX_REQUIREMENTS:
            raise ValueError(f"at most {MAX_REQUIREMENTS} requirement lines, got {len(v)}")
        for line in v:
            if SHELL_META.search(line):
                raise ValueError(f"requirement {line!r} contains a shell metacharacter")
            if not line.strip():
                raise ValueError("empty requirement line")
            check_requirement(line)
        return v

    @model_validator(mode="after")
    def _unique(self):
        names = [g.name for g in self.worker_groups]
        if len(set(names)) != len(names):
            raise ValueError(f"worker group names must be unique: {names}")
        return self

    def group(self, name: str) -> WorkerGroup:
        for g in self.worker_groups:
            if g.name == name:
                return g
        raise KeyError(name)

    def reserved(self, at: Literal["min", "max"]) -> dict:
        """Cores, memory, GPUs and disk the group reserves at min or max workers."""
        head_cores, head_mem = SPECS[self.head.spec]
        total = {"cores": head_cores, "memory_gb": head_mem, "gpus": 0.0, "disk_gb": self.head.disk_gb,
                 "workers": 0}
        for g in self.worker_groups:
            n = g.min_workers if at == "min" else g.max_workers
            total["workers"] += n
            total["cores"] += n * g.cores
            total["memory_gb"] += n * g.memory_gb
            total["gpus"] += n * g.gpus
            total["disk_gb"] += n * g.disk_gb
        total["gpus"] = round(total["gpus"], 3)
        return total


BILLING_NOTE = ("quantities only, no prices: CPU head and workers are billed as ACU from the cores they use, "
                "GPU workers by GPU spec and count, disks by their configured size")


def billing(spec: ResourceGroupSpec, at: Literal["min", "max"]) -> list[dict]:
    """The service's billing items for an AI resource group (Ray cluster) and the quantity this spec
    reserves of each at min or max workers: CPU compute (cores; billed as ACU), GPU workers (spec x count
    x distribution unit), worker disk and head disk (GB)."""
    head_cores, _ = SPECS[spec.head.spec]
    workers = [(g, g.min_workers if at == "min" else g.max_workers) for g in spec.worker_groups]
    items = [{"item": "CPU compute (ACU)", "quantity": head_cores + sum(n * g.cores for g, n in workers
                                                                       if g.type == "CPU"),
              "unit": "cores", "of": f"head {spec.head.spec} + CPU workers"}]
    for g, n in workers:
        if g.type == "GPU":
            items.append({"item": "GPU workers", "quantity": n, "unit": f"x {g.spec}", "of": g.name,
                          "distribution_unit": g.distribution_unit or "1", "gpus": round(n * g.gpus, 3)})
    items.append({"item": "Worker disk storage", "quantity": sum(n * g.disk_gb for g, n in workers), "unit": "GB",
                  "of": ", ".join(f"{n} x {g.disk_gb} GB ({g.name})" for g, n in workers)})
    items.append({"item": "Head disk storage", "quantity": spec.head.disk_gb, "unit": "GB", "of": "head"})
    return items


def spec_path(template_or_path: str) -> Path:
    """A template name (``riskcontrol``) or a YAML path -> the spec file path."""
    from pipelines.template import discover, load_template

    p = Path(template_or_path)
    if p.suffix in (".yaml", ".yml"):
        return p
    if template_or_path in discover():  # a registered template (entry point adbray.templates)
        return load_template(template_or_path).resource_group
    if (REPO_ROOT / template_or_path).is_dir():
        return REPO_ROOT / template_or_path / "resource_group.yaml"
    return p


def load_spec(template_or_path: str, name: str | None = None, overrides=()) -> ResourceGroupSpec:
    """Load and validate a spec; any problem is a one-line ConfigError."""
    from pipelines.config import apply_overrides

    path = spec_path(template_or_path)
    if not path.is_file():
        raise ConfigError(f"no resource_group.yaml for {template_or_path!r} (looked at {path})")
    data = apply_overrides(read_yaml(path), overrides)
    if name:
        data["name"] = name
    return validate(ResourceGroupSpec, data, source=str(path))


# -- what a change to a group does (the service's documented consequences) ----------------------------

RESTART_NOTE = ("on a restarted or deleted worker, its running drivers, actors and tasks fail; Ray redeploys "
                "actors and retries tasks on the nodes left, and the objects in that node's object store are lost")
DELETE_NOTE = "deleting the group deletes every node: running jobs and tasks are interrupted immediately"


class Change(StrictModel):
    """One difference between a group's spec and a new one; ``nodes`` is how many nodes it restarts or
    deletes (0: none), ``does`` what the service does to them."""

    text: str
    nodes: int = 0
    does: str = ""


def _counts(g: WorkerGroup) -> str:
    return f"{g.min_workers}..{g.max_workers}"


def spec_changes(old: ResourceGroupSpec, new: ResourceGroupSpec) -> list[Change]:
    """What ModifyDBResourceGroup would change, with the nodes each change restarts or deletes: a new head
    spec restarts the head; a new worker spec or type restarts that group's workers; a new max below the
    old min deletes the workers above it; a removed worker group deletes its workers."""
    out: list[Change] = []
    if old.category != new.category:
        out.append(Change(text=f"category {old.category} -> {new.category} (the service refuses this)"))
    if old.head.spec != new.head.spec:
        out.append(Change(text=f"head: spec {old.head.spec} -> {new.head.spec}", nodes=1,
                          does="restarts the head node"))
    if old.head.disk_gb != new.head.disk_gb:
        out.append(Change(text=f"head: disk {old.head.disk_gb} -> {new.head.disk_gb} GB"))
    olds, news = {g.name: g for g in old.worker_groups}, {g.name: g for g in new.worker_groups}
    for name, g in olds.items():
        if name not in news:
            out.append(Change(text=f"worker group {name}: removed ({g.type} {g.spec} x{_counts(g)})",
                              nodes=g.min_workers, does=f"deletes its workers ({g.min_workers} or more)"))
            continue
        n = news[name]
        if (g.type, g.spec) != (n.type, n.spec):
            out.append(Change(text=f"worker group {name}: {g.type} {g.spec} -> {n.type} {n.spec}",
                              nodes=g.min_workers, does=f"restarts its workers ({g.min_workers} or more)"))
        if (g.min_workers, g.max_workers) != (n.min_workers, n.max_workers):
            gone = g.min_workers - n.max_workers
            out.append(Change(text=f"worker group {name}: workers {_counts(g)} -> {_counts(n)}",
                              nodes=max(gone, 0),
                              does=f"deletes {gone} worker(s): the new max is below the old min" if gone > 0
                              else ""))
        if g.disk_gb != n.disk_gb:
            out.append(Change(text=f"worker group {name}: disk {g.disk_gb} -> {n.disk_gb} GB"))
        if g.distribution_unit != n.distribution_unit:
            out.append(Change(text=f"worker group {name}: distribution unit {g.distribution_unit} -> "
                                   f"{n.distribution_unit}"))
    for name, n in news.items():
        if name not in olds:
            out.append(Change(text=f"worker group {name}: added ({n.type} {n.spec} x{_counts(n)})"))
    added = [r for r in new.requirements if r not in old.requirements]
    dropped = [r for r in old.requirements if r not in new.requirements]
    if added or dropped:
        out.append(Change(text="requirements: " + ", ".join([f"+{r}" for r in added] + [f"-{r}" for r in dropped])))
    if old.storage != new.storage:
        out.append(Change(text=f"storage: {old.storage} -> {new.storage}"))
    return out
