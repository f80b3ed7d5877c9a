"""Rehearse Serve autoscaling driving worker autoscaling on a local cluster, and record it over time.

A template's app with ``serve.autoscaling`` runs on a local cluster started with ``deploy.local.up(...,
autoscale=True)`` (worker groups between min and max). :func:`rehearse` drives an open-loop load ramp at
the app (:func:`pipelines.serving.ramp_test`) while a :class:`Watcher` samples, through the dashboard's
REST API (no driver), the app's replicas (running, and the count Serve's autoscaler targets) and the
cluster's alive worker nodes; after the load it keeps sampling until both are back at their floor. Serve
adds replicas when requests in flight per replica exceed ``target_ongoing_requests``; a replica that no
worker has room for stays pending, and that logical demand is what makes Ray's autoscaler add a worker;
once the load is gone Serve removes replicas after ``downscale_delay_s`` and the autoscaler removes the
idle workers. :func:`write_figures` writes the series as JSON and a PNG (replicas and workers, rate,
p50/p99, errors against time); :func:`summarize` gives the figures to quote. :func:`rehearsal` does it
all for a template's trained run: cluster up, ``adbray serve``'s deploy with ``--set`` overrides, the ramp,
the figures, cluster down (tests/deploy/test_serve_autoscale.py, ``benchmarks/riskcontrol.py --autoscale``).
"""
from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from pipelines.serving import ramp_test


def replica_counts(st, app_name: str) -> dict:
    """``{running, target}`` replicas of ``app_name``'s deployments (summed) from the Serve REST API."""
    from .serve import details

    app = (details(st).get("applications") or {}).get(app_name) or {}
    deployments = (app.get("deployments") or {}).values()
    return {"running": sum(r.get("state") == "RUNNING" for d in deployments for r in d.get("replicas") or []),
            "target": sum(int(d.get("target_num_replicas") or 0) for d in deployments)}


def worker_count(state) -> int:
    """Alive worker nodes (the head excluded) of a local cluster."""
    from . import local

    return sum(1 for n in local.alive_nodes(state) if not n.get("is_head_node"))


class Watcher:
    """Samples ``{t, replicas, target_replicas, workers}`` every ``every_s`` in a thread (``t``: seconds since
    ``t0``, a ``time.time()``); a sample whose REST call failed (a busy dashboard) is skipped, not invented."""

    def __init__(self, state, st, app_name: str, every_s: float = 0.5):
        self.state, self.st, self.app_name, self.every_s = state, st, app_name, every_s
        self.samples: list[dict] = []
        self.t0 = time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="serve-autoscale-watcher")

    def start(self) -> Watcher:
        self._thread.start()
        return self

    def stop(self) -> list[dict]:
        self._stop.set()
        self._thread.join(timeout=30)
        return self.samples

    def sample(self) -> dict | None:
        try:
            counts, workers = replica_counts(self.st, self.app_name), worker_count(self.state)
        except Exception:  # noqa: BLE001 - a slow or restarting dashboard: no sample this round
            return None
        row = {"t": round(time.time() - self.t0, 2), "replicas": counts["running"],
               "target_replicas": counts["target"], "workers": workers}
        self.samples.append(row)
        return row

    def _run(self):
        while not self._stop.is_set():
            began = time.time()
            self.sample()
            self._stop.wait(max(0.0, self.every_s - (time.time() - began)))

    def wait_for(self, predicate, timeout: float) -> dict | None:
        """The first new sample (after now) for which ``predicate(sample)`` holds, or None after ``timeout``."""
        seen, deadline = len(self.samples), time.time() + timeout
        while time.time() < deadline:
            for row in self.samples[seen:]:
                if predicate(row):
                    return row
            seen = len(self.samples)
            time.sleep(self.every_s / 2)
        return None


def rehearse(state, st, app_name: str, url: str, payloads, stages, floor_replicas: int, floor_workers: int,
             every_s: float = 0.5, window_s: float = 1.0, settle_s: float = 90.0, timeout: float = 10.0,
             hold_until_replicas: int | None = None, hold_max_s: float = 60.0) -> dict:
    """Ramp ``stages`` (``(req/s, seconds)``) of open-loop load at ``url`` while sampling replicas and workers;
    after the load, keep sampling until replicas are back at ``floor_replicas`` and workers at
    ``floor_workers`` (at most ``settle_s``). With ``hold_until_replicas``, the last stage's rate goes on
    until that many replicas have run (at most ``hold_max_s`` more): how long a replica takes to come up on a
    worker the group adds for it varies with the machine, and a load that ends first shows nothing.
    Returns ``{samples, windows, total, started_at, load_s, held_s, settled_s}``: samples and load windows
    on one clock (seconds from the load's start, ``started_at``, a ``time.time()``); ``settled_s`` is when
    both were back (None if not within ``settle_s``)."""
    watcher = Watcher(state, st, app_name, every_s).start()
    hold = None
    if hold_until_replicas:
        hold = (lambda: any(s["replicas"] >= hold_until_replicas for s in watcher.samples), hold_max_s)
    try:
        load = ramp_test(url, payloads, stages, window_s=window_s, timeout=timeout, hold=hold)
        load_end = time.time()
        back = watcher.wait_for(lambda s: s["replicas"] <= floor_replicas and s["target_replicas"] <= floor_replicas
                                and s["workers"] <= floor_workers, settle_s)
    finally:
        samples = watcher.stop()
    shift = load["started_at"] - watcher.t0  # the samples' clock -> the load's
    samples = [{**s, "t": round(s["t"] - shift, 2)} for s in samples]
    return {"samples": samples, "windows": load["windows"], "total": load["total"],
            "started_at": load["started_at"], "load_s": round(load_end - load["started_at"], 2),
            "held_s": load["held_s"],
            "settled_s": round(back["t"] - shift, 2) if back else None}


def summarize(result: dict) -> dict:
    """The figures to quote: peak replicas and workers, when each first reached its peak, the achieved rate
    and latency at the busiest window, errors, and when both were back at their floor."""
    samples, windows = result["samples"], result["windows"]
    during = [s for s in samples if s["t"] >= 0]
    peak_r = max((s["replicas"] for s in during), default=0)
    peak_w = max((s["workers"] for s in during), default=0)
    busiest = max(windows, key=lambda w: w["achieved_rps"], default={})
    return {"replicas_start": samples[0]["replicas"] if samples else None, "replicas_peak": peak_r,
            "replicas_peak_at_s": next((s["t"] for s in during if s["replicas"] == peak_r), None),
            "workers_start": samples[0]["workers"] if samples else None, "workers_peak": peak_w,
            "workers_peak_at_s": next((s["t"] for s in during if s["workers"] == peak_w), None),
            "replicas_end": samples[-1]["replicas"] if samples else None,
            "workers_end": samples[-1]["workers"] if samples else None,
            "max_achieved_rps": busiest.get("achieved_rps"), "p50_ms": result["total"]["p50_ms"],
            "p99_ms": result["total"]["p99_ms"], "requests": result["total"]["requests"],
            "errors": result["total"]["errors"], "error_kinds": result["total"].get("error_kinds"),
            "load_s": result["load_s"], "held_s": result["held_s"], "settled_s": result["settled_s"]}


def write_figures(result: dict, out_dir: str | Path, title: str = "Serve autoscaling") -> dict:
    """``serve_autoscale.json`` (the series and :func:`summarize`) and ``serve_autoscale.png`` (replicas and
    workers; target, sent and achieved req/s; p50/p99; errors, against seconds from the load's start) in
    ``out_dir``; returns their paths."""
    from pipelines.report import plot_panels

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(result)
    data = out / "serve_autoscale.json"
    data.write_text(json.dumps({"summary": summary, **result}, indent=1))
    s, w = result["samples"], result["windows"]
    ts, tw = [r["t"] for r in s], [r["t"] for r in w]

    def col(rows, key):
        return [r[key] if r[key] is not None else float("nan") for r in rows]

    png = plot_panels(out / "serve_autoscale.png", [
        ("count", {"replicas (running)": (ts, col(s, "replicas")), "replicas (Serve's target)": (ts, col(s, "target_replicas")),
                   "worker nodes": (ts, col(s, "workers"))}),
        ("req/s", {"target": (tw, col(w, "target_rps")), "sent": (tw, col(w, "sent_rps")),
                   "achieved (answers)": (tw, col(w, "achieved_rps"))}),
        ("latency ms (from send time)", {"p50": (tw, col(w, "p50_ms")), "p99": (tw, col(w, "p99_ms"))}),
        ("errors", {"failed requests": (tw, col(w, "errors"))}),
    ], xlabel="seconds from the load's start", title=title, steps={"count"})
    return {"json": str(data), "png": png}


def rehearsal(template: str, run_dir: str, request_path: str, payloads, overrides: Sequence[str], stages,
              out_dir: str | Path, max_workers: int = 3, idle_s: float = 4.0, every_s: float = 0.5,
              settle_s: float = 90.0, cluster_env: dict | None = None, hold_until_replicas: int | None = None,
              log=print) -> dict:
    """The whole rehearsal on a cluster of its own: a local cluster whose one CPU group of 1-CPU (``small``)
    workers autoscales between 1 and ``max_workers`` (idle workers removed after ``idle_s``), ``template``'s
    app deployed from ``run_dir`` (a local folder: this cluster's nodes share the disk) as ``adbray serve``
    does, with ``overrides`` (``serve.autoscaling.*=...``); :func:`rehearse` with ``stages`` at the head's
    proxy + ``request_path``, floors = the replicas after the deploy and 1 worker; :func:`write_figures` into
    ``out_dir``; the cluster stopped. ``hold_until_replicas``: see :func:`rehearse`. ``cluster_env`` is set on the cluster's Ray processes (e.g. Serve's
    ``RAY_SERVE_PROXY_MIN_DRAINING_PERIOD_S``: a worker whose replicas left keeps its proxy draining that long,
    default 30 s, before it is idle). The cluster's workers run at nice 0 (``RAY_worker_niceness``, Ray's
    default 15): every node here shares the same cores, and at 15 the serving replica and proxies yield to
    any nice-0 process (an added node's raylet and agents starting, the load generator, other users), which
    on a group of separate machines they do not compete with. Returns :func:`summarize`'s figures plus
    ``figures`` (their paths)."""
    from pipelines.template import load_template

    from . import local
    from . import serve as deploy_serve
    from .jobs import resolve_target
    from .spec import ResourceGroupSpec

    spec = ResourceGroupSpec(name=f"serve-scale-{os.getpid()}", worker_groups=[
        {"name": "cpu", "type": "CPU", "spec": "small", "min_workers": 1, "max_workers": max_workers}])
    t0 = time.time()
    env = {"RAY_worker_niceness": "0", **(cluster_env or {})}
    state = local.up(spec, log=lambda *_: None, env=env, autoscale=True, storage=False, idle_s=idle_s)
    log(f"cluster {spec.name} up in {time.time() - t0:.0f}s (1..{max_workers} workers, idle {idle_s:g}s)")
    try:
        tpl = load_template(template)
        section = deploy_serve.serve_section(tpl, None, overrides)
        target = resolve_target(state.dashboard_url, token_file=state.token_path)
        st = deploy_serve.serve_target(target)
        runtime_env, _ = deploy_serve.runtime_env_for(tpl, None, overrides, target)
        runtime_env = deploy_serve.upload_runtime_env(st, runtime_env)
        run_dir = deploy_serve.check_run_dir(run_dir, shared_disk=True)
        t0 = time.time()
        deployed = deploy_serve.deploy(st, tpl, section, run_dir, runtime_env, timeout=180)
        head = next(n["node_id"] for n in local.alive_nodes(state) if n.get("is_head_node"))
        url = deployed["urls"][f"proxy:{head}"] + request_path
        floor = replica_counts(st, section.app_name)["running"]
        log(f"{template} app up in {time.time() - t0:.0f}s with {floor} replica(s); load {list(stages)} at {url}")
        result = rehearse(state, st, section.app_name, url, payloads, stages, floor, 1, every_s=every_s,
                          settle_s=settle_s, hold_until_replicas=hold_until_replicas)
    finally:
        local.down(state.name, log=lambda *_: None)
    figures = write_figures(result, out_dir, title=f"{template}: Serve autoscaling drives worker autoscaling")
    return {**summarize(result), "figures": figures}
