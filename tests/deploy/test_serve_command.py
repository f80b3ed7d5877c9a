"""`adbray serve`: a template's Serve app from a run folder on storage, on a local cluster and on an
emulator group; the templates' serve_config.yaml generated from their `serve` sections and deployed
with Ray's own `serve deploy`."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml
from click.testing import CliRunner

from deploy.cli import cli
from deploy.serve import ServeError, ServeTarget, check_run_dir, http_options
from pipelines.serving import SERVE_HTTP_PORT, proxy_url
from pipelines.serving import http_options as cluster_http_options
from pipelines.template import load_template

ROOT = Path(__file__).resolve().parents[2]


# -- the generated config (no Ray) --------------------------------------------------------------


@pytest.mark.parametrize("name", ["riskcontrol", "recsys"])
def test_serve_config_yaml_is_generated_from_the_serve_section(name):
    """The checked-in serve_config.yaml is `adbray serve T --print-config`; its app is the template's
    serve_app with the serve section as args, and it is a config Ray's Serve accepts."""
    from ray.serve.schema import ServeDeploySchema

    template = load_template(name)
    section = template.load_config(None, []).serve
    printed = CliRunner().invoke(cli, ["serve", name, "--print-config"])
    assert printed.exit_code == 0, printed.output
    assert printed.output == (ROOT / name / "serve_config.yaml").read_text()
    config = yaml.safe_load(printed.output)
    ServeDeploySchema.model_validate(config)
    (app,) = config["applications"]
    assert (app["name"], app["route_prefix"], app["import_path"]) == \
        (section.app_name, section.route_prefix, template.serve_app)
    assert app["args"]["serve"] == section.model_dump(mode="json")
    assert app["args"]["run_dir"].startswith(f"oss://BUCKET/runs/{name}/")
    assert config["http_options"]["host"] == "127.0.0.1"
    # one source: a --set on the serve section is what the config carries
    changed = CliRunner().invoke(cli, ["serve", name, "--print-config", "--set", "serve.max_batch_size=7",
                                       "--run-dir", "oss://b/runs/x"])
    app = yaml.safe_load(changed.output)["applications"][0]
    assert app["args"]["serve"]["max_batch_size"] == 7 and app["args"]["run_dir"] == "oss://b/runs/x"
    # a secret given on the command line is never printed
    secret = CliRunner().invoke(cli, ["serve", name, "--print-config", "--set",
                                      "serve.redis_url=redis://user:s3cr3t@10.0.0.9:6379/0"])
    assert secret.exit_code == 0 and "s3cr3t" not in secret.output, secret.output


def test_proxies_bind_loopback_on_this_machine_and_all_interfaces_on_a_group(monkeypatch):
    for key in ("ADBRAY_SERVE_PORT", "ADBRAY_CLUSTER_DIR", "ADBRAY_DISKS"):
        monkeypatch.delenv(key, raising=False)
    local = cluster_http_options(["127.0.0.1", "127.0.0.1"])
    assert local["host"] == "127.0.0.1" and local["port"] != SERVE_HTTP_PORT
    assert cluster_http_options(["10.0.3.7", "10.0.3.8"]) == {"host": "0.0.0.0", "port": SERVE_HTTP_PORT}
    # Ray started in this process (a laptop run) reports the machine's own address, not loopback
    from types import SimpleNamespace

    from ray._private.worker import global_worker

    monkeypatch.setattr(global_worker, "node", SimpleNamespace(head=True), raising=False)
    assert cluster_http_options(["10.0.3.7"])["host"] == "127.0.0.1"
    monkeypatch.setattr(global_worker, "node", SimpleNamespace(head=False), raising=False)  # a client of a cluster
    assert cluster_http_options(["10.0.3.7"])["host"] == "0.0.0.0"
    monkeypatch.setenv("ADBRAY_DISKS", "isolated")  # a local cluster's process or client
    assert cluster_http_options(["10.0.3.7"])["host"] == "127.0.0.1"
    assert proxy_url("10.0.3.7", {"serve-port": "41000"}, "0.0.0.0", 8000) == "http://10.0.3.7:41000"
    assert proxy_url("10.0.3.7", {}, "0.0.0.0", 8000) == "http://10.0.3.7:8000"
    assert proxy_url("10.0.3.7", None, "127.0.0.1", 8123) == "http://127.0.0.1:8123"
    # adbray serve: a local cluster binds 127.0.0.1; a group all interfaces at its Serve address's port
    not_running = {"controller_info": {}, "applications": {}}
    assert http_options(ServeTarget(None, local=True), not_running)["host"] == "127.0.0.1"
    group = ServeTarget(None, local=False, public_url="http://47.1.2.3:18000")
    assert http_options(group, not_running) == {"host": "0.0.0.0", "port": 18000}
    assert http_options(ServeTarget(None, local=False), not_running) == {"host": "0.0.0.0", "port": 8000}
    running = {"controller_info": {"node_id": "x"}, "http_options": {"host": "127.0.0.1", "port": 9}}
    assert http_options(group, running) == {"host": "127.0.0.1", "port": 9}  # a running Serve keeps its own


def test_a_group_whose_serve_a_job_started_on_another_port_fails_fast():
    """A template's job may have started Serve on its own port; the group's Serve address then never
    answers: one line at once, not a 300 s wait (and nothing is sent)."""
    from deploy import serve as deploy_serve

    class Rest:
        def __init__(self):
            self.sent = []

        def get_serve_details(self):
            return {"controller_info": {"node_id": "h"}, "http_options": {"host": "127.0.0.1", "port": 41234}}

        def deploy_applications(self, config):
            self.sent.append(config)

    rest = Rest()
    st = ServeTarget(None, local=False, public_url="http://10.0.0.5:18000", client=rest)
    section = load_template("riskcontrol").load_config(None, []).serve
    with pytest.raises(ServeError, match="port 41234.*port 18000.*serve shutdown"):
        deploy_serve.deploy(st, load_template("riskcontrol"), section, "oss://b/runs/x", {})
    assert rest.sent == []


def test_a_local_run_folder_is_refused_in_one_line(tmp_path):
    with pytest.raises(ServeError, match=r"local path; .* give its oss:// URI"):
        check_run_dir(str(tmp_path))
    assert check_run_dir(str(tmp_path), shared_disk=True) == str(tmp_path.resolve())
    assert check_run_dir("oss://bucket/runs/riskcontrol/1/") == "oss://bucket/runs/riskcontrol/1"
    proc = CliRunner().invoke(cli, ["serve", "riskcontrol", "--address", "http://127.0.0.1:1",
                                    "--run-dir", str(tmp_path)])
    assert proc.exit_code == 1 and proc.output.strip().splitlines()[-1].startswith("error: --run-dir ")


# -- on clusters --------------------------------------------------------------------------------


def adbray(env: dict, *args):
    """The ``adbray`` CLI in this process (its imports are loaded once) with ``env`` set (None: unset)."""
    result = CliRunner().invoke(cli, [str(a) for a in args], env=env, catch_exceptions=False)
    result.returncode = result.exit_code
    return result


def tiny_run(run_dir: str) -> None:
    """A riskcontrol run folder with a model (trained in-process on a few thousand rows) and its manifest."""
    from pipelines.io import join
    from pipelines.template import Run, write_manifest
    from tests.riskcontrol.riskcontrol_helpers import small_model

    small_model(run_dir, rows=2000, cards=60, merchants=30, days=5)
    write_manifest(Run(run_dir, {"model": join(run_dir, "model"), "transactions": join(run_dir, "transactions")}))


TRANSACTION = {"transaction_id": 1, "event_time": "2026-01-03T10:00:00", "card_id": 5, "merchant_id": 7,
               "amount": 42.5, "currency": "USD", "merchant_category": "grocery", "channel": "pos",
               "device_id": "d-1", "lat": 30.2, "lon": 120.1}


def score(base: str) -> dict:
    r = httpx.post(f"{base}/score", json=TRANSACTION, timeout=30)
    assert r.status_code == 200, (base, r.status_code, r.text[:300])
    return r.json()


def test_serve_deploy_of_the_printed_config_then_adbray_serve_on_a_local_cluster(ray_connected, tmp_path):
    """The config `adbray serve --address --print-config` writes deploys with Ray's own `serve deploy`; `adbray
    serve --address` of the same settings (the same config) then prints every node's proxy, each of which
    scores; `--delete` removes it."""
    import ray

    from deploy.jobs import resolve_target
    from deploy.serve import details, rest_snapshot, serve_target
    from pipelines.serving import wait_until_routed
    from pipelines.testing import storage_run_dir

    cluster = ray_connected
    run_dir = storage_run_dir("adbray-serve")
    tiny_run(run_dir)
    env = {**cluster.auth_env(), "RAY_ADDRESS": None}
    dash = cluster.dashboard_url
    head = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and (n.get("Labels") or {}).get("group") == "head")
    settings = ["--address", dash, "--run-dir", run_dir, "--set", "serve.max_batch_size=8"]
    try:
        printed = adbray(env, "serve", "riskcontrol", *settings, "--print-config")
        assert printed.returncode == 0, printed.output[-2000:]
        app = yaml.safe_load(printed.stdout)["applications"][0]
        assert app["runtime_env"]["working_dir"].startswith("gcs://") and app["args"]["run_dir"] == run_dir
        path = tmp_path / "serve_config.yaml"
        path.write_text(printed.stdout)
        shell_env = {**os.environ, **cluster.auth_env()}
        shell_env.pop("RAY_ADDRESS", None)
        deployed = subprocess.run([str(Path(sys.executable).with_name("serve")), "deploy", str(path), "-a", dash],
                                  env=shell_env, capture_output=True, text=True, timeout=120, check=False)
        assert deployed.returncode == 0, deployed.stderr[-2000:]
        st = serve_target(resolve_target(dash, token_file=cluster.token_path or None))
        for base in wait_until_routed("riskcontrol", "/riskcontrol", "/healthz", 120, rest_snapshot(st)):
            score(f"{base}/riskcontrol")
        live = details(st)["applications"]["riskcontrol"]
        assert live["deployed_app_config"]["args"]["serve"]["max_batch_size"] == 8  # serve deploy's config runs

        proc = adbray(env, "serve", "riskcontrol", *settings, "--json")
        assert proc.returncode == 0, proc.output[-3000:]
        urls = json.loads(proc.stdout.strip().splitlines()[-1])["urls"]
        # the head's proxy and one per node holding a replica (replicas need CPU: never on the head), each its
        # own port, all on 127.0.0.1 (a local cluster)
        assert f"proxy:{head}" in urls and len(set(urls.values())) == len(urls) >= 2, urls
        assert all(u.startswith("http://127.0.0.1:") and u.endswith("/riskcontrol") for u in urls.values())
        for base in urls.values():
            reply = score(base)
            assert 0 <= reply["probability"] <= 1 and reply["model_version"].startswith("model-")
    finally:
        gone = adbray(env, "serve", "riskcontrol", "--address", dash, "--delete")
    assert gone.returncode == 0, gone.output[-2000:]
    assert httpx.post(f"{urls[f'proxy:{head}']}/score", json=TRANSACTION, timeout=30).status_code == 404
    again = adbray(env, "serve", "riskcontrol", "--address", dash, "--delete")
    assert again.returncode == 1 and "no Serve app 'riskcontrol' runs there" in again.stderr


def test_serve_on_an_emulator_group_at_its_serve_address(tmp_path, monkeypatch):
    """The new user's path: a group on the emulator, a trained model in the group's storage, `adbray serve
    riskcontrol --group G --run-dir oss://...`: the printed URL is the group's RayServePublicAddress, the proxies
    bind all interfaces, a transaction scores there; `--delete` removes the app."""
    from deploy.emulator import Emulator
    from deploy.spec import load_spec

    emu = Emulator("serve-key-id", "serve-key-secret", log=lambda *_: None).start()
    env = {"ALIBABA_CLOUD_ACCESS_KEY_ID": "serve-key-id", "ALIBABA_CLOUD_ACCESS_KEY_SECRET": "serve-key-secret",
           "ADBRAY_ENDPOINT": emu.endpoint, "ADBRAY_CLUSTER_ID": "amv-servetest", "RAY_ADDRESS": None,
           "RAY_AUTH_TOKEN": None, "RAY_AUTH_TOKEN_PATH": None, "RAY_AUTH_MODE": None}
    spec = tmp_path / "resource_group.yaml"
    spec.write_text(re.sub(r"min_workers: \d+, max_workers: \d+", "min_workers: 1, max_workers: 1",
                           (ROOT / "riskcontrol" / "resource_group.yaml").read_text()))
    try:
        created = adbray(env, "group", "create", str(spec), "--wait", "--json")
        assert created.returncode == 0, created.output[-2000:]
        public = json.loads(created.stdout.strip().splitlines()[-1])["serve"]
        assert public.startswith("http://127.0.0.1:")
        backing = emu.groups[("amv-servetest", "riskcontrol")].cluster
        for key, value in backing.storage_env().items():  # write the model into the group's storage
            monkeypatch.setenv(key, value)
        run_dir = f"{load_spec(str(spec)).storage}runs/riskcontrol/tiny"
        tiny_run(run_dir)
        proc = adbray(env, "serve", "riskcontrol", "--group", "riskcontrol", "--run-dir", run_dir)
        assert proc.returncode == 0, proc.output[-3000:]
        url = proc.stdout.split()[0]
        assert url == f"{public}/riskcontrol"
        assert score(url)["model_version"].startswith("model-")
        serve_state = httpx.get(f"{backing.dashboard_url}/api/serve/applications/", headers=backing.headers(),
                                timeout=30).json()
        assert serve_state["http_options"]["host"] == "0.0.0.0"
        gone = adbray(env, "serve", "riskcontrol", "--group", "riskcontrol", "--delete")
        assert gone.returncode == 0, gone.output[-2000:]
        assert httpx.post(f"{url}/score", json=TRANSACTION, timeout=30).status_code == 404
    finally:
        emu.stop(delete_groups=True)
