"""Serve on the local cluster: each worker raylet's proxy has its own port, and a deployed app is
routed by every proxy when ``deploy_app`` returns (not only by whichever proxy answered first)."""
from __future__ import annotations

import httpx
import pytest

from pipelines.serving import SERVE_PORT_LABEL


@pytest.fixture
def hello_app(ray_connected):
    from ray import serve

    @serve.deployment(num_replicas=2, ray_actor_options={"num_cpus": 0.1})
    class Hello:
        async def __call__(self, request):
            return "hello"

    yield Hello.bind()
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
