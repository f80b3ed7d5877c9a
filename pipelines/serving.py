"""Ray Serve helpers shared by the online templates, and an HTTP load generator.

``start_serve()`` starts Serve's HTTP proxy on 127.0.0.1 and a free port (never
the default 8000, which may be taken) unless Serve already runs, and returns the
base URL. ``load_test`` drives a fixed request rate (open loop) and reports
latency percentiles and the error rate; ``max_rps`` measures throughput.
"""
from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable, Sequence

import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_serve(host: str = "127.0.0.1", port: int | None = None) -> str:
    """Start Serve (if not running) on ``host:port`` and return ``http://host:port``."""
    from ray import serve

    try:
        from ray.serve.context import _get_global_client

        client = _get_global_client(raise_if_no_controller_running=False)
    except Exception:  # pragma: no cover - private API moved
        client = None
    if client is None:
        port = port or int(os.environ.get("ADBRAY_SERVE_PORT", "0")) or free_port()
        serve.start(http_options={"host": host, "port": port})
    return serve_base_url()


def serve_base_url() -> str:
    """The HTTP proxy's base URL of the running Serve instance."""
    from ray import serve

    opts = serve.status().proxies  # noqa: F841  (forces a controller round trip)
    from ray.serve.context import _get_global_client

    cfg = _get_global_client().http_config
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "") else cfg.host
    return f"http://{host}:{cfg.port}"


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
    except Exception as e:  # connection reset while a replica dies, timeouts
        errors.append(type(e).__name__)


def load_test(url: str, payloads: Sequence | Callable[[int], object], rps: float, seconds: float,
              method: str = "POST", timeout: float = 10.0) -> dict:
    """Send requests at a fixed rate (open loop) for ``seconds``; latency stats and error rate."""
    import httpx

    async def run():
        lat, errors, tasks = [], [], []
        limits = httpx.Limits(max_connections=512, max_keepalive_connections=512)
        async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
            n = int(rps * seconds)
            start = time.perf_counter()
            for i in range(n):
                delay = start + i / rps - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                body = payloads(i) if callable(payloads) else payloads[i % len(payloads)]
                tasks.append(asyncio.create_task(_fire(client, method, url, body, lat, errors)))
            await asyncio.gather(*tasks)
            wall = time.perf_counter() - start
        return lat, errors, n, wall

    lat, errors, n, wall = asyncio.run(run())
    return {**percentiles(lat), "requests": n, "errors": len(errors),
            "error_rate": len(errors) / max(n, 1), "achieved_rps": n / wall}


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
