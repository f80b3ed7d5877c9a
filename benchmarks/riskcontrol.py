"""riskcontrol: Ray vs bare baselines for training, batch scoring and online scoring, in one run.

(a) training on ``--rows`` generated transactions (default 2M): LightGBMTrainer with 2 workers
    vs in-process LightGBM on the same features (wall time, AUPRC on the later slice);
(b) batch scoring rows/s: Ray Data actors over the features Parquet vs a bare pyarrow+lightgbm loop;
(c) online: p50/p99 at a fixed 100 req/s (latency from each request's scheduled send time; the run is
    invalid when the client sent under 95% of that rate) and max req/s, Ray Serve (FastAPI + @serve.batch +
    in-process feature store) vs a bare FastAPI+uvicorn process serving the same model and features; the
    same Serve app with the Redis feature store is reported beside it (online_redis_*) when Redis answers.

Everything Ray runs on a local 2-worker cluster started with ``deploy.local.up`` and Serve's fast
settings (``FAST_SERVE_ENV``); ``--serve-default`` also measures Serve's default mode (stderr only).

``--autoscale`` instead runs only the Serve autoscaling rehearsal (``deploy.serve_autoscale.rehearsal``:
a small model, the app with ``serve.autoscaling`` 1..3 replicas of 1 CPU and the Redis store on a cluster
whose 1-CPU workers autoscale 1..3, the load ramp ``AUTOSCALE_STAGES``) and records ``autoscale_*``
(peak replicas/workers and when, the busiest window's achieved req/s, p50/p99, errors, when both were back
at 1); the series (JSON) and the plot (PNG) go to ``--autoscale-out`` (default: a new temp folder).

    python benchmarks/riskcontrol.py [--rows 2000000] [--serve-default]
    python benchmarks/riskcontrol.py --autoscale [--autoscale-out DIR]

Prints one JSON line last: rows, train_wall_ratio, auprc_ray, auprc_inprocess, auprc_gap, batch_rows_per_s,
batch_ratio, online_p50_ms, online_p99_ms, online_max_rps, online_rps_ratio, online_target_rps,
online_achieved_rps, online_valid, online_redis_p50_ms, online_redis_p99_ms, online_redis_valid (+ machine,
commit, load), and appends it to benchmarks/results/riskcontrol.jsonl.
"""

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipelines.bench import emit, guard, log, timer
from pipelines.config import FAST_SERVE_ENV
from riskcontrol.config import RiskConfig, ServeConfig


def make_features(cfg: RiskConfig, out: str) -> str:
    from riskcontrol.data import read_transactions, write_transactions
    from riskcontrol.features import run_features

    data, rows = write_transactions(cfg.data, out)
    res = run_features(read_transactions(data["transactions"]), out, cfg.features)
    log(f"{rows} transactions -> {res['rows']} feature rows")
    return res["outputs"]["features"]


def bench_training(cfg: RiskConfig, features: str, out: str) -> dict:
    from riskcontrol.evaluate import evaluate, test_slice
    from riskcontrol.train import run_training

    test = test_slice(features, cfg.train)
    with timer() as t_ray:
        ray_meta = run_training(cfg, features, out, num_workers=2, name="model")
    with timer() as t_local:
        local_meta = run_training(cfg, features, out, num_workers=0, name="model_inprocess")
    report = evaluate(f"{out}/model", test, cfg.eval, out, {"inprocess": f"{out}/model_inprocess"})
    log(f"train: ray {t_ray():.1f}s (worker 0: read {ray_meta['read_s']}s, LightGBM {ray_meta['fit_s']}s, "
        f"{ray_meta['best_iteration']} trees), in-process {t_local():.1f}s (read {local_meta['read_s']}s, "
        f"LightGBM {local_meta['fit_s']}s, {local_meta['best_iteration']} trees)")
    ray_auprc, local_auprc = report["model"]["auprc"], report["inprocess"]["auprc"]
    return {"train_wall_ratio": t_ray() / t_local(), "auprc_ray": ray_auprc, "auprc_inprocess": local_auprc,
            "auprc_gap": abs(ray_auprc - local_auprc),
            "train_seconds": {"ray": round(t_ray(), 1), "ray_worker0_read": ray_meta["read_s"],
                              "ray_worker0_lightgbm": ray_meta["fit_s"], "inprocess": round(t_local(), 1),
                              "inprocess_read": local_meta["read_s"], "inprocess_lightgbm": local_meta["fit_s"]},
            "trees": {"ray": ray_meta["best_iteration"], "inprocess": local_meta["best_iteration"]}}


def bare_batch(features: str, model_dir: str, out: str) -> float:
    """Rows/s of a plain pyarrow + lightgbm loop: read batches, predict + contributions, write Parquet."""
    import pyarrow as pa
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    from riskcontrol.score import Scorer

    scorer = Scorer(model_dir)
    rows = 0
    with timer() as t:
        writer = None
        for batch in pads.dataset(features, format="parquet").to_batches(batch_size=4096):
            table = scorer(pa.Table.from_batches([batch]))
            writer = writer or pq.ParquetWriter(f"{out}/bare_scores.parquet", table.schema)
            writer.write_table(table)
            rows += batch.num_rows
        writer.close()
    return rows / t()


def ray_batch(features: str, model_dir: str, out: str, cfg: RiskConfig) -> float:
    """Rows/s of the template's scoring (``score_dataset``: its actor pool) over the same Parquet
    (read -> score -> write), actor start included."""
    import pyarrow.dataset as pads

    from pipelines.io import read_parquet, write_dataset
    from riskcontrol.score import score_dataset

    with timer() as t:
        write_dataset(score_dataset(read_parquet(features), model_dir, cfg.score), f"{out}/ray_scores")
    return pads.dataset(f"{out}/ray_scores", format="parquet").count_rows() / t()


def replay_payloads(features: str, n: int) -> list[dict]:
    import pyarrow.dataset as pads

    from riskcontrol.serve import transaction_payload

    frame = pads.dataset(features, format="parquet").head(n).to_pandas()
    return [transaction_payload(r) for r in frame.to_dict("records")]


def measure_online(url: str, payloads: list, seconds: float) -> dict:
    from pipelines.serving import load_test, max_rps

    load_test(f"{url}/score", payloads, rps=100, seconds=2)  # warm-up
    fixed = load_test(f"{url}/score", payloads, rps=100, seconds=seconds)
    peak = max_rps(f"{url}/score", payloads, seconds=seconds, concurrency=32)
    if not fixed["valid"]:
        log(f"online run INVALID: sent {fixed['achieved_rps']:.1f} of {fixed['target_rps']} req/s (< 95%)")
    return {"p50_ms": fixed["p50_ms"], "p99_ms": fixed["p99_ms"], "errors": fixed["errors"] + peak["errors"],
            "max_rps": peak["rps"], "target_rps": fixed["target_rps"], "achieved_rps": fixed["achieved_rps"],
            "valid": fixed["valid"]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bare_online(model_dir: str, payloads: list, seconds: float) -> dict:
    """The same model and feature store behind a bare FastAPI + uvicorn process (1 worker)."""
    import httpx

    port = _free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--bare-server", str(port), "--model", model_dir],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}/riskcontrol"
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        return measure_online(url, payloads, seconds)
    finally:
        proc.terminate()
        proc.wait(10)


def bare_app(model_dir: str):
    """FastAPI app: same request model, feature store and scorer as the Serve app, no Ray."""
    import numpy as np
    from fastapi import FastAPI

    from riskcontrol.features import to_epoch
    from riskcontrol.score import Scorer
    from riskcontrol.serve import MemoryStore, Transaction, score_online

    scorer, store, app = Scorer(model_dir), MemoryStore(), FastAPI()

    @app.get("/riskcontrol/healthz")
    def healthz():
        return {"status": "ok"}

    @app.post("/riskcontrol/score")
    def score(body: Transaction):
        start = time.perf_counter()
        txn = body.model_dump()
        txn["ts"] = to_epoch(body.event_time)
        feats = score_online(store, txn)
        s = scorer.score_matrix(np.array([[feats[n] for n in scorer.features]], dtype=np.float64))
        return {"transaction_id": body.transaction_id, "probability": float(s["probability"][0]),
                "risk_tier": str(s["risk_tier"][0]), "reasons": s["reasons"][0],
                "model_version": scorer.meta["version"], "latency_ms": (time.perf_counter() - start) * 1000}

    return app


def serve_online(model_dir: str, payloads: list, seconds: float, cfg: ServeConfig | None = None) -> dict:
    from ray import serve

    from riskcontrol.serve import deploy

    cfg = cfg or ServeConfig()
    url = deploy(cfg, model_dir)
    try:
        return measure_online(url, payloads, seconds)
    finally:
        serve.delete(cfg.app_name)


def redis_online(model_dir: str, payloads: list, seconds: float) -> dict | None:
    """The same Serve app with the Redis feature store (a fresh key prefix), or None when Redis does not answer."""
    import redis

    from riskcontrol.serve import RedisStore

    cfg = ServeConfig(store="redis", redis_prefix=f"riskcontrol-bench-{os.getpid()}")
    try:
        redis.Redis.from_url(cfg.redis_url, socket_timeout=2, socket_connect_timeout=2).ping()
    except redis.RedisError as e:  # no Redis here: the memory-store figures stand alone
        log(f"online (redis store): not measured, {cfg.redis_url} does not answer ({type(e).__name__})")
        return None
    try:
        return serve_online(model_dir, payloads, seconds, cfg)
    finally:
        RedisStore(cfg.redis_url, cfg.redis_prefix).clear()


# the Serve autoscaling rehearsal: Serve's own defaults but shorter delays and metric windows (a rehearsal
# of minutes, not hours), the group's idle timeout and Serve's proxy draining (30 s) left as they are. The
# rates stay below what one replica serves on 2 cores: the low target, not an overload, asks for replicas
# (at 80 req/s three raylets and replicas on a loaded 2-core machine answered after 50 s)
AUTOSCALE_STAGES = [(10, 5), (30, 25), (60, 30)]
AUTOSCALING = {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 0.4, "upscale_delay_s": 3,
               "downscale_delay_s": 10, "metrics_interval_s": 1, "look_back_period_s": 5}


def autoscale_rehearsal(out: str, figures: str) -> dict:
    """The Serve autoscaling rehearsal on its own cluster (see the module docstring); ``autoscale_*`` figures."""
    import pyarrow as pa
    import redis

    from deploy.local import AUTOSCALE_IDLE_S
    from deploy.serve_autoscale import rehearsal
    from pipelines.io import write_table
    from riskcontrol.data import generate_shard
    from riskcontrol.features import features_frame, invalid_reasons
    from riskcontrol.serve import RedisStore, transaction_payload
    from riskcontrol.train import run_training

    serve = ServeConfig(store="redis", redis_prefix=f"riskcontrol-autoscale-bench-{os.getpid()}")
    try:  # replicas share the feature store: Redis
        redis.Redis.from_url(serve.redis_url, socket_timeout=2, socket_connect_timeout=2).ping()
    except redis.RedisError as e:
        raise SystemExit(f"autoscale rehearsal: Redis at {serve.redis_url} does not answer ({type(e).__name__})") from None
    cfg = RiskConfig(data={"rows": 20_000, "cards": 2000, "merchants": 300, "days": 10, "shards": 1})
    frame = generate_shard(cfg.data, 0)
    write_table(pa.Table.from_pandas(features_frame(frame), preserve_index=False), f"{out}/features")
    run_training(cfg, f"{out}/features", out, num_workers=0)  # -> out/model, what the app serves
    valid = frame[invalid_reasons(frame) == ""].sort_values("event_time")
    payloads = [transaction_payload(r) for r in valid.to_dict("records")]
    overrides = ["serve.store=redis", f"serve.redis_url={serve.redis_url}", f"serve.redis_prefix={serve.redis_prefix}",
                 "serve.num_cpus=1", *(f"serve.autoscaling.{k}={v}" for k, v in AUTOSCALING.items())]
    try:
        got = rehearsal("riskcontrol", out, "/score", payloads, overrides, AUTOSCALE_STAGES, figures, max_workers=3,
                        idle_s=AUTOSCALE_IDLE_S, settle_s=180, log=log)
    finally:
        RedisStore(serve.redis_url, serve.redis_prefix).clear()
    log(f"autoscale figures: {got['figures']['png']} and {got['figures']['json']}")
    return {f"autoscale_{k}": v for k, v in got.items()} | {"autoscale_stages": AUTOSCALE_STAGES,
                                                           "autoscale_config": AUTOSCALING}


def start_cluster(env: dict):
    from deploy import local
    from deploy.spec import load_spec

    spec = load_spec(str(ROOT / "deploy" / "demo_cluster.yaml"), name=f"rc-bench-{os.getpid()}")
    # shared disks: the bare baselines read the same local files (the benchmark measures compute, not storage)
    return local.up(spec, log=lambda *_: None, env=env, disks="shared", storage=False)


def attach(state) -> None:
    import ray

    from pipelines.connect import use_token

    use_token(token_path=state.token_path)
    os.environ["ADBRAY_DISKS"] = state.disks  # a client of a local cluster, as `adbray cluster env` marks it
    ray.init(address=state.gcs_address, log_to_driver=False)


def online_in_subprocess(mode: str, model_dir: str, features: str, seconds: float) -> dict:
    """Serve measured on a fresh local cluster of its own (Serve's mode is fixed per cluster)."""
    import json

    proc = subprocess.run([sys.executable, __file__, "--serve-mode", mode, "--model", model_dir,
                           "--features", features, "--online-seconds", str(seconds)],
                          check=False, cwd=ROOT, stdout=subprocess.PIPE, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"online ({mode}) failed with exit code {proc.returncode} (see stderr above)")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def serve_mode_main(mode: str, model_dir: str, features: str, seconds: float) -> None:
    """Child process: start a cluster with (fast) or without (default) the fast Serve env and measure."""
    import json

    from deploy import local

    state = start_cluster(FAST_SERVE_ENV if mode == "fast" else {})
    try:
        attach(state)
        os.environ["RAY_ADDRESS"] = state.gcs_address  # Serve's routing check lists actors: this cluster's
        payloads = replay_payloads(features, 5000)
        result = serve_online(model_dir, payloads, seconds)
        if mode == "fast":
            result["redis"] = redis_online(model_dir, payloads, seconds)
    finally:
        import ray

        ray.shutdown()  # before the cluster goes: a driver left attached waits 60 s and hides the traceback
        local.down(state.name, log=lambda *_: None)
    print(json.dumps(result), flush=True)


@click.command()
@click.option("--rows", default=2_000_000, help="Generated transactions for the training benchmark.")
@click.option("--online-seconds", default=10.0, help="Seconds per online measurement.")
@click.option("--serve-default", is_flag=True, help="Also measure Serve's default mode (stderr).")
@click.option("--online/--no-online", default=True, show_default=True,
              help="Measure online scoring (--no-online: training and batch only, e.g. a size sweep).")
@click.option("--bare-server", type=int, default=None, hidden=True)
@click.option("--serve-mode", type=click.Choice(["fast", "default"]), default=None, hidden=True)
@click.option("--model", "model_dir", default=None, hidden=True)
@click.option("--features", "features_path", default=None, hidden=True)
@click.option("--autoscale", is_flag=True,
              help="Run only the Serve autoscaling rehearsal (replicas and workers under a load ramp) and record it.")
@click.option("--autoscale-out", default=None, help="Folder for the rehearsal's series JSON and plot (default: temp).")
def main(rows, online_seconds, serve_default, online, bare_server, serve_mode, model_dir, features_path, autoscale,
         autoscale_out):
    """Benchmark riskcontrol against bare baselines."""
    if bare_server:
        import uvicorn

        uvicorn.run(bare_app(model_dir), host="127.0.0.1", port=bare_server, log_level="warning")
        return
    if serve_mode:
        serve_mode_main(serve_mode, model_dir, features_path, online_seconds)
        return
    run = guard("riskcontrol")
    if autoscale:
        out = tempfile.mkdtemp(prefix="rc-autoscale-")
        emit(autoscale_rehearsal(out, autoscale_out or f"{out}/figures"), run)
        return
    import ray

    from deploy import local

    cfg = RiskConfig(data={"rows": rows, "cards": max(4000, rows // 50), "merchants": max(600, rows // 300),
                           "days": 30, "shards": 8},
                     features={"blocks": 8}, train={"num_workers": 2, "num_cpus": 1},
                     score={"max_actors": 2, "batch_size": 4096})
    out = tempfile.mkdtemp(prefix="rc-bench-")
    result = {"rows": rows}
    state = start_cluster({})
    try:
        attach(state)
        with timer() as t:
            features = make_features(cfg, out)
        log(f"data + features: {t():.0f}s")
        result.update(bench_training(cfg, features, out))
        bare_rps = bare_batch(features, f"{out}/model", out)
        ray_rps = ray_batch(features, f"{out}/model", out, cfg)
        log(f"batch: ray {ray_rps:.0f} rows/s, bare {bare_rps:.0f} rows/s")
        result.update(batch_rows_per_s=ray_rps, batch_ratio=ray_rps / bare_rps)
    finally:
        ray.shutdown()  # before the cluster goes: a driver left attached waits 60 s and hides the traceback
        local.down(state.name, log=lambda *_: None)
    if not online:
        emit(result, run)
        return
    model = f"{out}/model"
    fast = online_in_subprocess("fast", model, features, online_seconds)
    log(f"online (fast serve): {fast}")
    bare = bare_online(model, replay_payloads(features, 5000), online_seconds)
    log(f"online (bare uvicorn): {bare}")
    if serve_default:
        log(f"online (default serve): {online_in_subprocess('default', model, features, online_seconds)}")
    result.update(online_p50_ms=fast["p50_ms"], online_p99_ms=fast["p99_ms"], online_max_rps=fast["max_rps"],
                  online_rps_ratio=fast["max_rps"] / bare["max_rps"], online_target_rps=fast["target_rps"],
                  online_achieved_rps=fast["achieved_rps"], online_valid=fast["valid"] and not fast["errors"],
                  online_errors=fast["errors"])
    redis = fast.get("redis") or {}
    result.update(online_redis_p50_ms=redis.get("p50_ms"), online_redis_p99_ms=redis.get("p99_ms"),
                  online_redis_valid=redis.get("valid"))
    emit(result, run)


if __name__ == "__main__":
    main()
