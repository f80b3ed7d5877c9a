"""The template contract: a template declares itself once, the toolkit runs it.

A template package has one ``template.py``::

    TEMPLATE = Template(
        name="recsys", load_config=config.load, key_metric="ndcg10_ranker",
        steps=[Step("data", data.run, makes=("impressions", ...)),
               Step("retrieval", retrieval.run, needs=("impressions",), makes=("retriever",)), ...],
        serve_app="recsys.serve:app_builder")

and its ``__main__.py`` is ``TEMPLATE.exit()``. That gives, for every template alike:

- ``python -m TEMPLATE`` runs every step into a new (or ``--run-dir``) run folder;
- ``python -m TEMPLATE STEP --run-dir DIR`` runs one step on an existing run folder,
  reading its inputs from the folder's manifest (``run.json``, written after each step);
- the options ``--config``, ``--set key=value``, ``--address``, ``--run-dir`` (plus the
  template's flag aliases for config keys, e.g. ``--input`` -> ``input.path``);
- one ``local_ray`` config section sizing an in-process Ray (ignored on a cluster);
- the summary line printed last, computed here: ``template``, ``step``, ``run_dir``,
  ``outputs``, ``metrics``, ``rejects``, ``rows`` (rows the steps wrote), ``step_seconds``.

A step is a plain function ``run(cfg, run: Run) -> StepResult``; it finds inputs with
``run.input(name)`` and puts outputs under ``run.path(name)``. Templates are found
through the ``adbray.templates`` entry-point group (see :func:`discover`), so a
package installed from a team repo is a template like the built-in ones.
"""
from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import import_module
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import click

from .cli import RunFailed, run_main, template_options
from .config import LocalRayConfig

ENTRY_POINT_GROUP = "adbray.templates"
MANIFEST = "run.json"


@dataclass
class StepResult:
    """What a step made: named outputs (paths/URIs), metrics, rows written, rejected records.

    ``failure`` (one line) makes the run exit non-zero *after* the outputs are recorded and
    the summary is printed (e.g. too many rejects: the rejects are what the user needs to see).
    """

    outputs: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    rows: int = 0
    rejects: int = 0
    failure: str | None = None


@dataclass
class Run:
    """The run folder steps read and write: its path or URI and the outputs recorded so far."""

    dir: str
    outputs: dict[str, str] = field(default_factory=dict)

    def path(self, name: str) -> str:
        """Where output ``name`` goes inside the run folder."""
        return f"{self.dir}/{name}"

    def input(self, name: str) -> str:
        """The recorded output ``name``; a one-line FileNotFoundError when no step made it yet."""
        if name not in self.outputs:
            raise FileNotFoundError(f"run folder {self.dir} has no {name!r}: run the step that makes it first")
        return self.outputs[name]


@dataclass
class Step:
    """One step: a name, ``run(cfg, run) -> StepResult``, the outputs it reads and makes.

    ``preflight(cfg)`` (optional) checks the config for this step before any cluster work.
    ``needs`` is a tuple of output names, or ``needs(cfg)`` returning one where it depends on
    the config (e.g. no ``sample`` needed when the user gives an input). ``when(cfg)``
    (optional) says whether the all-in-one run includes it (e.g. an online smoke test only
    when configured); run by name, a step always runs.
    """

    name: str
    run: Callable[[Any, Run], StepResult]
    needs: tuple[str, ...] | Callable[[Any], tuple[str, ...]] = ()
    makes: tuple[str, ...] = ()
    help: str = ""
    when: Callable[[Any], bool] | None = None
    preflight: Callable[[Any], None] | None = None  # config checks for this step, before any cluster work


@dataclass
class Template:
    """A template's declaration; see the module docstring."""

    name: str
    load_config: Callable[[str | None, Sequence[str]], Any]
    steps: list[Step]
    key_metric: str
    description: str = ""
    serve_app: str | None = None
    options: dict[str, str] = field(default_factory=dict)  # --flag -> config key, e.g. {"manifest": "input.path"}
    preflight: Callable[[Any], None] | None = None  # config checks before any cluster work
    test_overrides: list[str] = field(default_factory=list)  # --set items for a tiny run (tests, smoke)
    quality_bars: dict[str, str] = field(default_factory=dict)  # metric -> bar shown in the report (">= 0.6")
    # the user's data it can read instead of generating its own: ``input`` config key -> pyarrow schema
    # (``{"path": transactions, "labels_path": labels}``; see pipelines.input)
    inputs: dict[str, Any] = field(default_factory=dict)
    package: str = ""

    def __post_init__(self):
        self.package = self.package or self.name
        if self.inputs and "input" not in self.options:
            self.options = {"input": "input.path", **self.options}
        names = [s.name for s in self.steps]
        if len(set(names)) != len(names) or "all" in names:
            raise ValueError(f"template {self.name}: step names must be unique and not 'all': {names}")

    # ------------------------------------------------------------- layout
    @property
    def root(self) -> Path:
        """The template package's folder (holds configs/ and resource_group.yaml)."""
        return Path(import_module(self.package).__file__).resolve().parent

    @property
    def resource_group(self) -> Path:
        return self.root / "resource_group.yaml"

    def step(self, name: str) -> Step:
        for s in self.steps:
            if s.name == name:
                return s
        raise click.BadParameter(f"unknown step {name!r} (steps: {', '.join(s.name for s in self.steps)})")

    # ------------------------------------------------------------- running
    def run(self, cfg, run_dir: str, step: str | None = None, log=None) -> dict:
        """Run every step (or one, on an existing run folder) into ``run_dir``; the summary dict."""
        from .report import summary

        log = log or (lambda m: print(f"[{self.name}] {m}", file=sys.stderr, flush=True))
        run, chosen = self.plan(cfg, run_dir, step)
        outputs, metrics, rows, rejects, seconds, failure = {}, {}, 0, 0, {}, None
        for s in chosen:
            t0 = time.perf_counter()
            result = s.run(cfg, run)
            seconds[s.name] = round(time.perf_counter() - t0, 2)
            run.outputs.update(result.outputs)
            outputs.update(result.outputs)
            metrics.update(result.metrics)
            rows += int(result.rows)
            rejects += int(result.rejects)
            write_manifest(run)
            log(f"{s.name}: {result.rows} rows, {result.rejects} rejects in {seconds[s.name]:.1f}s")
            if result.failure:
                failure = f"step {s.name}: {result.failure}"
                break
        done = list(seconds)
        result = summary(self.name, step or "all", run_dir, outputs, metrics, rejects, rows=rows,
                         step_seconds=seconds, steps=done)
        if failure:
            result["failure"] = failure
        return result

    def plan(self, cfg, run_dir: str, step: str | None = None) -> tuple[Run, list[Step]]:
        """The run folder and the steps to run; FileNotFoundError (one line) when a single step's
        inputs are not in the run folder (checked before any cluster work)."""
        run = Run(run_dir, read_manifest(run_dir) if step else {})
        chosen = [self.step(step)] if step else [s for s in self.steps if s.when is None or s.when(cfg)]
        available = set(run.outputs)
        for s in chosen:
            missing = [n for n in self.needs(s, cfg) if n not in available]
            if missing:
                raise FileNotFoundError(
                    f"step {s.name} reads {', '.join(missing)}: give --run-dir of a run folder that has them "
                    f"(python -m {self.package} {self._maker(missing[0])} --run-dir DIR)")
            available.update(s.makes)
        return run, chosen

    @staticmethod
    def needs(step: Step, cfg) -> tuple[str, ...]:
        """The outputs ``step`` reads under ``cfg``."""
        return tuple(step.needs(cfg) if callable(step.needs) else step.needs)

    def _maker(self, output: str) -> str:
        return next((s.name for s in self.steps if output in s.makes), "<earlier step>")

    def connect(self, cfg, address: str | None) -> None:
        """Attach to ``address`` (or RAY_ADDRESS / the job's cluster); else an in-process Ray sized by
        ``local_ray``."""
        import os

        from .connect import connect

        local = getattr(cfg, "local_ray", None) or LocalRayConfig()
        if not (address or os.environ.get("RAY_ADDRESS")):  # our own Ray: its processes inherit these
            for key, value in local.env.items():
                os.environ.setdefault(key, value)
        connect(address, num_cpus=local.cpus, object_store_memory=local.object_store_mb << 20)

    def check_inputs(self, cfg, address: str | None = None) -> None:
        """Before any cluster work: every configured ``input.*`` path has the columns its schema
        requires (after ``input.columns``), and a local one is readable by the cluster's nodes."""
        section = getattr(cfg, "input", None)
        if section is None or not self.inputs:
            return
        from .input import check_input, check_mapping, is_mysql

        check_mapping(section.columns, list(self.inputs.values()))
        for key, schema in self.inputs.items():
            path = getattr(section, key, None)
            if not path:
                continue
            if section.workers_read(path) and not is_mysql(path, section.format):
                require_cluster_readable(path, f"input.{key}", "--input" if key == "path" else f"--set input.{key}=",
                                         address)
            if section.is_table(path):
                check_input(section, schema, path, what=f"input.{key}")

    # ----------------------------------------------------------------- CLI
    def command(self) -> click.Command:
        """``python -m TEMPLATE [STEP] [--config] [--set] [--address] [--run-dir] [template flags]``."""
        steps_help = "\n".join(f"  {s.name:<12} {s.help}" for s in self.steps)

        @click.command(name=self.name, help=f"{self.description or self.name}\n\nSTEP (default: all):\n\n"
                       f"\b\n{steps_help}", cls=_HelpEpilogCommand, epilog_source=self._config_help,
                       context_settings={"help_option_names": ["-h", "--help"]})
        @click.argument("step", required=False, type=click.Choice(["all", *[s.name for s in self.steps]]))
        @template_options
        def main(step, config, overrides, address, run_dir, **flags):
            # a flag's value is a plain string (JSON-quoted so that YAML keeps '#', 'yes', '2024' as text)
            keys = {flag.replace("-", "_"): key for flag, key in self.options.items()}
            overrides = [*overrides, *(f"{keys[k]}={json.dumps(v)}" for k, v in flags.items() if v is not None)]
            cfg = self.load_config(config, overrides)
            global _cli_address
            _cli_address = address
            if self.preflight:
                self.preflight(cfg)
            self.check_inputs(cfg, address)
            step = None if step in (None, "all") else step
            if step and self.needs(self.step(step), cfg) and not run_dir:
                raise click.UsageError(f"step {step} reads an earlier step's outputs: give --run-dir")
            out = prepare_run_dir(self.name, run_dir, address)
            _, chosen = self.plan(cfg, out, step)
            for s in chosen:
                if s.preflight:
                    s.preflight(cfg)
            self.connect(cfg, address)
            from .connect import cluster_info
            from .html_report import REPORT, write_config, write_report
            from .io import first_line, join
            from .report import emit

            cluster = cluster_info()
            print(f"[{self.name}] run folder {out}; dashboard {cluster['dashboard'] or 'none'}", file=sys.stderr)
            write_config(out, cfg)
            result = self.run(cfg, out, step)
            result.update(cluster=cluster, report=join(out, REPORT))
            emit(result)
            try:
                write_report(out, self)
            except Exception as e:  # noqa: BLE001 - the run's outputs are written; say why the page is not
                print(f"[{self.name}] report not written: {first_line(e)}",
                      file=sys.stderr)
            if result.get("failure"):
                raise RunFailed(result["failure"])

        for flag, key in self.options.items():
            main = click.option(f"--{flag}", flag.replace("-", "_"), default=None,
                                help=f"Alias of --set {key}=VALUE.")(main)
        return main

    def _config_help(self) -> str:
        """The config keys with their values in the default config (for ``--help``; ``--set KEY=VALUE``)."""
        import yaml

        from .html_report import config_yaml
        from .io import first_line

        try:
            data = yaml.safe_load(config_yaml(self.load_config(None, [])))
        except Exception as e:  # noqa: BLE001 - help must show even when the default config is broken
            return f"(config keys unavailable: {first_line(e)})"

        def flat(value, prefix=""):
            if isinstance(value, dict) and value:
                for k, v in value.items():
                    yield from flat(v, f"{prefix}{k}.")
            else:
                yield prefix.rstrip("."), value

        lines = [f"  {key} = {json.dumps(value)}" for key, value in flat(data)]
        return "CONFIG KEYS (--set KEY=VALUE; values of the default config):\n\n\b\n" + "\n".join(lines)

    def main(self, argv: Sequence[str] | None = None) -> int:
        """Run the CLI; errors are one stderr line and a non-zero return code."""
        return run_main(self.command(), list(argv) if argv is not None else None)

    def exit(self, argv: Sequence[str] | None = None) -> None:
        """``sys.exit(self.main(argv))`` for ``__main__`` blocks."""
        sys.exit(self.main(argv))

    def step_alias(self, step: str) -> None:
        """``python -m TEMPLATE.STEP_MODULE`` = ``python -m TEMPLATE STEP`` (kept for old commands)."""
        self.exit([step, *sys.argv[1:]])


DISKS_MARKER = "ADBRAY_DISKS"  # set by the local provider in its clusters' processes: isolated | shared
SHARED_MOUNT = "ADBRAY_SHARED_MOUNT"  # folders mounted at the same place on every node (NAS), ':'-separated
STORAGE = "ADBRAY_STORAGE"  # the cluster's storage location (oss://bucket/): default home of runs


_cli_address: str | None = None  # the running template command's --address (so that preflights see it)


def attached(address: str | None = None) -> bool:
    """Whether this process runs against a Ray cluster (``--address``, ``RAY_ADDRESS``, a job)."""
    return bool(address or _cli_address or os.environ.get("RAY_ADDRESS"))


def shared_disk_problem(path: str, address: str | None = None, what: str = "run folder",
                        flag: str = "--run-dir") -> str | None:
    """Why a local ``path`` (a run folder, an input, a model) cannot work here, or None.

    A cluster's nodes share no disk (a real group; a local cluster with isolated disks), so a
    local run folder works only for in-process Ray, a local cluster marked ``ADBRAY_DISKS=shared``,
    or below a declared shared mount (``--shared-mount`` / ``$ADBRAY_SHARED_MOUNT``, e.g. a NAS
    mounted at the same path on every node).
    """
    from .io import is_remote

    if is_remote(path) or not attached(address) or os.environ.get(DISKS_MARKER) == "shared":
        return None
    resolved = Path(path).resolve()
    mounts = [Path(m).resolve() for m in os.environ.get(SHARED_MOUNT, "").split(":") if m]
    if any(resolved == m or m in resolved.parents for m in mounts):
        return None
    return (f"{what} {path} is on this machine's disk, which the cluster's nodes do not share: "
            f"give {flag}{'' if flag.endswith('=') else ' '}oss://BUCKET/PATH (or --shared-mount DIR for a folder "
            "every node mounts)")


def require_cluster_readable(path: str | None, what: str, flag: str, address: str | None = None) -> None:
    """RunFailed (one line) when a local ``path`` the cluster's nodes will read cannot be read there
    (:func:`shared_disk_problem`); for template preflights (``--input``, ``--model``)."""
    problem = path and shared_disk_problem(path, address, what, flag)
    if problem:
        raise RunFailed(problem)


class _HelpEpilogCommand(click.Command):
    """A command whose epilog (the config key listing) is built only when ``--help`` shows it."""

    def __init__(self, *args, epilog_source=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.epilog_source = epilog_source

    def format_epilog(self, ctx, formatter):
        if self.epilog is None and self.epilog_source:
            self.epilog = self.epilog_source()
        super().format_epilog(ctx, formatter)


def prepare_run_dir(template: str, run_dir: str | None, address: str | None = None) -> str:
    """The run folder: the given one (created when local), else ``<cluster storage>/runs/<template>/<id>``
    when attached to a cluster that has storage (``$ADBRAY_STORAGE``), else a new local
    ``runs/<template>/<id>``. RunFailed (one line) for a local folder the cluster cannot see
    (:func:`shared_disk_problem`); checked before anything is created."""
    from .io import is_remote, join, new_run_id, runs_root

    if not run_dir and attached(address) and os.environ.get(STORAGE):
        run_dir = join(os.environ[STORAGE], "runs", template, new_run_id())
    if not run_dir:
        run_dir = os.path.join(runs_root(), template, new_run_id())
    problem = shared_disk_problem(run_dir, address)
    if problem:
        raise RunFailed(problem)
    if is_remote(run_dir):
        return run_dir.rstrip("/")
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    return str(Path(run_dir).resolve())


def read_manifest(run_dir: str) -> dict[str, str]:
    """The outputs recorded in ``run_dir``'s manifest (empty when there is none)."""
    from .io import filesystem_for, first_line

    fs, path = filesystem_for(f"{run_dir}/{MANIFEST}")
    try:
        with fs.open_input_stream(path) as f:
            outputs = json.loads(f.read()).get("outputs", {})
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, AttributeError) as e:  # unreadable, denied, or not a JSON object
        raise RunFailed(f"cannot read the run folder's manifest {run_dir}/{MANIFEST}: "
                        f"{first_line(e)}") from None
    if not isinstance(outputs, dict):
        raise RunFailed(f"{run_dir}/{MANIFEST}: 'outputs' is not a mapping")
    return {str(k): str(v) for k, v in outputs.items()}


def write_manifest(run: Run) -> None:
    """Record ``run.outputs`` in the run folder (what later single steps read)."""
    from .io import filesystem_for

    fs, path = filesystem_for(f"{run.dir}/{MANIFEST}")
    with fs.open_output_stream(path) as f:
        f.write(json.dumps({"outputs": run.outputs}, indent=2).encode())


# ------------------------------------------------------------------ discovery
def discover() -> dict[str, Any]:
    """``{name: entry point}`` of every installed template (group ``adbray.templates``)."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def load_template(name: str) -> Template:
    """The registered template ``name``; a one-line error listing the known ones otherwise."""
    found = discover()
    if name not in found:
        raise click.BadParameter(f"unknown template {name!r} (installed: {', '.join(sorted(found)) or 'none'})")
    template = found[name].load()
    if not isinstance(template, Template):
        raise RunFailed(f"entry point {name} = {found[name].value} is not a pipelines.template.Template")
    return template
