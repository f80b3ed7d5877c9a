"""The ``adbray`` command: local clusters, the demo, and (deploy layer) groups and jobs."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

import click

from pipelines.config import ConfigError
from pipelines.io import first_line, is_remote, join, write_bytes

from . import local
from .spec import load_spec


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
@click.option("--autoscale", is_flag=True,
              help="Run Ray's autoscaler (fake multi-node provider): groups scale between min and max "
                   "workers.")
@click.option("--disks", type=click.Choice(["isolated", "shared"]), default=None,
              help="isolated (default where the OS allows): each worker raylet sees its own /tmp and runs/, "
                   "like separate machines; shared: one disk for all.")
@click.option("--storage/--no-storage", default=True, show_default=True,
              help="Start the local OSS stand-in (an S3-compatible server on 127.0.0.1) with a bucket.")
def cluster_up(template, spec_file, name, as_json, autoscale, disks, storage):
    """Start a local cluster for a spec (head with 0 CPUs + scaled workers)."""
    spec = _spec_from(template, spec_file, name)
    try:
        local.up(spec, log=lambda m: click.echo(m, err=True), autoscale=autoscale, disks=disks, storage=storage)
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
    storage = info.get("storage")
    click.echo(f"  disks {info.get('disks', 'shared')}" + (f"   storage {storage['uri']} at {storage['endpoint']}"
                                                          if storage else ""))
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


@cluster.command("env")
@click.option("--name", default=None)
def cluster_env(name):
    """Shell lines that point a driver at the cluster: `eval "$(adbray cluster env)"` (address, token file,
    disks marker, the storage stand-in's endpoint and keys)."""
    try:
        state = local.load_state(_pick_name(name))
    except local.LocalClusterError as e:
        fail(str(e), 1)
    for key, value in state.env().items():
        click.echo(f"export {key}={shlex.quote(str(value))}")


@cluster.command("restart-head")
@click.option("--name", default=None)
@click.option("--json", "as_json", is_flag=True, help="Print the timings as JSON.")
@click.option("--timeout", default=180.0, show_default=True, help="Seconds to wait for the cluster to be whole.")
def cluster_restart_head(name, as_json, timeout):
    """Rehearse a head restart of a HIGH_AVAILABILITY cluster: stop exactly the head's processes, start
    them again on the same ports (GCS state from Redis) and wait until every worker reconnected."""
    try:
        state = local.load_state(_pick_name(name))
        took = local.restart_head(state, timeout=timeout, log=lambda m: click.echo(m, err=True))
    except local.LocalClusterError as e:
        fail(str(e), 1)
    if as_json:
        click.echo(json.dumps(took))
    else:
        click.echo(f"{state.name}: head stopped in {took['stopped_s']:.1f}s, started after {took['started_s']:.1f}s, "
                   f"cluster whole after {took['recovered_s']:.1f}s ({len(took['workers'])} worker(s) reconnected)")


@cluster.command("down")
@click.option("--name", default=None)
def cluster_down(name):
    """Stop every process the cluster started, and nothing else."""
    try:
        local.down(_pick_name(name), log=lambda m: click.echo(m, err=True))
    except local.LocalClusterError as e:
        fail(str(e), 1)


def available_templates() -> list[str]:
    """Installed templates (entry-point group ``adbray.templates``), the examples last."""
    from pipelines.template import discover

    return sorted(discover(), key=lambda n: (discover()[n].value.startswith("deploy."), n))


def last_json_line(text: str) -> dict | None:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


ARTEFACT_SUFFIXES = (".json", ".png", ".html", ".txt", ".yaml", ".log")


def copy_artefacts(run_dir: str, dest: Path, max_bytes: int = 5_000_000) -> str:
    """Copy a run folder's small files a person opens (summary, plots, report) to a local folder."""
    from pipelines.io import list_files, read_bytes

    for uri in list_files(run_dir):
        rel = uri[len(run_dir.rstrip("/")) + 1:]
        if rel.endswith(ARTEFACT_SUFFIXES):
            data = read_bytes(uri)
            if len(data) <= max_bytes:
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                (dest / rel).write_bytes(data)
    return str(dest)


@cli.command()
@click.option("--template", "only", multiple=True, help="Run only these templates (default: all but examples).")
@click.option("--small", is_flag=True, help="Each template's tiny test config (its test_overrides).")
@click.option("--keep", is_flag=True, help="Leave the demo cluster up afterwards.")
def demo(only, small, keep):
    """Run every template end to end on its local config, on a local cluster (outputs on its OSS stand-in;
    summaries and plots copied back under runs/), then print a table."""
    from pipelines.template import discover, load_template

    found = discover()
    names = list(only) or [t for t in available_templates() if not found[t].value.startswith("deploy.")]
    unknown = [t for t in names if t not in found]
    if unknown or not names:
        fail(f"unknown template(s) {', '.join(unknown)} (installed: {', '.join(available_templates()) or 'none'})"
             if unknown else "no templates found", 1)
    spec = load_spec(str(Path(__file__).with_name("demo_cluster.yaml")))
    try:
        state = local.up(spec, log=lambda m: click.echo(m, err=True))
    except local.LocalClusterError as e:
        fail(str(e), 1)
    rows, reports, ok = [], [], True
    os.environ.update(state.storage_env())  # to copy the runs' small artefacts back from the stand-in
    try:
        for t in names:
            click.echo(f"== {t}", err=True)
            template = load_template(t)
            start = time.time()
            env = {**os.environ, **state.env()}
            args = [x for item in template.test_overrides for x in ("--set", item)] if small else []
            code, stdout, log = run_quietly([sys.executable, "-m", template.package, *args], env,
                                            shown=(f"[{template.name}]", "error:", "joined Ray cluster"))
            secs = time.time() - start
            s = last_json_line(stdout) or {}
            ok &= code == 0
            metric = template.key_metric
            value = s.get("metrics", {}).get(metric)
            folder = s.get("run_dir", "-")
            if folder != "-":
                write_bytes(join(folder, "driver.log"), log.encode())  # Ray's and the steps' logs, in full
            if is_remote(folder):
                folder = f"{folder} -> {copy_artefacts(folder, Path('runs') / t / folder.rstrip('/').rsplit('/', 1)[-1])}"
            report = Path(folder.rsplit(" -> ", 1)[-1]) / "index.html"
            if report.is_file():
                reports.append(str(report))
            rows.append([t, "ok" if code == 0 else f"FAILED({code})",
                         ",".join(s.get("steps", [s.get("step", "?")])), s.get("rows", 0),
                         f"{metric}={value:.3f}" if isinstance(value, (int, float)) else "-",
                         f"{secs:.0f}", folder])
    finally:
        if not keep:
            local.down(state.name, log=lambda m: click.echo(m, err=True))
        else:
            click.echo(f"cluster {state.name} kept (dashboard {state.dashboard_url}): adbray cluster down "
                       f"--name {state.name}", err=True)
    header = ["template", "status", "steps", "rows", "key metric", "seconds", "output folder"]
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    for r in [header] + rows:
        click.echo("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    if reports:
        click.echo("reports (open in a browser; each run's full log is driver.log beside it):")
        for path in reports:
            click.echo(f"  {path}")
    if not ok:
        sys.exit(1)


def run_quietly(cmd: list[str], env: dict, shown: tuple[str, ...]) -> tuple[int, str, str]:
    """Run ``cmd``; echo only the stderr lines that start with one of ``shown`` (progress, errors) and
    return ``(exit code, stdout, the whole stderr)``: Ray's worker logs go to the run's log, not the screen."""
    proc = subprocess.Popen(cmd, cwd=Path.cwd(), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    log: list[str] = []
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.append(proc.stdout.read()), daemon=True)
    reader.start()
    for line in proc.stderr:
        log.append(line)
        if line.lstrip().startswith(shown):
            click.echo(f"  {line.rstrip()}", err=True)
    code = proc.wait()
    reader.join()
    return code, "".join(out), "".join(log)


@cli.command()
@click.argument("run_dir")
def report(run_dir):
    """(Re)build RUN_DIR/index.html (a local folder or oss://...) from what the run folder holds."""
    from pipelines.html_report import ReportError, write_report
    from pipelines.io import StorageError

    try:
        click.echo(write_report(run_dir))
    except (ReportError, StorageError, OSError) as e:
        fail(first_line(e), 1)


@cli.command("new")
@click.argument("name")
@click.option("--from", "source", default="squares", show_default=True,
              help="Installed template to start from (e.g. riskcontrol).")
@click.option("--dir", "dest", default=".", show_default=True, type=click.Path(file_okay=False),
              help="Where to write the project folder NAME/.")
def new(name, source, dest):
    """Write a standalone template project for a team repo: pyproject, package, README, tests."""
    from .scaffold import ScaffoldError, new_template

    try:
        project = new_template(name, source, dest)
    except (ScaffoldError, click.BadParameter) as e:
        fail(e.format_message() if isinstance(e, click.BadParameter) else str(e))
    click.echo(f"wrote {project} (from {source}); next: pip install -e {project}  &&  "
               f"python -m {name} --help  &&  pytest {project}/tests", err=True)
    click.echo(str(project))


# -- resource groups on the managed service (AnalyticDB OpenAPI) ---------------------------------


def _api_options(fn):
    """``--cluster-id``, ``--region``, ``--endpoint`` (env: ADBRAY_CLUSTER_ID, ALIBABA_CLOUD_REGION_ID,
    ADBRAY_ENDPOINT)."""
    fn = click.option("--endpoint", envvar="ADBRAY_ENDPOINT", default=None,
                      help="OpenAPI endpoint, e.g. http://127.0.0.1:PORT for the emulator "
                           "(default adb.<region>.aliyuncs.com).")(fn)
    fn = click.option("--region", envvar="ALIBABA_CLOUD_REGION_ID", default="cn-hangzhou",
                      show_default=True)(fn)
    fn = click.option("--cluster-id", envvar="ADBRAY_CLUSTER_ID", default=None,
                      help="AnalyticDB for MySQL cluster id (amv-...).")(fn)
    return fn


def _client(cluster_id, region, endpoint):
    from .openapi import ApiError, GroupClient

    if not cluster_id:
        fail("--cluster-id (or ADBRAY_CLUSTER_ID) is required")
    try:
        return GroupClient(cluster_id, region, endpoint, log=lambda m: click.echo(m, err=True))
    except ApiError as e:
        fail(str(e), 1)


def _api(fn, *args, **kwargs):
    """Run an OpenAPI call; ApiError -> one line, exit 1."""
    from .openapi import ApiError

    try:
        return fn(*args, **kwargs)
    except ApiError as e:
        fail(str(e), 1)


def _print_addresses(info, cluster_id, as_json):
    from .openapi import addresses, token_path

    addr = addresses(info)
    path = token_path(cluster_id, info.get("GroupName", ""))
    if as_json:
        click.echo(json.dumps({"group": info.get("GroupName"), "status": info.get("Status"), **addr,
                               "token_path": str(path) if path.is_file() else None}))
        return
    click.echo(f"group {info.get('GroupName')}: {info.get('Status')}")
    click.echo(f"  dashboard  {addr['dashboard']}    (ray job submit --address ...)")
    click.echo(f"  cluster    {addr['cluster']}    (ray.init(address=...))")
    click.echo(f"  grafana    {addr['grafana']}")
    if addr.get("serve"):
        click.echo(f"  serve      {addr['serve']}    (adbray serve TEMPLATE --group ...)")
    if path.is_file():
        click.echo(f"  token      {path}    (RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=...)")
    else:
        click.echo("  token      none stored here (a group without one: RAY_AUTH_MODE=disabled)")


@cli.group()
def group():
    """Ray cluster resource groups on AnalyticDB for MySQL (real OpenAPI, or the emulator)."""


@group.command("plan")
@click.argument("template_or_spec")
@click.option("--name", default=None, help="Resource group name (default: the spec's name).")
@click.option("--cluster-id", envvar="ADBRAY_CLUSTER_ID", default="amv-<cluster-id>")
@click.option("--region", envvar="ALIBABA_CLOUD_REGION_ID", default="cn-hangzhou", show_default=True)
def group_plan(template_or_spec, name, cluster_id, region):
    """Validate a spec and print the CreateDBResourceGroup request (token redacted) and what it reserves."""
    from .openapi import dumps, plan

    try:
        spec = load_spec(template_or_spec, name=name)
    except ConfigError as e:
        fail(str(e))
    click.echo(dumps(plan(spec, cluster_id, region)))


@group.command("create")
@click.argument("template_or_spec")
@_api_options
@click.option("--name", default=None, help="Resource group name (default: the spec's name).")
@click.option("--token-file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Ray auth token to use (default: generate one and store it 0600).")
@click.option("--no-token", is_flag=True, help="No Ray auth token, as a group made in the console "
              "(clients then connect with RAY_AUTH_MODE=disabled; anyone who reaches the ports can use it).")
@click.option("--wait/--no-wait", default=False, help="Wait until the group is ok, then print its addresses.")
@click.option("--timeout", default=1800.0, show_default=True, help="Seconds --wait waits.")
@click.option("--json", "as_json", is_flag=True)
def group_create(template_or_spec, cluster_id, region, endpoint, name, token_file, no_token, wait, timeout,
                 as_json):
    """Create the resource group a template needs (CreateDBResourceGroup)."""
    from .openapi import new_token, store_token, token_path

    try:
        spec = load_spec(template_or_spec, name=name)
    except ConfigError as e:
        fail(str(e))
    if no_token and (token_file or spec.auth_token):
        fail("--no-token contradicts --token-file / the spec's auth_token")
    client = _client(cluster_id, region, endpoint)
    token = None if no_token else \
        Path(token_file).read_text().strip() if token_file else (spec.auth_token or new_token())
    body = _api(client.create, spec, token)
    if token:
        where = f"Ray token stored in {store_token(cluster_id, spec.name, token)}"
    else:
        token_path(cluster_id, spec.name).unlink(missing_ok=True)  # an older group's token would be sent
        where = "no Ray token (clients: RAY_AUTH_MODE=disabled)"
    click.echo(f"creating group {spec.name} in {cluster_id} (request id {body.get('RequestId')}); {where}",
               err=True)
    if wait:
        info = _api(client.wait, spec.name, timeout=timeout, log=lambda m: click.echo(m, err=True))
        _print_addresses(info, cluster_id, as_json)


@group.command("wait")
@click.argument("name")
@_api_options
@click.option("--timeout", default=1800.0, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def group_wait(name, cluster_id, region, endpoint, timeout, as_json):
    """Poll DescribeDBResourceGroup until the group is ok, then print its addresses."""
    client = _client(cluster_id, region, endpoint)
    info = _api(client.wait, name, timeout=timeout, log=lambda m: click.echo(m, err=True))
    _print_addresses(info, cluster_id, as_json)


@group.command("describe")
@click.argument("name")
@_api_options
@click.option("--json", "as_json", is_flag=True, help="The whole GroupsInfo entry as JSON.")
def group_describe(name, cluster_id, region, endpoint, as_json):
    """Status and addresses of a group (DescribeDBResourceGroup)."""
    client = _client(cluster_id, region, endpoint)
    info = _api(client.describe, name)
    if as_json:
        click.echo(json.dumps(info, indent=2))
    else:
        _print_addresses(info, cluster_id, False)


@group.command("list")
@_api_options
@click.option("--json", "as_json", is_flag=True)
def group_list(cluster_id, region, endpoint, as_json):
    """Every resource group of the cluster, with its status."""
    rows = _api(_client(cluster_id, region, endpoint).list)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for info in rows:
        name, kind, status = info.get("GroupName", "?"), info.get("GroupType", ""), info.get("Status", "")
        click.echo(f"{name:<32} {kind:<12} {status}")


def _running_jobs(name, cluster_id, region, endpoint):
    """(jobs not ended on the group, None) or ([], why they could not be listed)."""
    from .jobs import SubmitError, redact_command, resolve_target, running_jobs
    from .openapi import ApiError

    try:
        target = resolve_target(group=name, cluster_id=cluster_id, endpoint=endpoint, region=region)
        rows = running_jobs(target)
    except (SubmitError, ApiError, ConfigError) as e:
        return [], str(e)
    for j in rows:
        click.echo(f"  running job {j.submission_id or j.job_id} ({getattr(j.status, 'value', j.status)}): "
                   f"{redact_command(j.entrypoint)}", err=True)
    return rows, None


def _confirm_node_loss(what, nodes, name, cluster_id, region, endpoint, yes):
    """Refuse (exit 1, one line) a change that deletes or restarts ``nodes`` nodes while jobs run, unless
    ``yes``; also when the jobs cannot be listed."""
    rows, unknown = _running_jobs(name, cluster_id, region, endpoint)
    if not nodes or yes:
        return
    if unknown:
        fail(f"{what} deletes or restarts {nodes} node(s) of group {name} and its jobs could not be listed "
             f"({unknown}); pass --yes to apply it anyway", 1)
    if rows:
        fail(f"{what} deletes or restarts {nodes} node(s) of group {name} while {len(rows)} job(s) run "
             "(listed above); pass --yes to apply it anyway", 1)


@group.command("modify")
@click.argument("template_or_spec")
@_api_options
@click.option("--name", default=None)
@click.option("--yes", is_flag=True, help="Apply a change that deletes or restarts nodes while jobs run.")
@click.option("--wait/--no-wait", default=True, help="Wait until the group is ok again (default).")
@click.option("--timeout", default=1800.0, show_default=True)
def group_modify(template_or_spec, cluster_id, region, endpoint, name, yes, wait, timeout):
    """Apply a changed spec to a group (ModifyDBResourceGroup): prints the diff, what it does to nodes and
    the running jobs; a change that deletes or restarts nodes while jobs run needs --yes."""
    from .openapi import spec_from_ray_config
    from .spec import RESTART_NOTE, spec_changes

    try:
        spec = load_spec(template_or_spec, name=name)
    except ConfigError as e:
        fail(str(e))
    client = _client(cluster_id, region, endpoint)
    info = _api(client.describe, spec.name)
    try:
        current = spec_from_ray_config(spec.name, info.get("RayConfig") or {})
    except ConfigError as e:
        fail(f"group {spec.name} reports a RayConfig adbray cannot read: {e}", 1)
    changes = spec_changes(current, spec)
    if not changes:
        click.echo(f"group {spec.name}: no change", err=True)
        return
    click.echo(f"group {spec.name}: changes", err=True)
    for c in changes:
        click.echo(f"  {c.text}" + (f": {c.does}" if c.does else ""), err=True)
    nodes = sum(c.nodes for c in changes)
    if nodes:
        click.echo(f"  {RESTART_NOTE}", err=True)
    _confirm_node_loss("this change", nodes, spec.name, cluster_id, region, endpoint, yes)
    body = _api(client.modify, spec)
    click.echo(f"modified group {spec.name} (request id {body.get('RequestId')})", err=True)
    if wait:
        _api(client.wait, spec.name, timeout=timeout, log=lambda m: click.echo(m, err=True))
        click.echo(f"group {spec.name}: ok", err=True)


@group.command("delete")
@click.argument("name")
@_api_options
@click.option("--yes", is_flag=True, help="Delete the group even while jobs run on it.")
@click.option("--wait/--no-wait", default=False, help="Wait until the group is gone.")
@click.option("--timeout", default=600.0, show_default=True)
def group_delete(name, cluster_id, region, endpoint, yes, wait, timeout):
    """Delete a group (DeleteDBResourceGroup); its stored token is removed. Lists the running jobs (deleting
    interrupts them immediately) and needs --yes while any run."""
    from .openapi import ApiError, token_path
    from .spec import DELETE_NOTE

    client = _client(cluster_id, region, endpoint)
    info = _api(client.describe, name)
    if str(info.get("Status", "")).lower() == "ok":
        rows, unknown = _running_jobs(name, cluster_id, region, endpoint)
        if rows or unknown:
            click.echo(f"  {DELETE_NOTE}", err=True)
        if rows and not yes:
            fail(f"deleting group {name} interrupts {len(rows)} running job(s) (listed above); "
                 "pass --yes to delete it anyway", 1)
        if unknown and not yes:
            fail(f"the jobs of group {name} could not be listed ({unknown}); pass --yes to delete it anyway", 1)
    body = _api(client.delete, name)
    click.echo(f"deleting group {name} (request id {body.get('RequestId')})", err=True)
    deadline = time.time() + timeout
    while wait:
        try:
            status = str(client.describe(name).get("Status", "")).lower()
        except ApiError as e:
            if e.code.endswith("NotFound"):
                break
            fail(str(e), 1)
        if status == "deleted":
            break
        if time.time() > deadline:
            fail(f"group {name} still {status} after {timeout:.0f}s", 1)
        time.sleep(1)
    token_path(cluster_id, name).unlink(missing_ok=True)
    if wait:
        click.echo(f"group {name} deleted", err=True)


@cli.command()
@click.option("--port", default=0, help="Port on 127.0.0.1 (default: a free one).")
@click.option("--access-key-id", envvar="ALIBABA_CLOUD_ACCESS_KEY_ID", default=None)
@click.option("--access-key-secret", envvar="ALIBABA_CLOUD_ACCESS_KEY_SECRET", default=None)
@click.option("--no-autoscale", is_flag=True, help="Start min workers only, even where min != max.")
def emulator(port, access_key_id, access_key_secret, no_autoscale):
    """Serve the AnalyticDB resource-group OpenAPI on 127.0.0.1, backed by real local Ray clusters."""
    import signal
    import threading

    from .emulator import Emulator

    try:
        emu = Emulator(access_key_id, access_key_secret, port=port,
                       log=lambda m: click.echo(m, err=True), autoscale=not no_autoscale).start()
    except (ValueError, OSError) as e:
        fail(str(e), 1)
    click.echo(f"emulator listening on {emu.endpoint}", err=False)
    sys.stdout.flush()
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    click.echo("emulator stopping: deleting its groups' clusters", err=True)
    emu.stop(delete_groups=True)


# -- jobs (CTL: Ray's job submission API) -------------------------------------------------------


def _target_options(fn):
    fn = click.option("--token-file", type=click.Path(exists=True, dir_okay=False), default=None,
                      help="Ray auth token file (default: the group's stored token, or "
                           "RAY_AUTH_TOKEN[_PATH]).")(fn)
    fn = click.option("--group", "group_name", default=None,
                      help="Resource group name (needs --cluster-id).")(fn)
    fn = click.option("--address", default=None, help="Dashboard URL http://host:8265 or ray://host:10001.")(fn)
    return _api_options(fn)


def _target(address, group_name, cluster_id, region, endpoint, token_file):
    from .jobs import SubmitError, resolve_target
    from .openapi import ApiError

    try:
        target = resolve_target(address, group_name, cluster_id, endpoint, region, token_file=token_file,
                                log=lambda m: click.echo(m, err=True))
    except (SubmitError, ApiError, ConfigError) as e:
        fail(str(e), 1)
    for w in target.warnings:
        click.echo(f"warning: {w}", err=True)
    return target


@cli.command()
@click.argument("template")
@click.option("--step", default=None,
              help="Run one step (python -m TEMPLATE STEP) on an existing run folder (--run-dir).")
@click.option("--config", default=None,
              help="Config YAML inside the working dir (default: configs/cluster.yaml, else local.yaml).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Config override, passed on.")
@click.option("--run-dir", default=None,
              help="Output folder for the job, e.g. oss://bucket/runs/x (passed on).")
@_target_options
@click.option("--spec", "spec_file", default=None,
              help="Resource group spec to preflight against with --address (default: the template's).")
@click.option("--working-dir", default=None, type=click.Path(file_okay=False),
              help="Folder to upload (default: the template's project root, this repo for built-ins).")
@click.option("--image-has-adbray", is_flag=True,
              help="A team repo's template: the group's image already has adbray (else it is pip-installed).")
@click.option("--max-upload-mb", default=None, type=float, help="Upload size limit (default 100 MB).")
@click.option("--allow-secrets", is_flag=True, help="Upload files that look like secrets anyway.")
@click.option("--pip", multiple=True, help="Extra pip requirement for the job's runtime_env (repeatable).")
@click.option("--entrypoint-num-cpus", default=0.0, help="CPUs reserved for the driver.")
@click.option("--entrypoint-num-gpus", default=0.0, help="GPUs reserved for the driver.")
@click.option("--wait/--no-wait", default=True, help="Follow the logs until the job ends (default).")
@click.option("--timeout", default=None, type=float, help="Give up following after this many seconds.")
@click.option("--resubmit", is_flag=True,
              help="If the job dies with its driver's node (a head restart), submit it again once (as ID-r1) "
                   "when the head is back. Only for jobs whose outputs are replaced on write.")
@click.option("--reconnect-timeout", default=300.0, show_default=True,
              help="Seconds following keeps retrying an unreachable dashboard (a head restarting).")
@click.option("--dry-run", is_flag=True,
              help="Run the checks and print entrypoint + runtime_env; contact no cluster, upload nothing.")
def submit(template, step, config, overrides, run_dir, address, group_name, cluster_id, region, endpoint,
           token_file, spec_file, working_dir, image_has_adbray, max_upload_mb, allow_secrets, pip,
           entrypoint_num_cpus, entrypoint_num_gpus, wait, timeout, resubmit, reconnect_timeout, dry_run):
    """Submit a template as a Ray job (JobSubmissionClient) and follow it; exit 0 only if it SUCCEEDED."""
    from .jobs import (
        SET_ENV,
        SubmitError,
        cluster_check,
        default_run_dir,
        follow_or_resubmit,
        node_table,
        prepare,
        redact,
        redact_command,
        shown_runtime_env,
        status_name,
    )
    from .jobs import submit as submit_job

    target = None if dry_run and not (address or group_name) else \
        _target(address, group_name, cluster_id, region, endpoint, token_file)
    no_storage = default_dir = None
    try:
        if target and not run_dir:
            try:
                default_dir = default_run_dir(target, template)
            except SubmitError as e:  # said after the checks below, which need no storage
                no_storage = e
        spec = (target and target.spec) or (load_spec(spec_file) if spec_file else None)
        plan = prepare(template, step, config, overrides, spec, Path(working_dir) if working_dir else None,
                       max_upload_mb, allow_secrets, pip, run_dir, image_has_adbray, default_dir,
                       job_env=target.job_env if target else None)
        if no_storage:
            raise no_storage
    except (SubmitError, ConfigError) as e:
        fail(str(e), 2)
    if default_dir:
        click.echo(f"outputs go to {default_dir} (the cluster's storage; --run-dir to choose)", err=True)
    for f in plan.findings:
        click.echo(f"preflight {f.level}: {f.message}", err=True)
    click.echo(f"working dir {plan.workdir['root']}: {plan.workdir['files']} files, "
               f"{plan.workdir['bytes'] / 1e6:.1f} MB", err=True)
    if plan.runtime_env.get("pip"):
        click.echo(f"runtime_env pip (not in the group's requirements): {', '.join(plan.runtime_env['pip'])}",
                   err=True)
    hidden = json.loads(plan.runtime_env.get("env_vars", {}).get(SET_ENV, "[]"))
    if hidden:
        click.echo(f"{len(hidden)} --set value(s) carry secrets: passed in the job's environment ({SET_ENV}), "
                   "not on its command line", err=True)
    if dry_run:
        click.echo(json.dumps({"entrypoint": redact_command(plan.entrypoint),
                               "runtime_env": shown_runtime_env(plan.runtime_env),
                               "entrypoint_num_cpus": entrypoint_num_cpus,
                               "entrypoint_num_gpus": entrypoint_num_gpus}, indent=2))
        return
    try:
        if target.spec is None and spec is not None:
            target.spec = spec
        shown = len(target.warnings)
        click.echo(cluster_check(target), err=True)
        for w in target.warnings[shown:]:
            click.echo(f"warning: {w}", err=True)
        client, job_id = submit_job(target, plan, entrypoint_num_cpus, entrypoint_num_gpus)
    except SubmitError as e:
        fail(str(e), 1)
    click.echo(f"submitted job {job_id}: {redact_command(plan.entrypoint)}", err=True)
    click.echo(f"  dashboard {target.dashboard_url}/#/jobs/{job_id}", err=True)
    if not wait:
        click.echo(job_id)
        return
    again = (lambda new_id: submit_job(target, plan, entrypoint_num_cpus, entrypoint_num_gpus, new_id)) \
        if resubmit else None
    try:
        info, job_id = follow_or_resubmit(client, job_id, again, log=lambda m: click.echo(m, err=True),
                                          timeout=timeout, reconnect_s=reconnect_timeout,
                                          nodes=lambda: node_table(target))
    except KeyboardInterrupt:
        sys.exit(130)
    except SubmitError as e:
        fail(str(e) + ("" if resubmit or "lost with" not in str(e) else
                       " (--resubmit submits such a job again once the head is back)"), 1)
    status = status_name(info)
    if status != "SUCCEEDED":
        message = redact(" ".join(str(info.message or "").split()))
        message = message if len(message) <= 400 else message[:150] + " ... " + message[-250:]
        fail(f"job {job_id} {status}: {message}", 1)
    click.echo(f"job {job_id} SUCCEEDED", err=True)


@cli.command("serve")
@click.argument("template")
@click.option("--run-dir", default=None,
              help="Run folder holding the trained model, on storage every node reads (oss://BUCKET/runs/...).")
@click.option("--config", default=None, help="Template config whose serve section to use (default: its local.yaml).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Config override (serve.KEY=VALUE).")
@_target_options
@click.option("--delete", "remove", is_flag=True, help="Remove the template's app (the serve section's app_name).")
@click.option("--print-config", is_flag=True,
              help="Print the Serve config (for `serve deploy FILE -a URL`) instead of deploying; with a target, "
                   "its working dir is uploaded there.")
@click.option("--host", default=None,
              help="Proxy host (default: 127.0.0.1 on a local cluster, 0.0.0.0 on a group); a running Serve keeps its own.")
@click.option("--port", default=None, type=int,
              help="Proxy port (default: the group's Serve address's, else 8000; a free one on a local cluster).")
@click.option("--timeout", default=300.0, show_default=True, help="Seconds to wait until the app answers.")
@click.option("--json", "as_json", is_flag=True, help="Print {app, route_prefix, urls} as JSON.")
def serve_cmd(template, run_dir, config, overrides, address, group_name, cluster_id, region, endpoint, token_file,
              remove, print_config, host, port, timeout, as_json):
    """Deploy TEMPLATE's Serve app to a group (--group) or cluster (--address) from a run folder and print
    the URLs a client calls; --delete removes it."""
    from pipelines.template import load_template

    from . import serve as deploy_serve
    from .jobs import SubmitError

    try:
        tpl = load_template(template)
        section = deploy_serve.serve_section(tpl, config, overrides)
        if print_config and not (address or group_name):
            click.echo(deploy_serve.print_config(None, tpl, section, run_dir, None, host, port), nl=False)
            return
    except click.BadParameter as e:
        fail(e.format_message())
    except (deploy_serve.ServeError, ConfigError) as e:
        fail(str(e))
    target = _target(address, group_name, cluster_id, region, endpoint, token_file)
    info = _api(_client(cluster_id, region, endpoint).describe, group_name) if group_name else None
    st = deploy_serve.serve_target(target, info)
    try:
        if remove:
            deploy_serve.delete(st, section.app_name)
            click.echo(f"deleted Serve app {section.app_name}", err=True)
            return
        run_dir = deploy_serve.check_run_dir(run_dir, shared_disk=target.disks == "shared")
        runtime_env, findings = deploy_serve.runtime_env_for(tpl, config, overrides, target)
        for f in findings:
            if f.level != "ok":  # (the ok line sizes the template's batch run, not the app)
                click.echo(f"preflight {f.level}: {f.message}", err=True)
        runtime_env = deploy_serve.upload_runtime_env(st, runtime_env)
        if print_config:
            click.echo(deploy_serve.print_config(st, tpl, section, run_dir, runtime_env, host, port), nl=False)
            return
        result = deploy_serve.deploy(st, tpl, section, run_dir, runtime_env, host, port, timeout,
                                     log=lambda m: click.echo(m, err=True))
    except (deploy_serve.ServeError, SubmitError, ConfigError) as e:
        fail(str(e), 1)
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(f"Serve app {result['app']} is up; call it at:", err=True)
    for what, url in result["urls"].items():
        click.echo(f"{url}    ({what})")


@cli.group()
def jobs():
    """List, read and stop Ray jobs on a resource group."""


def _jobs_client(address, group_name, cluster_id, region, endpoint, token_file):
    from .jobs import SubmitError, client_for

    target = _target(address, group_name, cluster_id, region, endpoint, token_file)
    try:
        return target, client_for(target)
    except SubmitError as e:
        fail(str(e), 1)


def _job_call(target, fn, *args, **kwargs):
    from .jobs import SubmitError, error_line

    try:
        return fn(*args, **kwargs)
    except SubmitError as e:
        fail(str(e), 1)
    except Exception as e:  # noqa: BLE001 - any failure of an API call becomes one line
        fail(error_line(e, target), 1)


@jobs.command("list")
@_target_options
@click.option("--json", "as_json", is_flag=True)
def jobs_list(address, group_name, cluster_id, region, endpoint, token_file, as_json):
    """Jobs on the cluster, newest first (secret --set values and URL passwords masked). A job that died with
    the node its driver ran on (a head restart) shows as FAILED with the reason, though Ray may still list
    it RUNNING."""
    from .jobs import error_line, lost_reason, may_be_lost, node_table, redact, redact_command, status_name

    target, client = _jobs_client(address, group_name, cluster_id, region, endpoint, token_file)
    rows = sorted(_job_call(target, client.list_jobs), key=lambda j: j.start_time or 0, reverse=True)
    try:
        nodes = node_table(target) if any(may_be_lost(j) for j in rows) else []
    except Exception as e:  # noqa: BLE001 - the jobs still list, as Ray reports them
        nodes = []
        click.echo(f"warning: no node table ({error_line(e, target)}): a job lost with its node shows as Ray "
                   "reports it", err=True)
    shown = []
    for j in rows:
        lost = lost_reason(j, nodes)
        message = f"lost with its driver's node: {lost}" if lost else j.message
        shown.append({"job_id": j.submission_id or j.job_id, "status": "FAILED" if lost else status_name(j),
                      "ray_status": status_name(j), "entrypoint": redact_command(j.entrypoint),
                      "message": redact(message) if message else message})
    if as_json:
        click.echo(json.dumps(shown))
        return
    for j in shown:
        click.echo(f"{j['job_id']:<28} {j['status']:<10} {j['entrypoint']}")
        if j["status"] != j["ray_status"]:
            click.echo(f"{'':<28} {j['message']}")


@jobs.command("logs")
@click.argument("job_id")
@_target_options
@click.option("--follow", is_flag=True, help="Keep printing until the job ends.")
def jobs_logs(job_id, address, group_name, cluster_id, region, endpoint, token_file, follow):
    """A job's driver logs."""
    from .jobs import error_line, lost_reason, node_table
    from .jobs import follow as follow_job

    target, client = _jobs_client(address, group_name, cluster_id, region, endpoint, token_file)
    if follow:
        _job_call(target, follow_job, client, job_id, nodes=lambda: node_table(target))
        return
    try:
        click.echo(client.get_job_logs(job_id), nl=False)
    except Exception as e:  # noqa: BLE001 - any failure of an API call becomes one line
        try:
            lost = lost_reason(client.get_job_info(job_id), node_table(target))
        except Exception:  # noqa: BLE001 - cannot tell: the log read's own error is the one to show
            lost = None
        fail(f"the logs of job {job_id} were on its driver's node, gone with it: {lost}" if lost
             else error_line(e, target), 1)


@jobs.command("stop")
@click.argument("job_id")
@_target_options
def jobs_stop(job_id, address, group_name, cluster_id, region, endpoint, token_file):
    """Ask the cluster to stop a job."""
    target, client = _jobs_client(address, group_name, cluster_id, region, endpoint, token_file)
    stopped = _job_call(target, client.stop_job, job_id)
    click.echo(f"job {job_id}: {'stop requested' if stopped else 'already finished'}", err=True)


def main(argv=None):
    """Console-script entry point."""
    cli.main(args=argv, prog_name="adbray")


if __name__ == "__main__":
    main()
