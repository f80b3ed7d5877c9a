"""``adbray serve``: a template's Serve app on a group or cluster, from a run folder.

One source for an app's settings: the template's ``serve`` config section. :func:`app_config` turns it
into a Serve application (name and route prefix from the section, ``import_path`` = the template's
``serve_app``, ``args = {run_dir, serve: <the section>}``, a ``runtime_env``) and :func:`serve_config`
into a config file Ray's own ``serve deploy`` takes; each template's checked-in ``serve_config.yaml``
is :func:`config_yaml`'s output.

:func:`deploy` sends that config through the dashboard's Serve REST API, as ``serve deploy`` does:
the template's working dir uploaded as for a job (the replicas import the template from it), the
target's job environment (its OSS endpoint) and the requirements its group lacks in the app's
``runtime_env``, merged with the cluster's other config-deployed apps (a deploy replaces them all).
Proxies listen on 127.0.0.1 on a local cluster (every node on this machine) and on all interfaces
on a group, at the port of the group's Serve address (``RayServePublicAddress``), else 8000; a
Serve instance that already runs keeps its options. It returns once the app answers
``/healthz`` where a client calls it (:func:`pipelines.serving.wait_until_routed` over the REST
API): the group's Serve address (else the head's host and Serve's port), and on a local cluster
every node's proxy. :func:`delete` removes the app the same way.
"""
from __future__ import annotations

import json
import logging
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import yaml

from pipelines.io import first_line
from pipelines.serving import (
    ALL_INTERFACES,
    SERVE_HTTP_PORT,
    AppFailed,
    free_port,
    proxy_url,
    wait_until_routed,
)

HEALTH_PATH = "/healthz"  # every template's Serve app answers it (200 when it can serve)
PLACEHOLDER_RUN_DIR = "oss://BUCKET/runs/{template}/RUN_ID"


class ServeError(RuntimeError):
    """Deploying or deleting stopped; the message is one line."""


# -- the config -----------------------------------------------------------------------------------


def serve_section(template, config: str | None = None, overrides=()):
    """The template's ``serve`` config section (``config`` default: the template's default config)."""
    if not template.serve_app:
        raise ServeError(f"template {template.name} has no Serve app (its Template declares no serve_app)")
    section = getattr(template.load_config(config, list(overrides)), "serve", None)
    if section is None or not all(hasattr(section, k) for k in ("app_name", "route_prefix")):
        raise ServeError(f"template {template.name}: its config has no serve section with app_name and route_prefix")
    return section


def app_config(template, section, run_dir: str, runtime_env: dict | None = None) -> dict:
    """One Serve application for ``template``'s app: settings from ``section``, the model from ``run_dir``."""
    return {"name": section.app_name, "route_prefix": section.route_prefix, "import_path": template.serve_app,
            "runtime_env": runtime_env or {},
            "args": {"run_dir": run_dir, "serve": section.model_dump(mode="json")}}


def serve_config(apps: list[dict], host: str = "127.0.0.1", port: int = SERVE_HTTP_PORT) -> dict:
    """A Serve config file (``serve deploy``/the REST API): a proxy on every node, at ``host:port``."""
    return {"proxy_location": "EveryNode", "http_options": {"host": host, "port": port}, "applications": apps}


def config_yaml(template, section=None, run_dir: str | None = None, host: str = "127.0.0.1",
                port: int = SERVE_HTTP_PORT, runtime_env: dict | None = None) -> str:
    """A Serve config file for ``template``'s app (default: its default ``serve`` section, a placeholder
    run folder, 127.0.0.1:8000: ``<template>/serve_config.yaml``), with a header saying where it comes from."""
    section = section or serve_section(template)
    run_dir = run_dir or PLACEHOLDER_RUN_DIR.format(template=template.name)
    body = serve_config([app_config(template, section, run_dir, runtime_env)], host, port)
    return (f"# Generated from {template.name}'s `serve` config section by `adbray serve {template.name} "
            "--print-config`: change that section (or --set serve.KEY=VALUE), not this file.\n"
            "# args.run_dir: a run folder on storage every node reads (oss://...) holding the trained model.\n"
            f"# `adbray serve {template.name} --address URL|--group NAME --run-dir URI --print-config` writes one "
            "for a cluster,\n# with the working dir uploaded there (runtime_env), for `serve deploy FILE -a URL`.\n"
            + yaml.safe_dump(body, sort_keys=False))


# -- the target -----------------------------------------------------------------------------------


@dataclass
class ServeTarget:
    """Where the app goes: the job target (dashboard, token), whether all its nodes are on this machine
    (a local cluster), and the group's Serve address when it has one."""

    target: object  # deploy.jobs.Target
    local: bool
    public_url: str | None = None
    client: object = field(default=None, repr=False)

    def rest(self):
        """Ray's Serve REST client of the target's dashboard (what ``serve deploy`` uses)."""
        if self.client is None:
            from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

            from .jobs import error_line

            try:
                self.client = ServeSubmissionClient(self.target.dashboard_url, headers=self.target.headers())
            except Exception as e:  # noqa: BLE001 - unreachable, refused, wrong token: one line
                raise ServeError(error_line(e, self.target)) from None
        return self.client


def serve_target(target, group_info: dict | None = None) -> ServeTarget:
    """A :class:`ServeTarget` for a resolved job target; ``group_info`` is the group's description."""
    from . import local
    from .openapi import addresses

    public = addresses(group_info)["serve"] if group_info else None
    is_local = group_info is None and local.find_by_address(target.dashboard_url, target.cluster_address) is not None
    return ServeTarget(target, is_local, public.rstrip("/") if public else None)


def details(st: ServeTarget) -> dict:
    """The cluster's Serve state (``GET /api/serve/applications/``)."""
    return _call(st, lambda c: c.get_serve_details())


def _call(st: ServeTarget, fn):
    from .jobs import error_line

    client = st.rest()
    try:
        return fn(client)
    except Exception as e:  # noqa: BLE001 - the REST API's errors (HTTP, connection) as one line
        raise ServeError(error_line(e, st.target)) from None


def http_options(st: ServeTarget, current: dict, host: str | None = None, port: int | None = None) -> dict:
    """The HTTP options to send: a running Serve's own; else 127.0.0.1 and a free port on a local cluster,
    all interfaces on a group at its Serve address's port (else 8000); ``host``/``port`` override."""
    if current.get("controller_info") and current.get("http_options"):
        return current["http_options"]
    if st.local:
        return {"host": host or "127.0.0.1", "port": port or free_port()}
    public_port = urlparse(st.public_url).port if st.public_url else None
    return {"host": host or "0.0.0.0", "port": port or public_port or SERVE_HTTP_PORT}


def declared_apps(current: dict, without: str) -> list[dict]:
    """The config-deployed apps running now (their deployed configs), but ``without``."""
    return [a["deployed_app_config"] for name, a in (current.get("applications") or {}).items()
            if name != without and a.get("deployed_app_config")]


def client_urls(st: ServeTarget, current: dict) -> dict[str, str]:
    """``{what: base URL}`` a client calls: the group's Serve address (else the head's host and Serve's
    port); on a local cluster every node's proxy (``proxy:<node id>``) instead."""
    http = current.get("http_options") or {}
    if st.local:
        nodes = {n.get("node_id"): n for n in _nodes(st)}
        return {f"proxy:{nid}": proxy_url(p.get("node_ip") or "127.0.0.1", (nodes.get(nid) or {}).get("labels"),
                                          http.get("host", "127.0.0.1"), http.get("port", SERVE_HTTP_PORT))
                for nid, p in sorted((current.get("proxies") or {}).items())}
    if st.public_url:
        return {"serve address": st.public_url}
    head = urlparse(st.target.dashboard_url).hostname
    host = head if http.get("host") in ALL_INTERFACES else http.get("host")
    return {"head": f"http://{host}:{http.get('port', SERVE_HTTP_PORT)}"}


def _nodes(st: ServeTarget) -> list[dict]:
    req = urllib.request.Request(f"{st.target.dashboard_url}/api/v0/nodes?limit=1000&detail=1",
                                 headers=st.target.headers())
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read()).get("data", {}).get("result", {}).get("result", [])


def rest_snapshot(st: ServeTarget):
    """``snapshot(app_name)`` for :func:`pipelines.serving.wait_until_routed` from the REST API: nodes with a
    running replica, proxy statuses, :func:`client_urls`; AppFailed when the app failed to deploy."""
    def snapshot(app_name: str):
        current = st.rest().get_serve_details()
        app = (current.get("applications") or {}).get(app_name) or {}
        if app.get("status") == "DEPLOY_FAILED":
            lines = [line.strip() for line in str(app.get("message") or "?").splitlines() if line.strip()]
            raise AppFailed(f"Serve app {app_name} DEPLOY_FAILED: {lines[-1][:500]}")  # a traceback ends in the error
        replicas = {r.get("node_id") for d in (app.get("deployments") or {}).values()
                    for r in d.get("replicas") or [] if r.get("state") == "RUNNING"}
        proxies = {nid: str(p.get("status")) for nid, p in (current.get("proxies") or {}).items()}
        if app.get("status") != "RUNNING":
            return replicas, proxies, {}
        return replicas, proxies, client_urls(st, current)

    return snapshot


# -- deploy and delete ----------------------------------------------------------------------------


def upload_runtime_env(st: ServeTarget, runtime_env: dict) -> dict:
    """The job ``runtime_env`` with its working dir uploaded to the cluster (``gcs://`` URI), as a Serve
    config takes it (remote URIs only)."""
    env = dict(runtime_env)
    for name in ("ray._private.runtime_env.packaging", "ray._private.runtime_env.working_dir",
                 "ray.dashboard.modules.dashboard_sdk"):
        logging.getLogger(name).setLevel(logging.ERROR)
    _call(st, lambda c: c._upload_working_dir_if_needed(env))
    env.pop("excludes", None)
    return env


def deploy(st: ServeTarget, template, section, run_dir: str, runtime_env: dict, host: str | None = None,
           port: int | None = None, timeout: float = 300.0, log=None) -> dict:
    """Deploy ``template``'s app (see the module docstring); returns ``{app, route_prefix, urls}`` where
    ``urls`` are the app's base URLs a client calls."""
    log = log or (lambda m: None)
    current = details(st)
    options = http_options(st, current, host, port)
    public_port = urlparse(st.public_url).port if st.public_url else None
    if not st.local and public_port and int(options.get("port") or 0) != public_port:
        raise ServeError(f"Serve already runs there on port {options.get('port')} (started by a job, e.g. a "
                         f"template's online step), not on the group's Serve address port {public_port}: "
                         "`serve shutdown` there (or run jobs with serve.smoke_requests=0) and deploy again")
    if not st.local and options.get("host") not in ALL_INTERFACES:
        log(f"warning: Serve already runs there bound to {options.get('host')} (reachable only on its node); "
            "`serve shutdown` there and deploy again to bind all interfaces")
    apps = [*declared_apps(current, section.app_name), app_config(template, section, run_dir, runtime_env)]
    config = serve_config(apps, **{k: options[k] for k in ("host", "port")})
    config["http_options"] = options
    _call(st, lambda c: c.deploy_applications(config))
    log(f"deploying {section.app_name} from {run_dir}: waiting until it answers {section.route_prefix}{HEALTH_PATH}")
    try:
        bases = wait_until_routed(section.app_name, section.route_prefix, HEALTH_PATH, timeout, rest_snapshot(st))
    except (AppFailed, TimeoutError) as e:
        raise ServeError(first_line(e)) from None
    names = client_urls(st, details(st))
    urls = {what: f"{base}{section.route_prefix}" for what, base in names.items() if base in bases}
    return {"app": section.app_name, "route_prefix": section.route_prefix, "urls": urls}


def delete(st: ServeTarget, app_name: str, timeout: float = 60.0) -> None:
    """Remove a config-deployed app (the others stay); ServeError when the cluster runs no such app."""
    import time

    current = details(st)
    app = (current.get("applications") or {}).get(app_name)
    if app is None:
        raise ServeError(f"no Serve app {app_name!r} runs there "
                         f"(apps: {', '.join(current.get('applications') or {}) or 'none'})")
    if not app.get("deployed_app_config"):
        raise ServeError(f"Serve app {app_name!r} was deployed from a driver (serve.run), not from a config: "
                         "delete it from Python (ray.serve.delete) or `serve shutdown`")
    config = {"proxy_location": current.get("proxy_location") or "EveryNode",
              "http_options": current.get("http_options") or {}, "applications": declared_apps(current, app_name)}
    _call(st, lambda c: c.deploy_applications(config))
    deadline = time.time() + timeout
    while app_name in (details(st).get("applications") or {}):
        if time.time() > deadline:
            raise ServeError(f"Serve app {app_name!r} still there {timeout:.0f}s after its deletion")
        time.sleep(0.5)


def print_config(st: ServeTarget | None, template, section, run_dir: str | None, runtime_env: dict | None,
                 host: str | None = None, port: int | None = None) -> str:
    """The Serve config :func:`deploy` would send to ``st`` (None: :func:`config_yaml` with these values),
    safe to print: URL passwords and secret ``--set`` items in its ``runtime_env`` are masked (put them back,
    or pass them with ``adbray serve``, which sends them unmasked)."""
    from pipelines.config import redact

    from .jobs import shown_runtime_env

    if st is None:
        return redact(config_yaml(template, section, run_dir, host or "127.0.0.1", port or SERVE_HTTP_PORT))
    options = http_options(st, details(st), host, port)
    shown = shown_runtime_env(runtime_env) if runtime_env else runtime_env
    return redact(config_yaml(template, section, run_dir, options["host"], options["port"], shown))


def check_run_dir(run_dir: str | None, shared_disk: bool = False) -> str:
    """A run folder every node can read: a storage URI (a local path is one node's disk, unless the
    cluster's nodes share this machine's disk: ``shared_disk``)."""
    from pipelines.io import is_remote

    if not run_dir:
        raise ServeError("give --run-dir: the run folder (oss://BUCKET/runs/...) that holds the trained model")
    if not is_remote(run_dir):
        if shared_disk:
            return str(Path(run_dir).resolve())
        raise ServeError(f"--run-dir {run_dir} is a local path; the app's replicas run on the cluster's nodes, "
                         "which read the model from storage: give its oss:// URI")
    return run_dir.rstrip("/")



def runtime_env_for(template, config: str | None, overrides, target) -> tuple[dict, list]:
    """The app's ``runtime_env`` as ``adbray submit`` would give the template's job on ``target`` (working
    dir, the target's job environment, requirements its group lacks) and the preflight's findings; the
    config checked is ``config`` or the template's default (``configs/local.yaml``)."""
    from .jobs import prepare

    default = template.root / "configs" / "local.yaml"
    plan = prepare(template.name, None, config or (str(default) if default.is_file() else None), overrides,
                   target.spec, job_env=target.job_env)
    return plan.runtime_env, plan.findings
