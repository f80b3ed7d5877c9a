"""Ray Serve helpers shared by the online templates, and an HTTP load generator.

``start_serve()`` starts Serve's HTTP proxy unless Serve already runs, and returns the
base URL: on a cluster whose nodes all live on this machine (in-process Ray, a local
cluster) on 127.0.0.1 and a free port (never the default 8000, which may be taken),
elsewhere (a group's nodes) on all interfaces and Serve's port 8000, so that the app
can be reached from outside its node (:func:`http_options`). ``load_test`` drives a
fixed request rate (open loop) and reports latency percentiles and the error rate;
``max_rps`` measures throughput; ``ramp_test`` drives a rate that changes in stages and reports it per
time window. ``Autoscaling`` is a deployment's replica autoscaling in a template's ``serve`` section
(Ray Serve's ``autoscaling_config``), ``replica_options`` the Serve options of fixed or autoscaled replicas.
"""
from __future__ import annotations

import asyncio
import ipaddress
import math
import os
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence

import numpy as np
from pydantic import Field, model_validator

from .config import StrictModel
from .io import first_line


class AppFailed(RuntimeError):
    """A Serve app that will not come up (its status says why); stops :func:`wait_until_routed`."""


SERVE_HTTP_PORT = 8000  # Serve's own default, where a group's proxies listen
ALL_INTERFACES = ("0.0.0.0", "", "::")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an IP address or name) is this machine only (127.0.0.0/8, ::1, localhost)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


LOCAL_CLUSTER_ENV = ("ADBRAY_CLUSTER_DIR", "ADBRAY_DISKS")  # set by deploy.local in its clusters and their clients


def started_ray_here() -> bool:
    """Whether this process started the Ray it is attached to (in-process Ray: a laptop run, a test), whose
    nodes report the machine's own address rather than loopback."""
    try:
        from ray._private.worker import global_worker

        node = getattr(global_worker, "node", None)
        return bool(node is not None and node.head)
    except ImportError:  # pragma: no cover - private API moved
        return False


def http_options(node_addresses: Sequence[str]) -> dict:
    """Serve's HTTP options for a cluster whose nodes have ``node_addresses``: a cluster on this machine
    (no address, one on loopback, Ray started by this process, or this process marked as a local
    cluster's by ``LOCAL_CLUSTER_ENV``) -> ``127.0.0.1`` and a free port (``$ADBRAY_SERVE_PORT`` when set);
    else all interfaces and port 8000."""
    port = int(os.environ.get("ADBRAY_SERVE_PORT", "0"))
    if (not node_addresses or any(is_loopback(a) for a in node_addresses) or started_ray_here()
            or any(os.environ.get(k) for k in LOCAL_CLUSTER_ENV)):
        return {"host": "127.0.0.1", "port": port or free_port()}
    return {"host": "0.0.0.0", "port": port or SERVE_HTTP_PORT}


def start_serve(host: str | None = None, port: int | None = None) -> str:
    """Start Serve (if not running) on ``host:port`` (default: :func:`http_options` for this cluster's
    nodes) and return ``http://host:port``."""
    from ray import serve

    try:
        from ray.serve.context import _get_global_client

        client = _get_global_client(raise_if_no_controller_running=False)
    except Exception:  # noqa: BLE001 - pragma: no cover - private API moved
        client = None
    if client is None:
        import ray

        options = http_options([n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")])
        options = {"host": host or options["host"], "port": port or options["port"]}
        for attempt in range(3):
            try:
                serve.start(http_options=options)
                break
            except ray.exceptions.ActorDiedError:
                # on a busy node the controller may replace a proxy that missed its health check
                # while serve.start waited for it: the controller is up, ask again for the new proxy
                if attempt == 2:
                    raise
    return serve_base_url()


def serve_base_url() -> str:
    """The HTTP proxy's base URL of the running Serve instance."""
    from ray import serve

    opts = serve.status().proxies  # noqa: F841  (forces a controller round trip)
    from ray.serve.context import _get_global_client

    cfg = _get_global_client().http_config
    host = "127.0.0.1" if cfg.host in ALL_INTERFACES else cfg.host
    return f"http://{host}:{cfg.port}"


SERVE_PORT_LABEL = "serve-port"  # node label (deploy.local): the port of a worker raylet's own proxy


def proxy_url(node_address: str, labels: dict | None, host: str, port: int) -> str:
    """Where a node's Serve proxy answers: a proxy bound to all interfaces at its node's address, else where
    it is bound; on Serve's HTTP port, or the port in the node's ``serve-port`` label (local clusters give
    each worker raylet's proxy its own port, as each node of a real group has its own address)."""
    where = node_address if host in ALL_INTERFACES else host
    return f"http://{where}:{(labels or {}).get(SERVE_PORT_LABEL) or port}"


def proxy_urls() -> dict[str, str]:
    """``{node_id: base URL}`` of every running Serve HTTP proxy (see :func:`proxy_url`)."""
    import ray
    from ray import serve
    from ray.serve.context import _get_global_client

    proxies = serve.status().proxies
    cfg = _get_global_client().http_config
    return {node["NodeID"]: proxy_url(node["NodeManagerAddress"], node.get("Labels"), cfg.host, cfg.port)
            for node in ray.nodes() if node.get("Alive") and node["NodeID"] in proxies}


def _replica_nodes(app_name: str) -> set[str]:
    """Nodes that hold an alive replica of ``app_name`` (Serve starts a proxy on each)."""
    from ray.util.state import list_actors

    prefix = f"ServeReplica:{app_name}:"
    actors = list_actors(filters=[("state", "=", "ALIVE")], limit=10000, raise_on_missing_output=False)
    return {a.node_id for a in actors if (a.class_name or "").startswith(prefix)}


def driver_snapshot(app_name: str) -> tuple[set[str], dict[str, str], dict[str, str]]:
    """From a driver: (nodes holding a replica of ``app_name``, ``{node_id: proxy status}``,
    :func:`proxy_urls`)."""
    from ray import serve

    proxies = {n: str(getattr(s, "value", s)) for n, s in serve.status().proxies.items()}
    return _replica_nodes(app_name), proxies, proxy_urls()


def wait_until_routed(app_name: str, route_prefix: str, health_path: str = "/healthz",
                      timeout: float = 90.0, snapshot: Callable | None = None) -> list[str]:
    """Block until every Serve proxy in rotation answers 200 on ``route_prefix + health_path``; returns
    their URLs.

    A Serve app is RUNNING before each proxy knows its route, and Serve starts a
    proxy on a node only once a replica lands there: so wait until every node that
    holds a replica has a healthy proxy, and every proxy (head's included) routes
    the app. A proxy DRAINING on a node that holds no replica of the app is leaving
    (Serve drains a node's proxy at least 30 s after its last replica went, e.g. an
    app deleted before this one was deployed; its health check already answers 503,
    so a load balancer has taken it out): it is neither waited for nor returned.
    ``snapshot(app_name)`` says where replicas and proxies are
    (:func:`driver_snapshot` by default; ``deploy.serve`` reads the same from the
    dashboard's REST API); it raises :class:`AppFailed` to stop waiting. Raises TimeoutError naming the proxies that did not.
    """
    import httpx

    snapshot = snapshot or driver_snapshot
    deadline, last = time.time() + timeout, "no proxy yet"
    while time.time() < deadline:
        try:
            replica_nodes, proxies, urls = snapshot(app_name)
            leaving = {n for n, s in proxies.items() if s == "DRAINING" and n not in replica_nodes}
            proxies = {n: s for n, s in proxies.items() if n not in leaving}
            urls = {key: base for key, base in urls.items() if _proxy_node(key) not in leaving}
            missing = replica_nodes - set(proxies)
            unhealthy = [n for n, s in proxies.items() if s != "HEALTHY"]
            if missing or unhealthy:
                last = f"{len(missing)} replica node(s) without a proxy, {len(unhealthy)} proxy(ies) not healthy"
            else:
                bad = []
                for base in urls.values():
                    try:
                        code = httpx.get(f"{base}{route_prefix}{health_path}", timeout=5).status_code
                    except httpx.HTTPError as e:
                        code = type(e).__name__
                    if code != 200:
                        bad.append(f"{base} -> {code}")
                if urls and not bad:
                    return list(urls.values())
                last = "; ".join(bad) or "no proxy URL"
        except AppFailed:
            raise
        except Exception as e:  # noqa: BLE001 - controller busy, state API starting: keep waiting until the deadline
            last = f"{type(e).__name__}: {first_line(e)}" if str(e).strip() else type(e).__name__
        time.sleep(0.25)
    raise TimeoutError(f"Serve app {app_name!r} not routed by every proxy within {timeout:.0f}s: {last}")


def _proxy_node(url_key: str) -> str:
    """The node id in a snapshot's URL key: ``<node id>`` (:func:`proxy_urls`) or ``proxy:<node id>``
    (``deploy.serve.client_urls`` on a local cluster); other keys (a group's one address) name no node."""
    return url_key.removeprefix("proxy:")


def deploy_app(app, name: str, route_prefix: str, health_path: str = "/healthz",
               timeout: float = 90.0) -> str:
    """Start Serve if needed, run ``app`` under ``name``/``route_prefix``, wait until every proxy
    routes it (:func:`wait_until_routed`); returns the app's base URL on the head's proxy."""
    from ray import serve

    base = start_serve()
    serve.run(app, name=name, route_prefix=route_prefix)
    wait_until_routed(name, route_prefix, health_path, timeout)
    return f"{base}{route_prefix}"


SERVE_METRICS_INTERVAL_S = 10.0  # Serve's default metrics_interval_s: how often replicas report their load


class Autoscaling(StrictModel):
    """A deployment's replica autoscaling (Ray Serve's ``autoscaling_config``): Serve keeps about
    ``target_ongoing_requests`` requests in flight per replica, between ``min_replicas`` and ``max_replicas``,
    after the load has stayed up for ``upscale_delay_s`` or down for ``downscale_delay_s`` (Serve's
    defaults: 30 s and 600 s). Replicas Serve adds ask the cluster for their ``num_cpus``/``num_gpus``:
    that pending demand is what makes an autoscaling worker group add nodes. ``metrics_interval_s`` (how
    often replicas report, Serve's default 10 s) and ``look_back_period_s`` (the window averaged, default
    30 s) are for short rehearsals; unset, Serve's defaults."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(ge=1)
    target_ongoing_requests: float = Field(2.0, gt=0)
    upscale_delay_s: float = Field(30.0, ge=0)
    downscale_delay_s: float = Field(600.0, ge=0)
    metrics_interval_s: float | None = Field(None, gt=0)
    look_back_period_s: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _bounds(self):
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) is above max_replicas ({self.max_replicas})")
        interval = self.metrics_interval_s or SERVE_METRICS_INTERVAL_S
        if self.look_back_period_s is not None and self.look_back_period_s <= interval:
            raise ValueError(f"look_back_period_s ({self.look_back_period_s:g}) must be above metrics_interval_s "
                             f"({interval:g}{'' if self.metrics_interval_s else ', Serve default'})")
        return self

    def serve_config(self) -> dict:
        """Ray Serve's ``autoscaling_config`` (the fields left unset keep Serve's defaults)."""
        return self.model_dump(exclude_none=True)


def check_replicas(num_replicas: int | None, autoscaling: Autoscaling | None, fixed: str, scaled: str) -> None:
    """A one-line ValueError when both a fixed replica count (config key ``fixed``) and autoscaling
    (key ``scaled``) are set: Serve takes one or the other."""
    if num_replicas is not None and autoscaling is not None:
        raise ValueError(f"set {fixed} (a fixed replica count) or {scaled} (autoscaling), not both")


def replica_options(num_replicas: int | None, autoscaling: Autoscaling | None) -> dict:
    """Serve deployment options: ``autoscaling_config`` when ``autoscaling`` is set, else ``num_replicas``
    (default 1)."""
    if autoscaling is not None:
        return {"autoscaling_config": autoscaling.serve_config()}
    return {"num_replicas": num_replicas or 1}


def percentiles(latencies_s: Sequence[float]) -> dict:
    """p50/p99/mean in milliseconds."""
    if not len(latencies_s):
        return {"p50_ms": None, "p99_ms": None, "mean_ms": None}
    arr = np.asarray(latencies_s) * 1000
    return {"p50_ms": float(np.percentile(arr, 50)), "p99_ms": float(np.percentile(arr, 99)),
            "mean_ms": float(arr.mean())}


async def _fire(client, method, url, body, lat, errors):
    t0 = time.perf_counter()
    try:
        r = await client.request(method, url, json=body)
        if r.status_code >= 400:  # a service answering 422/404 to good payloads is not healthy
            errors.append(r.status_code)
        else:
            lat.append(time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001 - connection reset while a replica dies, timeouts
        errors.append(type(e).__name__)


# an open-loop run that sent less than this share of its target rate measured the client, not the service
MIN_SEND_RATE = 0.95


async def _scheduled(client, method, url, body, due, lat, errors, sends, outcomes=None):
    """One open-loop request: its latency runs from ``due`` (its scheduled send time), not from when the
    client got round to sending it, so a client that falls behind cannot hide the wait (coordinated omission).
    ``outcomes`` (when given) gets ``(due, done, latency or None when it failed)``."""
    sends.append((due, time.perf_counter()))
    ok = []
    await _fire(client, method, url, body, ok, errors)
    done = time.perf_counter()
    if ok:
        lat.append(done - due)
    if outcomes is not None:
        outcomes.append((due, done, done - due if ok else None))


def send_stats(start: float, rps: float, sends: Sequence[tuple[float, float]]) -> dict:
    """The rate the requests were actually sent at, from ``(scheduled, sent)`` times: their number over the
    time from ``start`` to one interval after the last send (``rps`` exactly when every one left on time);
    ``valid`` is False below ``MIN_SEND_RATE`` of ``rps``; ``send_lag_max_ms`` is the longest a request waited behind its schedule."""
    if not sends:
        return {"target_rps": rps, "achieved_rps": 0.0, "valid": False, "send_lag_max_ms": None}
    achieved = len(sends) / (max(sent for _, sent in sends) - start + 1 / rps)
    return {"target_rps": rps, "achieved_rps": achieved, "valid": achieved >= MIN_SEND_RATE * rps,
            "send_lag_max_ms": max(sent - due for due, sent in sends) * 1000}


def load_test(url: str, payloads: Sequence | Callable[[int], object], rps: float, seconds: float,
              method: str = "POST", timeout: float = 10.0) -> dict:
    """Send ``rps * seconds`` requests at a fixed rate (open loop): p50/p99/mean latency of the answered
    ones, each counted from its scheduled send time; errors and error_rate; target_rps, achieved_rps (the
    rate requests were really sent at), send_lag_max_ms, and ``valid`` = achieved_rps >= 95% of the target
    (below it the client fell behind and the figures are not the service's)."""
    n = int(rps * seconds)
    lat, errors, sends = [], [], []
    start = asyncio.run(_send_at([i / rps for i in range(n)], url, payloads, method, timeout, lat, errors, sends))
    return {**percentiles(lat), "requests": n, "errors": len(errors), "error_rate": len(errors) / max(n, 1),
            **send_stats(start, rps, sends)}


async def _send_at(offsets: Iterable[float], url, payloads, method, timeout, lat, errors, sends,
                   outcomes=None) -> float:
    """Send request ``i`` at ``offsets[i]`` seconds after the start (open loop, see :func:`_scheduled`);
    ``offsets`` may be a generator (read as the requests go out). Returns the start (``time.perf_counter()``)."""
    import httpx

    tasks = []
    limits = httpx.Limits(max_connections=512, max_keepalive_connections=512)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        start = time.perf_counter()
        for i, offset in enumerate(offsets):
            due = start + offset
            # sleep(0) when late: the requests already due start now, not after the whole backlog is queued
            await asyncio.sleep(max(due - time.perf_counter(), 0))
            body = payloads(i) if callable(payloads) else payloads[i % len(payloads)]
            tasks.append(asyncio.create_task(
                _scheduled(client, method, url, body, due, lat, errors, sends, outcomes)))
        await asyncio.gather(*tasks)
    return start


def ramp_test(url: str, payloads: Sequence | Callable[[int], object], stages: Sequence[tuple[float, float]],
              window_s: float = 1.0, method: str = "POST", timeout: float = 10.0,
              hold: tuple[Callable[[], bool], float] | None = None) -> dict:
    """An open-loop load whose rate changes in ``stages`` of ``(req/s, seconds)``, reported per ``window_s``
    of the run: ``windows`` rows ``{t, target_rps, sent_rps, achieved_rps, errors, p50_ms, p99_ms}`` (``t``: the
    window's start in seconds from the run's start; requests belong to the window they were due in, except
    ``achieved_rps``: the answers that completed in it, per second) and ``total`` (:func:`load_test`'s
    figures over the whole run, less the send rate, plus ``error_kinds``: the failures by status code or
    exception name). ``started_at`` is the run's start (``time.time()``). ``hold=(done, max_s)`` keeps the
    last stage's rate after the stages until ``done()`` is true, at most ``max_s`` seconds more (``held_s``:
    how long it did), e.g. until an autoscaler under the load has acted."""
    rates, t = [], 0.0
    for rps, seconds in stages:
        if rps <= 0 or seconds <= 0:
            raise ValueError(f"ramp stage ({rps}, {seconds}): req/s and seconds must be > 0")
        rates.append((t, t + seconds, rps))
        t += seconds
    planned = sum(int(rps * (b - a)) for a, b, rps in rates)

    def offsets():
        for a, b, rps in rates:
            yield from (a + i / rps for i in range(int(rps * (b - a))))
        if hold and rates:
            done, max_s = hold
            rps = rates[-1][2]
            for i in range(int(rps * max_s)):
                if done():
                    return
                yield t + i / rps

    lat, errors, sends, outcomes = [], [], [], []
    started_at = time.time()
    start = asyncio.run(_send_at(offsets(), url, payloads, method, timeout, lat, errors, sends, outcomes))
    held_s = (len(sends) - planned) / rates[-1][2] if rates else 0.0  # the requests sent past the stages
    if held_s:
        a, _, rps = rates[-1]
        rates[-1], t = (a, t + held_s, rps), t + held_s
    windows = []
    end = max([t] + [done - start for _, done, _ in outcomes])  # the last answers may come after the last send
    for k in range(max(1, math.ceil(end / window_s))):
        lo, hi = k * window_s, (k + 1) * window_s
        due = [(d - start, latency) for d, _, latency in outcomes if lo <= d - start < hi]
        took = [latency for _, latency in due if latency is not None]
        answered = sum(1 for _, done, latency in outcomes if latency is not None and lo <= done - start < hi)
        windows.append({"t": lo, "target_rps": next((r for a, b, r in rates if a <= lo < b), 0.0),
                        "sent_rps": sum(1 for _, sent in sends if lo <= sent - start < hi) / window_s,
                        "achieved_rps": answered / window_s, "errors": len(due) - len(took),
                        **{k: v for k, v in percentiles(took).items() if k != "mean_ms"}})
    n = len(sends)
    return {"started_at": started_at, "windows": windows, "held_s": round(held_s, 2),
            "total": {**percentiles(lat), "requests": n, "errors": len(errors), "error_rate": len(errors) / max(n, 1),
                      "error_kinds": dict(Counter(str(e) for e in errors))}}


def max_rps(url: str, payloads: Sequence | Callable[[int], object], seconds: float = 5.0,
            concurrency: int = 32, method: str = "POST", timeout: float = 10.0) -> dict:
    """Closed-loop throughput: ``concurrency`` clients sending back to back for ``seconds``."""
    import httpx

    async def run():
        lat, errors, count = [], [], [0]
        deadline = time.perf_counter() + seconds

        async def worker(client):
            while time.perf_counter() < deadline:
                i = count[0]
                count[0] += 1
                body = payloads(i) if callable(payloads) else payloads[i % len(payloads)]
                await _fire(client, method, url, body, lat, errors)

        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
            t0 = time.perf_counter()
            await asyncio.gather(*(worker(client) for _ in range(concurrency)))
            return lat, errors, time.perf_counter() - t0

    lat, errors, wall = asyncio.run(run())
    return {"rps": len(lat) / wall, "errors": len(errors), **percentiles(lat)}
