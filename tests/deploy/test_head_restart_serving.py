"""Online scoring through head restarts: riskcontrol's Serve app (Redis feature store, the HA default) on one
HIGH_AVAILABILITY local cluster, shared by the two slow tests below in this order (one cluster start and one
deployment instead of two): the worker's proxy answers while the head is down, then what a client sees at
50 req/s through a worker's proxy (and 5 through the head's) while `adbray cluster restart-head` stops and
restarts the head. (A detached actor through a restart: test_ha.py; a lost job resubmitted: test_resubmit.py.)"""
from __future__ import annotations

import asyncio
import itertools
import json
import os
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest

from deploy import local
from deploy.spec import ResourceGroupSpec
from tests.conftest import require_service

ROOT = Path(__file__).resolve().parents[2]
REDIS_URL = "redis://127.0.0.1:6379/0"

WORKER_RPS, HEAD_RPS = 50.0, 5.0
TIMEOUT_S = 10.0  # a client's timeout per request; a request past it is an error
AFTER_S = 10.0  # load kept on after the head is back, every request of which must succeed
# The worker's proxy answers every request through the restart since its cluster (HIGH_AVAILABILITY) sends
# Serve's requests to replicas over gRPC (deploy.local.HA_SERVE_ENV). With Ray's default actor-call path it
# lost 1,740-2,900 of ~3,000 requests here, for 35-65 s (docs/deploy.md, Head restart).
# Serve's router probes a replica whose queue looks full with a Ray actor call, and those stall after a head
# restart (1-6 s, and its retries longer): a queue that cannot fill in the stall at these rates is never probed
HA_MAX_ONGOING = 1024
CARD = 424242  # a card scored only before and after the restart: its history lives in the feature store
T0 = datetime(2026, 1, 5, 9, 0, tzinfo=timezone.utc)


def transaction(i: int, card_id: int | None = None) -> dict:
    return {"transaction_id": 9_000_000 + i, "event_time": (T0 + timedelta(seconds=i)).isoformat(),
            "card_id": 1_000_000 + i % 500 if card_id is None else card_id, "merchant_id": 70 + i % 40,
            "amount": 10.0 + i % 90, "currency": "USD", "merchant_category": "grocery", "channel": "pos",
            "device_id": f"d-{i % 500}", "lat": 30.2, "lon": 120.1}


class OpenLoop:
    """Open-loop POSTs at fixed rates to several URLs from one background thread (asyncio). Every request
    is recorded: target, scheduled send time, finish time, HTTP status or the exception's name (timeouts
    included); times are ``time.monotonic()``."""

    def __init__(self, targets: dict[str, tuple[str, float]], timeout: float = TIMEOUT_S):
        self.targets, self.timeout = targets, timeout
        self.records: list[dict] = []
        self.count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _one(self, client, name, url, due):
        self.count += 1
        body, sent = transaction(self.count), time.monotonic()
        try:
            status = (await client.post(url, json=body)).status_code
        except httpx.HTTPError as e:
            status = type(e).__name__
        self.records.append({"target": name, "due": due, "sent": sent, "done": time.monotonic(), "status": status})

    async def _stream(self, client, name, url, rps, tasks):
        start, i = time.monotonic(), 0
        while not self._stop.is_set():
            due = start + i / rps
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            tasks.append(asyncio.create_task(self._one(client, name, url, due)))
            i += 1

    async def _run(self):
        limits = httpx.Limits(max_connections=512, max_keepalive_connections=64)
        async with httpx.AsyncClient(timeout=self.timeout, limits=limits) as client:
            tasks: list = []
            await asyncio.gather(*(self._stream(client, name, url, rps, tasks)
                                   for name, (url, rps) in self.targets.items()))
            await asyncio.gather(*tasks)

    def start(self) -> OpenLoop:
        self._thread.start()
        return self

    def stop(self) -> list[dict]:
        self._stop.set()
        self._thread.join(timeout=self.timeout + 30)
        return sorted(self.records, key=lambda r: r["due"])


def timeline(records: list[dict], since: float, step: float = 2.0) -> list[str]:
    """Per ``step`` seconds from ``since`` (by scheduled send time): 'ok/sent' of each target, and the
    longest a request left behind its schedule (a client that fell behind measures itself)."""
    rows: dict[int, dict] = {}
    for r in records:
        row = rows.setdefault(int((r["due"] - since) // step), {"lag": 0.0})
        ok, n = row.get(r["target"], (0, 0))
        row[r["target"]] = (ok + (r["status"] == 200), n + 1)
        row["lag"] = max(row["lag"], r["sent"] - r["due"])
    return [f"{k * step:+6.0f}s " + " ".join(f"{t} {ok}/{n}" for t, (ok, n) in sorted(
        (t, v) for t, v in row.items() if t != "lag")) + f" lag {row['lag']:.1f}s" for k, row in sorted(rows.items())]


def outage(records: list[dict], since: float) -> dict:
    """What one proxy's client saw from ``since`` on: requests, errors (with their kinds), the longest
    time without a successful answer (between successive good answers, from ``since``), the slowest
    answer, and when it answered again after its last error (0 when it never failed)."""
    mine = [r for r in records if r["due"] >= since]
    good = sorted(r["done"] for r in mine if r["status"] == 200)
    bad = [r for r in mine if r["status"] != 200]
    marks = [since, *good]
    gap = max((b - a for a, b in itertools.pairwise(marks)), default=None)
    last_bad = max((r["due"] for r in bad), default=None)
    back = min((r["done"] for r in mine if r["status"] == 200 and r["due"] > last_bad), default=None) \
        if last_bad is not None else since
    kinds: dict[str, int] = {}
    for r in bad:
        kinds[str(r["status"])] = kinds.get(str(r["status"]), 0) + 1
    return {"requests": len(mine), "errors": len(bad), "error_kinds": kinds,
            "longest_gap_s": round(gap, 2) if gap is not None else None,
            "slowest_s": round(max((r["done"] - r["due"] for r in mine), default=0), 2),
            "answers_again_s": round(back - since, 2) if back is not None else None}


@pytest.fixture(scope="module")
def ha():
    """The HIGH_AVAILABILITY cluster of this module: a 0-CPU head and one m.xlarge worker, one shared disk.
    (Not shared with test_ha/test_resubmit: a job lost with the head leaves its actors holding the worker's
    CPUs in Ray 2.60, which would starve this app's replica.)"""
    require_service("Redis", "127.0.0.1", 6379)  # the GCS state
    spec = ResourceGroupSpec(name=f"ha-{os.getpid()}", category="HIGH_AVAILABILITY",
                             worker_groups=[{"name": "cpu", "type": "CPU", "spec": "m.xlarge",
                                             "min_workers": 1, "max_workers": 1}])
    state = local.up(spec, disks="shared", storage=False, log=lambda *_: None)
    try:
        yield state
    finally:
        local.down(state.name, log=lambda *_: None)


@pytest.fixture(scope="module")
def served(ha, tmp_path_factory):
    """riskcontrol's app on ``ha`` (default serve section, store: auto -> Redis, a feature-store prefix of its
    own): ``{"head": URL of the head's proxy, "worker": URL of the proxy of the worker holding the replica}``."""
    from riskcontrol.serve import RedisStore
    from tests.deploy.test_serve_command import adbray, tiny_run

    prefix = f"riskcontrol-{ha.name}"
    run_dir = str(tmp_path_factory.mktemp("served") / "run")
    tiny_run(run_dir)
    served = adbray({**ha.auth_env(), "RAY_ADDRESS": None}, "serve", "riskcontrol", "--address", ha.dashboard_url,
                    "--run-dir", run_dir, "--set", f"serve.redis_prefix={prefix}", "--set",
                    f"serve.max_ongoing_requests={HA_MAX_ONGOING}", "--json")
    assert served.returncode == 0, served.output[-3000:]
    urls = json.loads(served.stdout.strip().splitlines()[-1])["urls"]
    head = next(n["node_id"] for n in local.alive_nodes(ha) if n.get("is_head_node"))
    head_url = urls.pop(f"proxy:{head}")
    (worker_url,) = urls.values()  # the worker holding the replica has a proxy of its own
    health = httpx.get(f"{worker_url}/healthz", timeout=30).json()
    assert health["store"] == "redis", health  # the HA default: state outside the replica
    try:
        yield {"head": head_url, "worker": worker_url}
    finally:
        RedisStore(REDIS_URL, prefix).clear()


def app_answers(urls: list[str], within: float = 90.0) -> tuple[list, float | None]:
    """Poll every URL's /healthz until all answer 200 or ``within`` s pass: (last codes, when the first URL
    first answered 200, ``time.monotonic()``)."""
    deadline, codes, first_back = time.monotonic() + within, [], None
    while time.monotonic() < deadline and codes != [200] * len(urls):
        codes = []
        for base in urls:
            try:
                codes.append(httpx.get(f"{base}/healthz", timeout=5).status_code)
            except httpx.HTTPError as e:
                codes.append(type(e).__name__)
        if codes[0] == 200 and first_back is None:
            first_back = time.monotonic()
        time.sleep(0.25)
    return codes, first_back


@pytest.mark.slow
def test_a_worker_proxy_answers_while_the_head_is_down(ha, served):
    """The head's processes killed and not started for DOWN_S: the worker's proxy and replica, which need
    nothing of the head to score, answer every request at 50 req/s (so did they over Ray's actor-call path,
    which looks the proxy up in the GCS for every request body: the GCS being down was never what failed;
    the head's start was, see the next test). The head is then started again (same ports, GCS state from
    Redis) for the next test."""
    down_s = 25.0
    load = OpenLoop({"worker": (f"{served['worker']}/score", WORKER_RPS)}).start()
    try:
        time.sleep(5)
        began = time.monotonic()
        killed = local.head_processes(ha)
        assert killed
        local.kill_processes(killed, grace=3)
        time.sleep(down_s)
        records, load = load.stop(), None
    finally:
        if load is not None:
            load.stop()
        if not local.head_processes(ha):  # within the worker raylet's ~60 s patience for its GCS
            local.start_head(ha)
    seen = outage(records, began)
    print("\nhead down, not restarted:", json.dumps(seen), "\n" + "\n".join(timeline(records, began)))
    codes, _ = app_answers([served["head"], served["worker"]], within=120)
    assert codes == [200, 200], f"the app does not answer through every proxy after the head started again: {codes}"
    assert seen["requests"] >= 0.9 * WORKER_RPS * down_s, seen  # the load really ran
    assert seen["errors"] == 0, seen


@pytest.mark.slow
def test_online_scoring_through_a_head_restart(ha, served):
    """riskcontrol's app takes 50 req/s through a worker's proxy (and 5 through the head's) while `adbray
    cluster restart-head` stops and restarts the head: the app, its replica and its feature store survive;
    what a client saw is measured and printed (-s)."""
    head_url, worker_url = served["head"], served["worker"]
    for i in range(3):  # CARD's history before the restart
        assert httpx.post(f"{worker_url}/score", json=transaction(i, CARD), timeout=30).status_code == 200
    load = OpenLoop({"worker": (f"{worker_url}/score", WORKER_RPS), "head": (f"{head_url}/score", HEAD_RPS)})
    load.start()
    try:
        time.sleep(5)
        began = time.monotonic()
        restarted = subprocess.run([str(Path(sys.executable).with_name("adbray")), "cluster", "restart-head", "--name",
                                    ha.name, "--json"], cwd=ROOT, capture_output=True, text=True, timeout=240,
                                   check=False)
        assert restarted.returncode == 0, restarted.stderr[-3000:]
        took = json.loads(restarted.stdout.strip().splitlines()[-1])
        # the head is back: the cluster is whole (restart-head returned) and every proxy routes the app
        codes, head_back = app_answers([head_url, worker_url])
        back = time.monotonic() if codes == [200, 200] else None
        assert codes[0] == 200, f"the head's proxy does not route the app 90 s after the restart: {codes}"
        time.sleep(AFTER_S)
        records, load = load.stop(), None
    finally:
        if load is not None:  # a check failed under load: stop sending to a cluster about to go down
            load.stop()

    # through the head's proxy (the same replica and store): the feature store kept CARD's history
    reply = httpx.post(f"{head_url}/score?features=true", json=transaction(3, CARD), timeout=30).json()
    assert reply["features"]["card_history_count"] == 3, reply

    seen = {t: outage([r for r in records if r["target"] == t], began) for t in ("worker", "head")}
    after = [r for r in records if back is not None and r["due"] >= back]
    figures = {"restart": took, "app_back_through_every_proxy_s": round(back - began, 2) if back else None,
               "worker_proxy": seen["worker"], "head_proxy": seen["head"],
               "sent_after_back": len(after), "failed_after_back": sum(r["status"] != 200 for r in after),
               "client_max_lag_s": round(max((r["sent"] - r["due"] for r in records), default=0), 2)}
    print("\nhead restart under load:", json.dumps(figures, indent=1))
    print("\n".join(timeline(records, began)))
    # the head's proxy is down with the head; once it answers again, it answers every request
    head_after = [r for r in records if r["target"] == "head" and r["due"] >= head_back + 1.0]
    assert head_after and all(r["status"] == 200 for r in head_after), figures
    assert back is not None, f"the worker's proxy does not route the app 90 s after the restart: {codes}"
    assert len(after) >= 0.9 * (WORKER_RPS + HEAD_RPS) * AFTER_S, figures  # the load really ran
    # the worker's proxy and replica keep answering: over Ray's actor-call path ~70% of its requests failed for
    # 35-65 s (and half of those sent after the head was back); over gRPC none in 3 of 3 runs on 2026-12-05's
    # first machine, but on its second 0-16% for up to ~30 s, some after the head was back: Serve's router
    # still probes a replica's queue length with a Ray actor call, which stalls after a head restart (Ray 2.60,
    # docs/deploy.md). The collapse of the actor-call path fails here; the probe stall is an xfail.
    assert seen["worker"]["errors"] <= 0.25 * seen["worker"]["requests"], figures
    if seen["worker"]["errors"] or figures["failed_after_back"]:
        pytest.xfail(f"Ray 2.60: {seen['worker']['errors']} of {seen['worker']['requests']} requests through the "
                     f"worker's proxy failed during the restart, {figures['failed_after_back']} after the head was "
                     "back (Serve's queue-length probes are actor calls)")
