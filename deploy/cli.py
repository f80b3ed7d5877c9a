"""The ``adbray`` command: local clusters, the demo, and (deploy layer) groups and jobs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import click

from pipelines.config import ConfigError

from . import local
from .spec import REPO_ROOT, TEMPLATES, load_spec

# the metric the demo table shows for each template
KEY_METRICS = {"riskcontrol": "auprc", "recsys": "ndcg10_ranker", "embodied": "bc_success_rate",
               "multimodal": "files_per_s"}


def fail(message: str, code: int = 2):
    """One clear line on stderr, then exit non-zero."""
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


@click.group()
def cli():
    """adbray: Ray workload templates for AnalyticDB for MySQL's managed Ray."""


@cli.group()
def cluster():
    """A resource-group spec as a real local multi-node Ray cluster."""


def _spec_from(template, spec_file, name):
    if not (template or spec_file):
        fail("give --template NAME or --spec FILE")
    try:
        return load_spec(spec_file or template, name=name)
    except ConfigError as e:
        fail(str(e))


@cluster.command("up")
@click.option("--template", default=None, help="Template whose resource_group.yaml to use.")
@click.option("--spec", "spec_file", default=None, type=click.Path(), help="A resource_group.yaml.")
@click.option("--name", default=None, help="Cluster name (default: the spec's name).")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def cluster_up(template, spec_file, name, as_json):
    """Start a local cluster for a spec (head with 0 CPUs + scaled workers)."""
    spec = _spec_from(template, spec_file, name)
    try:
        local.up(spec, log=lambda m: click.echo(m, err=True))
    except local.LocalClusterError as e:
        fail(str(e), 1)
    _print_status(spec.name, as_json)


def _pick_name(name):
    if name:
        return name
    names = local.list_clusters()
    if len(names) != 1:
        fail("several local clusters are up: " + ", ".join(names) + "; pass --name" if names
             else "no local cluster is up", 1)
    return names[0]


def _print_status(name, as_json):
    try:
        info = local.status(name)
    except local.LocalClusterError as e:
        fail(str(e), 1)
    if as_json:
        click.echo(json.dumps(info))
        return
    click.echo(f"{info['name']} ({info['category']}): {'up' if info.get('up') else 'DOWN'}")
    click.echo(f"  dashboard {info['dashboard_url']}   ray {info['ray_address']}   token {info['token_path']}")
    for n in info.get("nodes", []):
        role = "head" if n["head"] else n["labels"].get("group", "?")
        res = ", ".join(f"{k}={v:g}" for k, v in n["resources"].items() if k in ("CPU", "GPU"))
        click.echo(f"  {role:<8} {n['node_id'][:12]}  {res or 'CPU=0'}")


@cluster.command("status")
@click.option("--name", default=None)
@click.option("--json", "as_json", is_flag=True)
def cluster_status(name, as_json):
    """Nodes, resources, dashboard URL, ray:// URL and token path."""
    _print_status(_pick_name(name), as_json)


@cluster.command("down")
@click.option("--name", default=None)
def cluster_down(name):
    """Stop every process the cluster started, and nothing else."""
    try:
        local.down(_pick_name(name), log=lambda m: click.echo(m, err=True))
    except local.LocalClusterError as e:
        fail(str(e), 1)


def available_templates() -> list[str]:
    """Templates that exist in this checkout (have a ``__main__.py``)."""
    return [t for t in TEMPLATES if (REPO_ROOT / t / "__main__.py").is_file()]


def last_json_line(text: str) -> dict | None:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


def _rows(summary: dict) -> int:
    m = summary.get("metrics", {})
    for key in ("rows", "transactions", "files", "episodes", "users"):
        if key in m:
            return int(m[key])
    return 0


@cli.command()
@click.option("--template", "only", multiple=True, help="Run only these templates.")
@click.option("--keep", is_flag=True, help="Leave the demo cluster up afterwards.")
def demo(only, keep):
    """Run every template end to end on its local config, on a local cluster, then print a table."""
    names = [t for t in available_templates() if not only or t in only]
    if not names:
        fail("no templates found", 1)
    spec = load_spec(str(Path(__file__).with_name("demo_cluster.yaml")))
    try:
        state = local.up(spec, log=lambda m: click.echo(m, err=True))
    except local.LocalClusterError as e:
        fail(str(e), 1)
    rows, ok = [], True
    try:
        for t in names:
            click.echo(f"== {t}", err=True)
            start = time.time()
            env = {**os.environ, **state.env(), "PYTHONPATH": str(REPO_ROOT)}
            proc = subprocess.run([sys.executable, "-m", t], cwd=REPO_ROOT, env=env,
                                  stdout=subprocess.PIPE, text=True)
            secs = time.time() - start
            s = last_json_line(proc.stdout) or {}
            ok &= proc.returncode == 0
            metric = KEY_METRICS.get(t, "")
            value = s.get("metrics", {}).get(metric)
            rows.append([t, "ok" if proc.returncode == 0 else f"FAILED({proc.returncode})",
                         ",".join(s.get("steps", [s.get("step", "?")])), _rows(s),
                         f"{metric}={value:.3f}" if isinstance(value, (int, float)) else "-",
                         f"{secs:.0f}", s.get("run_dir", "-")])
    finally:
        if not keep:
            local.down(state.name, log=lambda m: click.echo(m, err=True))
    header = ["template", "status", "steps", "rows", "key metric", "seconds", "output folder"]
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    for r in [header] + rows:
        click.echo("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    if not ok:
        sys.exit(1)


def main(argv=None):
    """Console-script entry point."""
    cli.main(args=argv, prog_name="adbray")


if __name__ == "__main__":
    main()
