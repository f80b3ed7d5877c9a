"""Serve on the local cluster: each worker raylet's proxy has its own port, and a deployed app is
routed by every proxy when ``deploy_app`` returns (not only by whichever proxy answered first)."""
from __future__ import annotations

import httpx
import pytest

from pipelines.serving import SERVE_PORT_LABEL


def _hello(replicas: int, **options):
    """A Serve app answering "hello" with ``replicas`` small replicas (``options``: more deployment options)."""
    from ray import serve

    @serve.deployment(num_replicas=replicas, ray_actor_options={"num_cpus": 0.1}, **options)
    class Hello:
        async def __call__(self, request):
            return "hello"

    return Hello.bind()


@pytest.fixture
def hello_app(ray_connected):
    from ray import serve

    yield _hello(2)
    serve.delete("hello-test")


def test_worker_raylets_advertise_their_own_proxy_port(ray_connected):
    import ray

    workers = [n for n in ray.nodes() if n["Alive"] and (n.get("Labels") or {}).get("group") == "cpu"]
    ports = [(n.get("Labels") or {}).get(SERVE_PORT_LABEL) for n in workers]
    assert len(workers) == 2 and all(ports), ports
    assert len(set(ports)) == len(ports)


def test_deploy_app_returns_only_when_every_proxy_routes(hello_app):
    from pipelines.serving import _replica_nodes, deploy_app, proxy_urls

    url = deploy_app(hello_app, "hello-test", "/hello", health_path="")
    urls = proxy_urls()
    replica_nodes = _replica_nodes("hello-test")
    # the head's proxy plus one per node holding a replica (replicas need CPU: never on the head)
    assert replica_nodes and replica_nodes <= set(urls)
    assert len(set(urls.values())) == len(urls) >= 2, urls
    assert url.startswith(tuple(urls.values()))
    for base in urls.values():  # right away, no retry: every proxy already knows the route
        r = httpx.get(f"{base}/hello", timeout=10)
        assert r.status_code == 200 and r.text == "hello", (base, r.status_code, r.text[:200])


def test_a_proxy_draining_after_a_delete_is_neither_waited_for_nor_returned(ray_connected):
    """An app on both workers is deleted: Serve drains both workers' proxies (>= 30 s). The next app's one
    replica takes one worker back; deploy_app returns while the other proxy still drains, and every URL it
    would return routes the new app."""
    from ray import serve

    from pipelines.serving import _replica_nodes, deploy_app, driver_snapshot, wait_until_routed

    try:
        deploy_app(_hello(2, max_replicas_per_node=1), "hello-both", "/both", health_path="")
        assert len(_replica_nodes("hello-both")) == 2  # one per worker
        serve.delete("hello-both")
        deploy_app(_hello(1), "hello-one", "/one", health_path="")
        replica_nodes, proxies, urls = driver_snapshot("hello-one")
        draining = {n for n, status in proxies.items() if status == "DRAINING"}
        assert draining and not draining & replica_nodes, proxies  # still leaving when deploy_app returned
        bases = wait_until_routed("hello-one", "/one", "", timeout=10)
        assert not {urls[n] for n in draining} & set(bases) and len(bases) == len(urls) - len(draining)
        assert all(httpx.get(f"{base}/one", timeout=10).text == "hello" for base in bases)
    finally:
        for name in ("hello-both", "hello-one"):
            serve.delete(name)


def test_wait_until_routed_leaves_out_only_leaving_proxies(instant_server):
    """No Ray: a fake snapshot. A draining proxy on a node without a replica is skipped (its URL is dead);
    a draining proxy on a replica's node is waited for, until the timeout names it."""
    from pipelines.serving import wait_until_routed

    dead = "http://127.0.0.1:9"  # nothing listens on the discard port
    live = instant_server.rstrip("/")

    def snapshot(replicas, proxies, urls):
        return lambda app_name: (replicas, proxies, urls)

    leaving = snapshot({"a"}, {"a": "HEALTHY", "b": "DRAINING"}, {"proxy:a": live, "proxy:b": dead})
    assert wait_until_routed("x", "/x", "", timeout=5, snapshot=leaving) == [live]
    by_node = snapshot({"a"}, {"a": "HEALTHY", "b": "DRAINING"}, {"a": live, "b": dead})  # a driver's keys
    assert wait_until_routed("x", "/x", "", timeout=5, snapshot=by_node) == [live]
    coming_back = snapshot({"a", "b"}, {"a": "HEALTHY", "b": "DRAINING"}, {"a": live, "b": live})
    with pytest.raises(TimeoutError, match="1 proxy"):
        wait_until_routed("x", "/x", "", timeout=1, snapshot=coming_back)


# the open-loop load generator, against a local HTTP server that answers at once (no Ray)

@pytest.fixture(scope="module")
def instant_server():
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # else each answer waits ~40 ms for a delayed ACK

        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args):
            pass

    class Server(ThreadingHTTPServer):
        request_queue_size = 256  # a burst of late requests connects at once

    server = Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def test_latency_counts_from_the_scheduled_send_time(instant_server):
    """The client stalls for 0.5 s building request 5: the ~25 requests due meanwhile leave late, and their
    latency includes that wait (timing each from when it was sent shows the instant server's ~1 ms)."""
    import time as _time

    from pipelines.serving import load_test

    def payloads(i):
        if i == 5:
            _time.sleep(0.5)
        return {"i": i}

    result = load_test(instant_server, payloads, rps=50, seconds=1.5)
    assert result["requests"] == 75 and result["errors"] == 0, result
    # ~25 of the 75 waited 0..500 ms behind their schedule: ~85 ms on average over all 75
    assert result["p99_ms"] >= 400 and result["mean_ms"] >= 50, result
    assert result["send_lag_max_ms"] >= 400, result


def test_a_client_slower_than_the_target_rate_marks_the_run_invalid(instant_server):
    import time as _time

    from pipelines.serving import load_test

    def payloads(i):  # 40 ms to build each request: at most 25 of the 50 req/s asked for
        _time.sleep(0.04)
        return {"i": i}

    result = load_test(instant_server, payloads, rps=50, seconds=0.5)
    assert result["target_rps"] == 50 and result["achieved_rps"] < 27, result
    assert result["valid"] is False, result


def test_the_send_rate_threshold_is_95_percent():
    from pipelines.serving import send_stats

    rps, n = 100.0, 100
    on_time = [(i / rps, i / rps) for i in range(n)]
    assert send_stats(0.0, rps, on_time) == {"target_rps": rps, "achieved_rps": 100.0, "valid": True,
                                               "send_lag_max_ms": 0.0}
    for rate, valid in ((96.0, True), (94.0, False)):  # every send stretched to ``rate`` req/s
        sends = [(i / rps, (i + 1) / rate - 1 / rps) for i in range(n)]
        stats = send_stats(0.0, rps, sends)
        assert stats["achieved_rps"] == pytest.approx(rate) and stats["valid"] is valid, stats
    assert send_stats(0.0, rps, [])["valid"] is False
