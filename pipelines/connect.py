"""Connect to a Ray cluster without ever silently starting a local one.

``connect()`` accepts ``None``/``"auto"`` (inside a Ray job, or ``RAY_ADDRESS``),
``ray://host:10001``, a dashboard URL ``http://host:8265`` (converted to
``ray://host:10001``) or a GCS address ``host:port``. When an address is given
and cannot be reached, :class:`ClusterUnreachable` is raised.

Versions: a client outside the cluster must run the cluster's Ray version and
Python major.minor (Ray's client refuses otherwise). The cluster's versions are
read from its dashboard, ``GET /api/v0/cluster_metadata`` (what the GCS recorded
when the head started, the record Ray's own check compares against); where no
dashboard answers, the Ray client handshake reports them. Either way a mismatch
is one line, :class:`VersionMismatch`, naming both.
"""
from __future__ import annotations

import json
import os
import platform
import socket
import sys
import urllib.request
from urllib.parse import urlparse

DASHBOARD_PORT = 8265
# ray.init arguments that size a Ray started in-process; dropped when attaching to a cluster
LOCAL_ONLY = ("num_cpus", "num_gpus", "object_store_memory", "resources")
CLIENT_PORT = 10001


class ClusterUnreachable(ConnectionError):
    """The given Ray address does not answer."""


class MissingToken(ConnectionError):
    """Token auth is on but this client has no token."""


class VersionMismatch(ConnectionError):
    """The cluster runs another Ray version, or another Python major.minor, than this process."""


def local_versions() -> dict:
    """This process's Ray and Python versions: ``{"ray": "2.60.0", "python": "3.11.9"}``."""
    import ray

    return {"ray": ray.__version__, "python": platform.python_version()}


def cluster_versions(dashboard: str, headers: dict | None = None, timeout: float = 5.0) -> dict | None:
    """The cluster's Ray and Python versions from its dashboard (``/api/v0/cluster_metadata``), or None when
    the dashboard does not answer with them."""
    req = urllib.request.Request(f"{dashboard.rstrip('/')}/api/v0/cluster_metadata", headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            data = json.loads(resp.read()).get("data") or {}
    except (OSError, ValueError, AttributeError):
        return None
    ray_version = data.get("rayVersion") or data.get("ray_version")  # the dashboard answers in camelCase
    python_version = data.get("pythonVersion") or data.get("python_version")
    if not (ray_version and python_version):
        return None
    return {"ray": str(ray_version), "python": str(python_version)}


def versions_line(cluster: dict, mine: dict | None = None) -> str:
    """``cluster Ray 2.60.0 / Python 3.11.9, here Ray 2.60.0 / Python 3.11.9``."""
    mine = mine or local_versions()
    return (f"cluster Ray {cluster['ray']} / Python {cluster['python']}, "
            f"here Ray {mine['ray']} / Python {mine['python']}")


def version_mismatch(cluster: dict, mine: dict | None = None) -> str | None:
    """One line naming both versions when Ray differs or Python's major.minor differs (what Ray's client
    refuses), else None."""
    mine = mine or local_versions()
    if cluster["ray"] == mine["ray"] and cluster["python"].split(".")[:2] == mine["python"].split(".")[:2]:
        return None
    return (f"version mismatch: {versions_line(cluster, mine)}; a ray:// or ray.init client must run the "
            "cluster's Ray and Python versions (submit it as a job instead, or install them here)")


def _handshake_versions(message: str) -> dict | None:
    """The cluster's versions from Ray's own "Version mismatch" error (the client handshake)."""
    import re

    m = re.search(r"cluster was started with:\s*Ray: (\S+)\s*Python: (\S+)", message)
    return {"ray": m.group(1), "python": m.group(2)} if m else None


def token_available() -> bool:
    """True when a Ray auth token is set (env var, token file, or ~/.ray/auth_token)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        return os.path.isfile(os.path.expanduser(path))
    return os.path.isfile(os.path.expanduser("~/.ray/auth_token"))


def _host_port(address: str, default_port: int) -> tuple[str, int]:
    parsed = urlparse(address if "://" in address else f"x://{address}")
    if not parsed.hostname:
        raise ValueError(f"bad Ray address {address!r}")
    return parsed.hostname, parsed.port or default_port


def to_client_address(address: str, client_port: int = CLIENT_PORT) -> str:
    """``http://h:8265`` -> ``ray://h:10001``; ``ray://`` and GCS addresses pass through."""
    if address.startswith(("http://", "https://")):
        host, _ = _host_port(address, DASHBOARD_PORT)
        return f"ray://{host}:{client_port}"
    return address


def to_dashboard_url(address: str, dashboard_port: int = DASHBOARD_PORT) -> str:
    """``ray://h:10001`` -> ``http://h:8265``; dashboard URLs pass through."""
    if address.startswith(("http://", "https://")):
        return address.rstrip("/")
    host, _ = _host_port(address, CLIENT_PORT)
    return f"http://{host}:{dashboard_port}"


def check_reachable(address: str, timeout: float = 3.0) -> None:
    """Raise ClusterUnreachable unless a TCP connect to the address succeeds."""
    default = CLIENT_PORT if address.startswith("ray://") else DASHBOARD_PORT
    host, port = _host_port(address, default)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return
    except OSError as e:
        raise ClusterUnreachable(f"Ray cluster at {address} is unreachable ({e.strerror or e})") from None


def dashboard_url() -> str | None:
    """The dashboard URL of the cluster this process is attached to (driver or Ray client), if it has one."""
    import ray

    try:
        if ray.util.client.ray.is_connected():
            url = ray.util.client.ray._get_dashboard_url()
        else:
            node = ray._private.worker._global_node
            url = node.webui_url if node is not None else None
    except Exception:  # noqa: BLE001 - a private API of Ray: no URL rather than a failed run
        url = None
    return f"http://{url}" if url and "://" not in url else (url or None)


def cluster_info() -> dict:
    """The attached cluster: alive nodes, CPUs, GPUs, dashboard URL (recorded in a run's summary)."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    res = ray.cluster_resources()
    return {"nodes": len(nodes), "cpus": res.get("CPU", 0), "gpus": res.get("GPU", 0),
            "dashboard": dashboard_url()}


def cluster_resources_line() -> str:
    """One line describing the connected cluster: nodes, CPUs, GPUs, dashboard."""
    info = cluster_info()
    return (f"joined Ray cluster: {info['nodes']} nodes, {info['cpus']:g} CPUs, {info['gpus']:g} GPUs"
            + (f", dashboard {info['dashboard']}" if info["dashboard"] else ""))


def in_ray_job() -> bool:
    """Whether this process is a Ray job's driver (``ray job submit`` / CTL set its environment)."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ


def use_token(token: str | None = None, token_path: str | None = None) -> None:
    """Make this process a token-auth Ray client (env vars plus Ray's cached token)."""
    os.environ["RAY_AUTH_MODE"] = "token"
    if token:
        os.environ["RAY_AUTH_TOKEN"] = token
        os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
    elif token_path:
        os.environ["RAY_AUTH_TOKEN_PATH"] = str(token_path)
        os.environ.pop("RAY_AUTH_TOKEN", None)
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def check_versions(address: str, dashboard: str | None = None) -> dict | None:
    """Read the cluster's versions from its dashboard (``dashboard``, else the address itself when it is
    one, else the standard port beside a ``ray://`` address); VersionMismatch (one line) on a mismatch.
    Returns the versions, or None when no dashboard answered (the Ray client handshake decides then)."""
    url = dashboard or (address if address.startswith(("http://", "https://")) else to_dashboard_url(address))
    headers = {}
    token = os.environ.get("RAY_AUTH_TOKEN")
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if not token and path and os.path.isfile(os.path.expanduser(path)):
        from pathlib import Path

        token = Path(path).expanduser().read_text().strip()
    if token:
        headers["Authorization"] = f"Bearer {token}"
    found = cluster_versions(url, headers, timeout=3.0)
    if found:
        problem = version_mismatch(found)
        if problem:
            raise VersionMismatch(problem)
    return found


def connect(address: str | None = None, token: str | None = None, quiet: bool = False,
            dashboard: str | None = None, **init_kwargs):
    """Attach to a Ray cluster (see module doc) and return ``ray.init``'s context.

    ``address=None`` uses ``RAY_ADDRESS`` or, inside a Ray job, the job's cluster;
    with neither it starts an in-process local Ray (the laptop case), which is
    said on stderr, sized by ``num_cpus``/``object_store_memory``/... in
    ``init_kwargs`` (ignored when attaching to a cluster). ``token`` (or ``RAY_AUTH_TOKEN``) is passed for token auth.
    A client outside the cluster checks the cluster's Ray and Python versions first (:func:`check_versions`;
    ``dashboard`` is the cluster's dashboard URL where it is not beside the address) and raises
    :class:`VersionMismatch`, one line naming both, instead of connecting.
    """
    import ray

    if token:
        use_token(token)
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address and address != "auto":  # checked even when attached: a bad address is always an error
        original, address = address, to_client_address(address)
        # inside a Ray job the job's own environment says how to reach its cluster (a group made in the
        # console has no token and its jobs connect without one): only a client outside needs one here
        if os.environ.get("RAY_AUTH_MODE", "token").lower() != "disabled" and not token_available() \
                and not in_ray_job():
            raise MissingToken(f"no Ray auth token for {address}: set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH "
                               "(or RAY_AUTH_MODE=disabled for a cluster without token auth)")
        check_reachable(address)
        if not in_ray_job():  # a job's driver runs on the cluster, with the cluster's versions
            check_versions(original, dashboard)
    if ray.is_initialized():
        return None
    if address is not None:  # attaching: sizing only applies to a Ray we start ourselves
        for key in LOCAL_ONLY:
            init_kwargs.pop(key, None)
    init_kwargs.setdefault("log_to_driver", True)
    init_kwargs.setdefault("configure_logging", False)
    if address is None:
        print("no Ray address given: starting a local in-process Ray", file=sys.stderr)
    for attempt in (1, 2):
        try:
            ctx = ray.init(address=address, **init_kwargs)
            break
        except RuntimeError as e:  # Ray's client handshake: "Version mismatch: ..." (several lines)
            found = _handshake_versions(str(e))
            if not found:
                raise
            raise VersionMismatch(version_mismatch(found) or f"version mismatch: {versions_line(found)}") from None
        except ConnectionError as e:
            first = str(e).splitlines()[0]
            # Ray client's proxier answers an empty "Initialization failure" when the per-client server
            # it started is not ready yet (seen once in a full suite run): ask for a new one, once
            if attempt == 1 and str(address).startswith("ray://") and "Initialization failure" in first:
                print(f"ray client: {first.strip()} (retrying once)", file=sys.stderr)
                continue
            raise ClusterUnreachable(f"cannot join Ray cluster at {address}: {first}") from None
    if not quiet:
        print(cluster_resources_line(), file=sys.stderr)
    return ctx
