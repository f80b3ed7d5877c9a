"""CTL submission: a template run as a Ray job on a resource group (``JobSubmissionClient``).

:func:`resolve_target` turns ``--address`` or ``--group/--cluster-id`` into the
dashboard URL, the ray:// address, the token and (when known) the group's spec;
:func:`prepare` does everything that must pass before upload (spec, preflight,
working dir); :func:`submit` and :func:`follow` run the job and stream its logs.

A job whose driver ran on a node that died (the head, restarted on a HIGH_AVAILABILITY
group) is gone, yet Ray 2.60 keeps listing it RUNNING: :func:`lost_reason` tells it from the
node table, :func:`follow` keeps following through a dashboard outage and raises
:class:`JobLost`, and :func:`follow_or_resubmit` resubmits such a job once (opt-in).

``--set`` values that carry secrets (a URL with a password, a key named like
password/secret/token/key) never enter the entrypoint, which Ray prints and keeps in
its job table: they travel in the job's ``runtime_env`` env var ``ADBRAY_SET`` (a JSON
list), which :func:`pipelines.config.load_config` applies after the command line's.
Whatever we print goes through :func:`redact`/:func:`redact_override`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from pipelines.config import (
    MASK,
    SET_ENV,
    URL_PASSWORD,
    ConfigError,
    apply_overrides,
    parse_override,
    read_yaml,
    redact,
)
from pipelines.connect import (
    CLIENT_PORT,
    DASHBOARD_PORT,
    cluster_versions,
    to_client_address,
    to_dashboard_url,
    version_mismatch,
    versions_line,
)

from . import preflight, workdir
from .spec import REPO_ROOT, ResourceGroupSpec, load_spec

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
RECONNECT_S = 300.0  # how long following retries an unreachable dashboard (the head restarting)


class SubmitError(RuntimeError):
    """Submission stopped; the message is one line."""


@dataclass
class Target:
    dashboard_url: str
    cluster_address: str
    token: str | None
    spec: ResourceGroupSpec | None = None
    group: str | None = None
    warnings: list[str] = field(default_factory=list)
    storage: str | None = None  # the cluster's storage location (oss://bucket/prefix/), if known
    disks: str | None = None  # "shared" only for a local cluster started with shared disks
    job_env: dict = field(default_factory=dict)  # what its jobs need in their environment (OSS endpoint)

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}


def _host_port(url: str) -> tuple[str, int | None]:
    parsed = urlparse(url if "://" in url else f"x://{url}")
    return parsed.hostname or "", parsed.port


def address_pair(address: str) -> tuple[str, str]:
    """Any accepted form -> (dashboard URL, ray:// address); standard ports 8265 <-> 10001."""
    address = address.strip().rstrip("/")
    if address.startswith("ray://"):
        return to_dashboard_url(address), address
    if address.startswith(("http://", "https://")):
        return address, to_client_address(address)
    host, _ = _host_port(address)
    if not host:
        raise SubmitError(
            f"bad Ray address {address!r}: give http://host:{DASHBOARD_PORT} or ray://host:{CLIENT_PORT}"
        )
    return f"http://{host}:{DASHBOARD_PORT}", f"ray://{host}:{CLIENT_PORT}"


def ray_address_warning(target: Target, env_address: str | None) -> str | None:
    """A warning when ``RAY_ADDRESS`` names another cluster than the target."""
    if not env_address or env_address == "auto":
        return None
    mine = {_host_port(target.dashboard_url), _host_port(target.cluster_address)}
    theirs = _host_port(env_address)
    if theirs in mine or (theirs[1] is None and theirs[0] in {h for h, _ in mine}):
        return None
    return (
        f"RAY_ADDRESS={env_address} differs from the target {target.dashboard_url}; "
        "the job goes to the target (unset RAY_ADDRESS to silence this)"
    )


def token_from_env() -> str | None:
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path and Path(path).expanduser().is_file():
        return Path(path).expanduser().read_text().strip()
    return None


def resolve_target(
    address=None,
    group=None,
    cluster_id=None,
    endpoint=None,
    region=None,
    token=None,
    token_file=None,
    log=None,
) -> Target:
    """``--address`` or ``--group`` (+ cluster id) -> a Target; SubmitError/ApiError if neither works."""
    from . import openapi

    if token_file:
        token = Path(token_file).expanduser().read_text().strip()
    if group:
        if not cluster_id:
            raise SubmitError("--group needs --cluster-id")
        client = openapi.GroupClient(cluster_id, region or openapi.DEFAULT_REGION, endpoint, log=log)
        info = client.describe(group)
        status = str(info.get("Status", "")).lower()
        if status != openapi.READY:
            raise SubmitError(
                f"group {group} is {status or 'unknown'}, not ok (run `adbray group wait {group}`)"
            )
        addr = openapi.addresses(info)
        if not addr["dashboard"]:
            raise SubmitError(f"group {group} reports no RayDashboardAddress")
        token = token or openapi.load_token(cluster_id, group) or token_from_env()
        spec = openapi.spec_from_ray_config(group, info.get("RayConfig") or {})
        target = Target(
            addr["dashboard"].rstrip("/"),
            addr["cluster"] or address_pair(addr["dashboard"])[1],
            token,
            spec,
            group,
            storage=spec.storage,
            job_env=openapi.job_storage_env(region or openapi.DEFAULT_REGION, endpoint),
        )
    elif address:
        dashboard, cluster = address_pair(address)
        target = Target(dashboard, cluster, token or token_from_env())
        from . import local

        mine = local.find_by_address(dashboard, cluster)  # one of this machine's local clusters
        if mine:
            target.storage, target.disks = mine.storage.get("uri"), mine.disks
    else:
        raise SubmitError(
            "give --address http://host:8265 (or ray://host:10001) or --group NAME --cluster-id ID"
        )
    warning = ray_address_warning(target, os.environ.get("RAY_ADDRESS"))
    if warning:
        target.warnings.append(warning)
    return target


def default_run_dir(target: Target, template: str) -> str | None:
    """Where a job's outputs go without --run-dir: ``<cluster storage>/runs/<template>/<run id>``, so that
    they outlive the job; None on a local cluster with shared disks; SubmitError when the cluster has
    neither (its nodes' disks are gone with the job)."""
    from pipelines.io import join, new_run_id

    if target.storage:
        return join(target.storage, "runs", template.rsplit(".", 1)[-1], new_run_id())
    if target.disks == "shared":
        return None
    raise SubmitError("no storage is known for this cluster, and its nodes share no disk: give --run-dir "
                      "oss://BUCKET/PATH (or add `storage: oss://BUCKET/` to the group's resource_group.yaml)")


# -- secrets in --set ---------------------------------------------------------------------------

SECRET_WORDS = {"password", "passwd", "pwd", "passphrase", "secret", "secrets", "token", "key", "apikey",
                "credential", "credentials", "dsn"}


def secret_key(key: str) -> bool:
    """Whether a key path names a secret: a name containing password/secret, or ending in the word token, key,
    pwd, dsn, ... (``api_key``, ``access_key_secret``, ``auth_token``; not ``key_metric`` nor ``max_tokens``)."""
    for name in str(key).lower().split("."):
        words = [w for w in re.split(r"[^a-z0-9]+", name) if w]
        if "password" in name or "secret" in name or (words and words[-1] in SECRET_WORDS):
            return True
    return False


def _secret_value(value) -> bool:
    if isinstance(value, dict):
        return any(secret_key(k) or _secret_value(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_secret_value(v) for v in value)
    return bool(URL_PASSWORD.search(str(value)))


def is_secret_override(item: str) -> bool:
    """Whether ``key=value`` carries a secret (by its key, a nested key, or a URL password in the value)."""
    key, _, raw = str(item).partition("=")
    if secret_key(key) or URL_PASSWORD.search(raw):
        return True
    try:
        return _secret_value(parse_override(item)[1])
    except ConfigError:
        return False


def redact_override(item: str) -> str:
    """``key=***`` for a secret key (or a mapping holding one), else the item with URL passwords masked."""
    key, sep, raw = str(item).partition("=")
    if sep and (secret_key(key) or (not URL_PASSWORD.search(raw) and is_secret_override(item))):
        return f"{key}={MASK}"
    return redact(item)


def redact_command(command: str) -> str:
    """An entrypoint safe to print: each ``--set`` item through :func:`redact_override`, URL passwords masked."""
    try:
        parts = shlex.split(command or "")
    except ValueError:
        return redact(command)
    out = [redact_override(p) if i and parts[i - 1] == "--set" else redact(p) for i, p in enumerate(parts)]
    return " ".join(shlex.quote(p) for p in out)


def split_overrides(overrides) -> tuple[list[str], list[str]]:
    """(overrides for the entrypoint, overrides for ``ADBRAY_SET``). A later override of a key that a secret
    one set (or of a key above or below it) goes with it, so that the order they apply in is kept."""
    public, secret, keys = [], [], []
    for item in overrides or ():
        key = [p for p in str(item).partition("=")[0].strip().split(".") if p]
        overlaps = any(k[: len(key)] == key or key[: len(k)] == k for k in keys)
        if is_secret_override(item) or overlaps:
            secret.append(item)
            keys.append(key)
        else:
            public.append(item)
    return public, secret


def shown_runtime_env(runtime_env: dict) -> dict:
    """A copy of a job's runtime_env that is safe to print (``ADBRAY_SET`` items redacted)."""
    shown = dict(runtime_env)
    env = dict(shown.get("env_vars") or {})
    if SET_ENV in env:
        env[SET_ENV] = [redact_override(i) for i in json.loads(env[SET_ENV])]
    for k, v in env.items():
        if k != SET_ENV:
            env[k] = MASK if secret_key(k) else redact(v)
    if env:
        shown["env_vars"] = env
    return shown


# -- before upload ------------------------------------------------------------------------------


@dataclass
class Plan:
    template: str
    entrypoint: str
    runtime_env: dict
    findings: list
    workdir: dict


def template_dir(template: str, root: Path = REPO_ROOT) -> Path:
    return root / template.replace(".", "/")


def project_root(package_dir: Path) -> Path:
    """The project a template package belongs to: the nearest folder above it with a
    ``pyproject.toml`` (this repo for the built-in templates), else the package's parent."""
    for folder in package_dir.parents:
        if (folder / "pyproject.toml").is_file():
            return folder
    return package_dir.parent


@dataclass
class Resolved:
    """Where a template lives and how its job is started."""

    module: str          # python -m <module>
    tdir: Path           # the package folder (configs/, resource_group.yaml)
    root: Path           # the working dir to upload
    template: object     # the registered pipelines.template.Template (None: a plain package folder)
    external: bool       # registered from outside this repo: the job needs adbray installed


def resolve_template(template: str, root: Path | None) -> Resolved:
    """A registered template (entry point ``adbray.templates``) or a package folder under ``root``."""
    from pipelines.template import discover, load_template

    if template in discover():
        t = load_template(template)
        home = project_root(t.root)
        return Resolved(t.package, t.root, Path(root or home).resolve(), t, home != REPO_ROOT.resolve())
    root = Path(root or REPO_ROOT).resolve()
    return Resolved(template, template_dir(template, root), root, None, False)


def prepare(
    template: str,
    step: str | None = None,
    config: str | None = None,
    overrides=(),
    spec: ResourceGroupSpec | None = None,
    root: Path | None = None,
    max_upload_mb: float | None = None,
    allow_secrets: bool = False,
    pip=(),
    run_dir: str | None = None,
    image_has_adbray: bool = False,
    default_run_dir: str | None = None,
    job_env: dict | None = None,
) -> Plan:
    """Everything checked before upload; SubmitError (one line) on the first problem.

    ``root`` is the working dir to upload (default: the template's project root). A template
    registered from another project gets ``adbray`` in the job's pip requirements unless
    ``image_has_adbray``. ``default_run_dir`` (the cluster's storage) is used when no ``run_dir`` is
    given, but never for a step that reads an earlier run's outputs. ``job_env`` (the target's, e.g. its
    OSS endpoint) goes into the job's environment.
    """
    where = resolve_template(template, root)
    root, tdir = where.root, where.tdir
    if not (tdir / "__main__.py").is_file() and not (tdir / "__init__.py").is_file():
        raise SubmitError(f"no template {template!r} under {root} (looked for {tdir}/__main__.py)")
    if where.template is not None:
        names = [s.name for s in where.template.steps]
        if step and step not in names:
            raise SubmitError(f"template {template} has no step {step!r} (steps: {', '.join(names)})")
        if root not in tdir.parents:
            raise SubmitError(f"template {template} ({tdir}) is outside the working dir {root}")
    elif step and not ((tdir / f"{step}.py").is_file() or (tdir / step / "__init__.py").is_file()):
        raise SubmitError(f"template {template} has no step {step!r} (no {tdir / step}.py)")
    if config is None:
        config_path = next(
            (p for p in (tdir / "configs" / "cluster.yaml", tdir / "configs" / "local.yaml") if p.is_file()),
            None,
        )
    else:
        config_path = Path(config) if Path(config).is_absolute() else Path.cwd() / config
        if not config_path.is_file() and (root / config).is_file():
            config_path = root / config
    if config_path is not None:
        config_path = config_path.resolve()
        if root not in config_path.parents:
            raise SubmitError(
                f"config {config_path} is outside the working dir {root}: it would not be uploaded"
            )
    try:
        template_spec = (
            load_spec(str(tdir / "resource_group.yaml")) if (tdir / "resource_group.yaml").is_file() else None
        )
        spec = spec or template_spec
        data = apply_overrides(read_yaml(config_path), overrides) if config_path else {}
        asks = preflight.resource_asks(data)
    except (ConfigError, ValueError) as e:
        raise SubmitError(redact(e)) from None
    if where.template is not None and step:  # what the step reads depends on the job's own config
        try:
            cfg = where.template.load_config(str(config_path) if config_path else None, list(overrides))
        except (ConfigError, ValueError) as e:
            raise SubmitError(redact(e)) from None
        needs = where.template.needs(where.template.step(step), cfg)
        if needs and not run_dir:
            raise SubmitError(f"step {step} reads {', '.join(needs)} from an earlier run: give "
                              "--run-dir (a storage URI the cluster can read, e.g. oss://bucket/runs/x)")
    run_dir = run_dir or default_run_dir
    findings = (
        preflight.check(asks, spec)
        if spec
        else [
            preflight.Finding(
                "warning", "no resource group spec known: preflight skipped (pass --spec or use --group)"
            )
        ]
    )
    errors = [f.message for f in findings if f.level == "error"]
    if errors:
        raise SubmitError(
            f"preflight: {errors[0]}" + (f" [+{len(errors) - 1} more]" if len(errors) > 1 else "")
        )
    try:
        wd = workdir.check(root, max_upload_mb or workdir.DEFAULT_MAX_UPLOAD_MB, allow_secrets)
    except workdir.WorkdirError as e:
        raise SubmitError(str(e)) from None
    if where.template is not None:  # the contract: python -m TEMPLATE [STEP]
        parts = ["python", "-m", where.module, *([step] if step else [])]
    else:
        parts = ["python", "-m", f"{template}.{step}" if step else template]
    if config_path:
        parts += ["--config", str(config_path.relative_to(root))]
    public, secret = split_overrides(overrides)
    for item in public:
        parts += ["--set", item]
    if run_dir:
        parts += ["--run-dir", run_dir]
    entrypoint = " ".join(shlex.quote(p) for p in parts)
    runtime_env = {"working_dir": str(root), "excludes": wd["excludes"]}
    env_vars = dict(job_env or {})
    if secret:  # out of the entrypoint (printed, kept in the job table): the template reads ADBRAY_SET
        env_vars[SET_ENV] = json.dumps(list(secret))
    if env_vars:
        runtime_env["env_vars"] = env_vars
    # what the template needs and the target group was not created with comes via the job's runtime_env
    installed = set(spec.requirements) if spec else set()
    missing = [r for r in (template_spec.requirements if template_spec else []) if r not in installed]
    if where.external and not image_has_adbray and not any(_dist_name(r) == "adbray" for r in installed):
        missing.append("adbray")  # a team repo's template imports adbray's toolkit
    if missing or pip:
        runtime_env["pip"] = missing + [p for p in pip if p not in missing]
    return Plan(template, entrypoint, runtime_env, findings, wd)


def _dist_name(requirement: str) -> str:
    from packaging.requirements import Requirement

    try:
        return Requirement(requirement).name.lower()
    except ValueError:
        return requirement.strip().lower()


# -- on the cluster -----------------------------------------------------------------------------


def node_table(target: Target, timeout: float = 10.0) -> list[dict]:
    """Every node the cluster knows, dead ones included (state, is_head_node, start/end_time_ms, labels,
    resources); urllib's errors (OSError) pass through."""
    req = urllib.request.Request(
        f"{target.dashboard_url}/api/v0/nodes?limit=1000&detail=1", headers=target.headers()
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read()).get("data", {}).get("result", {}).get("result", [])


def cluster_check(target: Target, timeout: float = 10.0) -> str:
    """Nodes and resources of the cluster behind the target, checked against the group's spec."""
    try:
        rows = node_table(target, timeout)
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            raise SubmitError(
                f"authentication failed at {target.dashboard_url} (HTTP {e.code}): wrong or missing Ray token"
            ) from None
        raise SubmitError(f"{target.dashboard_url} answered HTTP {e.code}") from None
    except OSError as e:
        raise SubmitError(
            f"Ray dashboard {target.dashboard_url} is unreachable ({getattr(e, 'reason', e)})"
        ) from None
    alive = [r for r in rows if r.get("state") == "ALIVE"]
    workers = [r for r in alive if not r.get("is_head_node")]
    groups: dict[str, int] = {}
    for r in workers:
        name = (r.get("labels") or {}).get("group", "?")
        groups[name] = groups.get(name, 0) + 1
    cpus = sum((r.get("resources_total") or {}).get("CPU", 0) for r in alive)
    gpus = sum((r.get("resources_total") or {}).get("GPU", 0) for r in alive)
    line = (
        f"cluster at {target.dashboard_url}: {len(alive)} nodes "
        f"({', '.join(f'{k} x{v}' for k, v in sorted(groups.items())) or 'no workers'}), "
        f"{cpus:g} CPUs, {gpus:g} GPUs"
    )
    if not workers:
        raise SubmitError(line + ": no worker node is alive")
    versions = cluster_versions(target.dashboard_url, target.headers(), timeout=timeout)
    if versions:
        line += f"; {versions_line(versions)}"
        problem = version_mismatch(versions)
        if problem:  # a CTL job runs on the cluster's own Python: said, not refused
            target.warnings.append(problem.replace("a ray:// or ray.init client must run",
                                                   "the job runs on the cluster's; a ray:// or ray.init "
                                                   "client from here would be refused, it must run"))
    else:
        line += "; the cluster's Ray and Python versions are unknown (no /api/v0/cluster_metadata)"
    if target.spec:
        expected = {g.name for g in target.spec.worker_groups}
        unknown = set(groups) - expected - {"?"}
        if unknown:
            target.warnings.append(
                f"{line} has worker groups {sorted(unknown)} that group "
                f"{target.spec.name} does not declare ({sorted(expected)}): is it the "
                "intended cluster?"
            )
        too_many = [g.name for g in target.spec.worker_groups if groups.get(g.name, 0) > g.max_workers]
        if too_many:
            target.warnings.append(f"{line}: more workers than max in {too_many}")
        if not unknown and not too_many:
            line += f"; matches group {target.spec.name}"
    return line


def running_jobs(target: Target) -> list:
    """The target's jobs that have not ended (PENDING or RUNNING), less those lost with their driver's
    node (:func:`lost_reason`); SubmitError when they cannot be listed."""
    client = client_for(target)
    try:
        rows = [j for j in client.list_jobs() if status_name(j) not in TERMINAL]
        nodes = node_table(target) if rows else []  # (a job not ended may be lost with its node)
    except Exception as e:  # noqa: BLE001 - the job client raises its own exception tree
        raise SubmitError(error_line(e, target)) from None
    return [j for j in rows if not lost_reason(j, nodes)]


def client_for(target: Target):
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(target.dashboard_url, headers=target.headers())
    except Exception as e:  # noqa: BLE001 - Ray's client raises many types; one line each
        raise SubmitError(error_line(e, target)) from None


def error_line(e: Exception, target: Target) -> str:
    """A job-API exception as one line (authentication failures named as such)."""
    text = " ".join(str(e).split())
    if "uthentica" in text or "401" in text or "403" in text:
        return f"authentication failed at {target.dashboard_url}: wrong or missing Ray token"
    return f"{type(e).__name__}: {text[:300]}"


def submit(
    target: Target,
    plan: Plan,
    entrypoint_num_cpus: float = 0,
    entrypoint_num_gpus: float = 0,
    submission_id: str | None = None,
) -> tuple[object, str]:
    """Upload the working dir and start the job; returns (client, job id)."""
    client = client_for(target)
    # Ray logs every packaging step at INFO/WARNING; our own lines already say what is uploaded
    for name in (
        "ray._private.runtime_env.packaging",
        "ray._private.runtime_env.working_dir",
        "ray.dashboard.modules.dashboard_sdk",
    ):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        job_id = client.submit_job(
            entrypoint=plan.entrypoint,
            runtime_env=plan.runtime_env,
            entrypoint_num_cpus=entrypoint_num_cpus or None,
            entrypoint_num_gpus=entrypoint_num_gpus or None,
            submission_id=submission_id,
            metadata={"adbray_template": plan.template},
        )
    except Exception as e:  # noqa: BLE001 - Ray's client raises many types; one line each
        raise SubmitError(error_line(e, target)) from None
    return client, job_id


def follow(client, job_id: str, out=sys.stdout, poll_s: float = 1.0, timeout: float | None = None,
           nodes=None, reconnect_s: float = RECONNECT_S, err=sys.stderr, sleep=time.sleep) -> object:
    """Stream the job's logs as the driver writes them (Ray's ``tail_job_logs`` websocket) until it ends;
    returns its JobInfo. Where the stream breaks (a proxy that drops websockets, the head going away), the
    rest is polled from where the stream stopped. While the dashboard does not answer (a head restarting),
    polling retries with backoff for up to ``reconnect_s`` on one progress line on ``err``. With ``nodes``
    (a callable returning :func:`node_table`), a job whose driver's node died raises :class:`JobLost`:
    after a head restart Ray keeps such a job RUNNING. Ctrl-C stops the job."""
    import asyncio

    from pipelines.io import first_line

    written = [0]

    async def stream():
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()
            written[0] += len(chunk)

    logging.getLogger("ray.dashboard.modules.job.sdk").setLevel(logging.WARNING)  # "WebSocket closed ..."
    deadline = time.time() + timeout if timeout else None
    outage = Outage(min(reconnect_s, timeout) if timeout else reconnect_s, err, sleep, poll_s)
    suspect = False  # the node table is read after an outage or a failed log read, until the job ends
    broke = None  # why the stream broke: said once the dashboard answers (an outage says it otherwise)
    try:
        try:
            asyncio.run(asyncio.wait_for(stream(), timeout))
        except asyncio.TimeoutError:
            raise SubmitError(f"job {job_id} still {status_name(client.get_job_info(job_id))} after "
                              f"{timeout:.0f}s") from None
        except Exception as e:  # noqa: BLE001 - the stream broke (or the client has none): poll the rest
            broke = first_line(e)
        while True:  # once after a whole stream (anything it missed), every poll_s after a broken one
            try:
                info = client.get_job_info(job_id)
            except Exception as e:  # the job client raises its own exception tree
                if not unreachable(e):
                    raise
                if deadline and time.time() > deadline:  # --timeout bounds an outage that began late, too
                    outage.give_up(f"job {job_id}", f"past the {timeout:.0f}s timeout")
                outage.wait(e, f"job {job_id}")
                suspect, broke = True, None
                continue
            outage.over()
            if broke:
                print(f"log stream of {job_id} broke ({broke}): polling", file=err)
                broke = None
            try:
                logs = client.get_job_logs(job_id)
            except Exception as e:  # a dead node's agent held the logs (HTTP 500)
                if not unreachable(e):
                    raise
                logs, suspect = "", True
            if len(logs) > written[0]:
                out.write(logs[written[0]:])
                out.flush()
                written[0] = len(logs)
            status = status_name(info)
            if nodes is not None and (suspect or status == "FAILED"):
                reason = _lost(info, nodes)
                if reason:
                    raise JobLost(job_id, reason)
            if status in TERMINAL:
                return info
            if deadline and time.time() > deadline:
                raise SubmitError(f"job {job_id} still {status} after {timeout:.0f}s")
            sleep(poll_s)
    except KeyboardInterrupt:
        print(f"\ninterrupted: stopping job {job_id}", file=err)
        try:
            client.stop_job(job_id)
        except Exception as e:  # noqa: BLE001 - the dashboard may be down (a head restart): say so in one line
            print(f"could not stop job {job_id}: {first_line(e)}; stop it with: adbray jobs stop {job_id}", file=err)
        raise


def _lost(info, nodes) -> str | None:
    try:
        return lost_reason(info, nodes())
    except Exception as e:  # no node table this time (the dashboard coming back): next poll
        if unreachable(e):
            return None
        raise


def status_name(info) -> str:
    return getattr(info.status, "value", str(info.status))


# -- head restarts: jobs whose driver died with its node ----------------------------------------

# Ray's error types for a job whose supervisor actor (which runs the driver) went away
SUPERVISOR_ERRORS = {"JOB_SUPERVISOR_ACTOR_DIED", "JOB_SUPERVISOR_ACTOR_UNKNOWN_FAILURE",
                     "JOB_SUPERVISOR_ACTOR_START_FAILURE"}
_OUTAGE = re.compile(r"status code 5\d\d|^(ConnectionError|ConnectTimeout|ReadTimeout|Timeout|URLError)\b")


class JobLost(SubmitError):
    """The job died with the node its driver ran on (on a group: the head, restarted); ``reason`` says
    which node and when."""

    def __init__(self, job_id: str, reason: str):
        super().__init__(f"job {job_id} FAILED: lost with its driver's node: {reason}")
        self.job_id, self.reason = job_id, reason


def unreachable(e: BaseException) -> bool:
    """Whether an API error means the dashboard is not answering (yet): no connection, a timeout, HTTP 5xx
    (also for a :class:`SubmitError` made by :func:`error_line`)."""
    return isinstance(e, OSError) or bool(_OUTAGE.search(str(e)))


def outage_text(e: BaseException) -> str:
    """A few words for an outage error: ``connection refused`` (or reset, aborted), ``timed out``, ``HTTP 503``,
    else its first line, cut short."""
    from pipelines.io import first_line

    text = str(e)
    code = re.search(r"status code (5\d\d)", text)
    if code:
        return f"HTTP {code.group(1)}"
    for words in ("refused", "reset", "aborted"):
        if words in text.lower():
            return f"connection {words}"
    if "timed out" in text.lower() or "timeout" in type(e).__name__.lower():
        return "timed out"
    return first_line(e)[:100]


def _clock(ms) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ms / 1000)) if ms else "an unknown time"


def lost_reason(info, nodes: list[dict]) -> str | None:
    """Why a job is gone with the node its driver ran on, from the cluster's node table (dead nodes
    included); None when it is not.

    The driver (and Ray's supervisor actor that runs it) is placed on the head unless the job reserves
    entrypoint resources. When the head dies, both die with it; after an HA restart Ray 2.60 still lists
    the job RUNNING ("Job is currently running.") until a job manager starts on the new head (the next
    submission starts one), which then marks it FAILED with a supervisor error: neither says why. A job
    is lost when it is not ended (or FAILED with such an error) and its driver's node is DEAD, or it was
    still PENDING, pinned to the head, when a newer head started."""
    if not may_be_lost(info):
        return None
    status = status_name(info)
    head_since = max((n.get("start_time_ms") or 0 for n in nodes
                      if n.get("is_head_node") and n.get("state") == "ALIVE"), default=0)
    restarted = head_since > (info.start_time or 0)
    node = next((n for n in nodes if info.driver_node_id and n.get("node_id") == info.driver_node_id), None)
    if node is not None:
        if node.get("state") != "DEAD":
            return None
        why = " ".join(str(node.get("state_message") or "").split())
        reason = (f"its driver ran on {'the head' if node.get('is_head_node') else 'worker'} node "
                  f"{info.driver_node_id[:8]}, which died at {_clock(node.get('end_time_ms'))}"
                  + (f" ({why})" if why else ""))
    elif status == "PENDING" and restarted and not _reserves(info):
        reason = "it was still pending (its driver pinned to the old head) when the head restarted"
    else:
        return None
    if restarted:
        reason += f"; the head restarted at {_clock(head_since)}"
    if status != "FAILED":
        reason += f" (Ray still reports {status})"
    return reason


def may_be_lost(info) -> bool:
    """Whether the job could be lost with its driver's node (:func:`lost_reason` then reads the node table):
    it has not ended, or it FAILED because Ray's supervisor actor went away."""
    status = status_name(info)
    error = getattr(getattr(info, "error_type", None), "value", getattr(info, "error_type", None))
    return status not in TERMINAL or (status == "FAILED" and error in SUPERVISOR_ERRORS)


def _reserves(info) -> bool:
    """Whether the job reserved entrypoint resources (then its driver may run on any node)."""
    return bool(info.entrypoint_num_cpus or info.entrypoint_num_gpus or getattr(info, "entrypoint_memory", 0)
                or info.entrypoint_resources)


class Outage:
    """A dashboard that stopped answering, on one progress line: ``wait`` sleeps with backoff (``poll_s``
    doubling up to 10 s) and writes a dot per try, ``over`` ends the line; past ``limit_s`` a SubmitError."""

    def __init__(self, limit_s: float, err=sys.stderr, sleep=time.sleep, poll_s: float = 1.0):
        self.limit_s, self.err, self.sleep, self.poll_s = limit_s, err, sleep, poll_s
        self.since, self.tries = None, 0

    def wait(self, e: BaseException, what: str) -> None:
        if self.since is None:
            self.since, self.tries = time.monotonic(), 0
            self.err.write(f"dashboard unreachable ({outage_text(e)}): the head may be restarting; "
                           f"following {what} again once it answers (up to {self.limit_s:.0f}s) ")
        if time.monotonic() - self.since > self.limit_s:
            self.give_up(what)
        self.err.write(".")
        self.err.flush()
        self.sleep(min(self.poll_s * 2 ** self.tries, 10.0))
        self.tries += 1

    def give_up(self, what: str, why: str = "") -> None:
        """End the progress line and raise the one-line SubmitError (``why``: besides the time)."""
        elapsed = time.monotonic() - self.since if self.since is not None else 0.0
        if self.since is not None:
            self.err.write("gave up\n")
            self.err.flush()
        raise SubmitError(f"the dashboard did not answer for {elapsed:.0f}s{f' ({why})' if why else ''}: the state "
                          f"of {what} is unknown (adbray jobs list once the cluster is back)")

    def over(self) -> None:
        if self.since is not None:
            self.err.write(f" back after {time.monotonic() - self.since:.0f}s\n")
            self.err.flush()
            self.since = None


def resubmission_id(job_id: str) -> str:
    """The submission id of a job's one resubmission: ``<id>-r1``."""
    return f"{job_id}-r1"


def follow_or_resubmit(client, job_id: str, resubmit=None, log=None, timeout: float | None = None,
                       reconnect_s: float = RECONNECT_S, sleep=time.sleep, **follow_args) -> tuple[object, str]:
    """:func:`follow` the job; where it is lost with its driver's node (:class:`JobLost`) and ``resubmit``
    is given (a callable ``new_id -> job id``: the CLI's ``--resubmit``), submit it again once, as
    :func:`resubmission_id`, and follow that. Returns (JobInfo, the id of the job it belongs to).
    Raises JobLost without ``resubmit``, and when the resubmitted job is lost too (never a second
    resubmission). A resubmission the dashboard refuses for an outage (5xx, no connection: the head's
    job agent not up yet) is retried with backoff for up to ``reconnect_s``."""
    log = log or (lambda m: print(m, file=sys.stderr))
    deadline = time.time() + timeout if timeout else None

    def left():
        return max(1.0, deadline - time.time()) if deadline else None

    args = {"nodes": None, "reconnect_s": reconnect_s, "sleep": sleep, **follow_args}
    try:
        return follow(client, job_id, timeout=left(), **args), job_id
    except JobLost as lost:
        if resubmit is None:
            raise
        log(str(lost))
        new_id = resubmission_id(job_id)
        outage = Outage(reconnect_s, args.get("err", sys.stderr), sleep, args.get("poll_s", 1.0))
        while True:
            try:
                resubmit(new_id)
                break
            except SubmitError as e:
                if "already exists" in str(e):  # an earlier try went through; its answer did not
                    break
                if not unreachable(e):
                    raise
                outage.wait(e, f"the resubmission of {job_id}")
        outage.over()
        log(f"resubmitted job {job_id} as {new_id} (once: its outputs are replaced on write)")
    try:
        return follow(client, new_id, timeout=left(), **args), new_id
    except JobLost as again:
        raise JobLost(new_id, f"{again.reason}; it resubmitted {job_id}, which is not resubmitted again") from None
