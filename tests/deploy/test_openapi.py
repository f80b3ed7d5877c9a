"""The OpenAPI layer against the emulator with the real SDK: signatures, errors, retries (no clusters)."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from deploy import openapi
from deploy.emulator import ApiFault, Emulator
from deploy.spec import load_spec

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_SPEC = str(ROOT / "deploy" / "examples" / "squares" / "resource_group.yaml")
GPU_SPEC = """
name: rc
category: HIGH_AVAILABILITY
head: {spec: m.xlarge}
worker_groups:
  - {name: cpu, type: CPU, spec: m.xlarge, min_workers: 1, max_workers: 4}
  - {name: gpu, type: GPU, spec: gpu.a10.1, disk_gb: 200, min_workers: 1, max_workers: 2, distribution_unit: 1/3}
requirements: [lightgbm>=4.5, "pyarrow>=15"]
"""


@pytest.fixture(scope="module")
def emulator():
    emu = Emulator("test-key-id", "test-key-secret", log=lambda *_: None).start()
    yield emu
    emu.stop()


def adbray(*args, env=None):
    """The adbray CLI in a subprocess."""
    return subprocess.run([sys.executable, "-m", "deploy.cli", *args], check=False, cwd=ROOT, env=env or dict(os.environ),
                          capture_output=True, text=True, timeout=120)


def client(emu, secret="test-key-secret", key="test-key-id", **kw):
    return openapi.GroupClient(
        "amv-unit1",
        endpoint=emu.endpoint,
        access_key_id=key,
        access_key_secret=secret,
        log=kw.pop("log", lambda *_: None),
        **kw,
    )


def test_plan_request_has_the_service_fields_and_no_token(tmp_path):
    p = tmp_path / "rg.yaml"
    p.write_text(GPU_SPEC)
    proc = adbray("group", "plan", str(p), "--name", "rc2")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    req = out["request"]
    assert (req["GroupName"], req["GroupType"], req["Classification"], req["Engine"]) == (
        "rc2",
        "Job",
        "AI",
        "RayCluster",
    )
    rc = req["RayConfig"]
    assert (
        rc["AuthToken"] == "<redacted>"
        and rc["Category"] == "HIGH_AVAILABILITY"
        and rc["HeadSpec"] == "m.xlarge"
    )
    assert rc["WorkerGroups"][1] == {
        "GroupName": "gpu",
        "WorkerSpecType": "GPU",
        "WorkerSpecName": "gpu.a10.1",
        "WorkerDiskCapacity": "200",
        "MinWorkerQuantity": 1,
        "MaxWorkerQuantity": 2,
        "AllocateUnit": "1/3",
    }
    assert rc["UserDefinedRequirements"] == "lightgbm>=4.5\npyarrow>=15"
    assert out["reserved"]["min"] == {
        "cores": 8 + 8 + 8,
        "memory_gb": 64 * 3,
        "gpus": 0.333,
        "disk_gb": 100 + 100 + 200,
        "workers": 2,
    }
    assert out["reserved"]["max"]["cores"] == 8 + 4 * 8 + 2 * 8
    # the service's billing items: CPU head + workers as ACU (cores), GPU workers by spec and count, disks
    bill = {at: {b["item"]: b for b in out["billing"][at]} for at in ("min", "max")}
    assert bill["min"]["CPU compute (ACU)"]["quantity"] == 8 + 8 and bill["max"]["CPU compute (ACU)"]["quantity"] == 8 + 4 * 8
    assert {k: bill["max"]["GPU workers"][k] for k in ("quantity", "unit", "distribution_unit", "gpus")} == \
        {"quantity": 2, "unit": "x gpu.a10.1", "distribution_unit": "1/3", "gpus": 0.667}
    assert bill["min"]["Worker disk storage"]["quantity"] == 100 + 200
    assert bill["max"]["Worker disk storage"]["quantity"] == 4 * 100 + 2 * 200
    assert bill["max"]["Head disk storage"]["quantity"] == 100 and "no prices" in out["billing"]["note"]


def test_ray_config_round_trips_to_the_same_spec(tmp_path):
    p = tmp_path / "rg.yaml"
    p.write_text(GPU_SPEC)
    spec = load_spec(str(p))
    back = openapi.spec_from_ray_config("rc", openapi.ray_config(spec, "x" * 32))
    assert back == spec.model_copy(update={"auth_token": None})


def test_token_store_is_0600(tmp_path, monkeypatch):
    monkeypatch.setattr("deploy.local.STATE_ROOT", tmp_path)
    token = openapi.new_token()
    path = openapi.store_token("amv-x", "g", token)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and openapi.load_token("amv-x", "g") == token
    assert len(token) == 64 and openapi.new_token() != token


def test_describe_unknown_group_is_one_line_not_found(emulator):
    with pytest.raises(openapi.ApiError) as e:
        client(emulator).describe("nope")
    assert e.value.code == "InvalidDBResourceGroup.NotFound" and e.value.request_id
    assert "request id" in str(e.value) and "\n" not in str(e.value)


def test_wrong_secret_and_unknown_key_are_refused(emulator):
    with pytest.raises(openapi.ApiError) as e:
        client(emulator, secret="wrong-secret").describe("x")
    assert e.value.code == "SignatureDoesNotMatch" and e.value.status == 400
    assert "wrong-secret" not in str(e.value) and "test-key-secret" not in str(e.value)
    with pytest.raises(openapi.ApiError) as e:
        client(emulator, key="other-key").describe("x")
    assert e.value.code == "InvalidAccessKeyId.NotFound" and e.value.status == 404


def test_invalid_ray_config_is_refused_like_the_service(emulator):
    """The emulator validates what the SDK sends, even when the client skipped local validation."""
    from alibabacloud_adb20211201 import models

    spec = load_spec(EXAMPLE_SPEC)
    params = openapi.create_params(spec, "amv-unit1", "cn-hangzhou", "t" * 32)
    params["RayConfig"]["WorkerGroups"][0]["MaxWorkerQuantity"] = 9
    c = client(emulator)
    with pytest.raises(openapi.ApiError) as e:
        c._call("create_dbresource_group", models.CreateDBResourceGroupRequest().from_map(params))
    assert e.value.code == "InvalidParameter.RayConfig" and "max_workers" in str(e.value)
    params["RayConfig"]["WorkerGroups"][0]["MaxWorkerQuantity"] = 2
    params["GroupType"] = "Interactive"
    with pytest.raises(openapi.ApiError, match="GroupType=Job"):
        c._call("create_dbresource_group", models.CreateDBResourceGroupRequest().from_map(params))
    assert ("amv-unit1", "squares") not in emulator.groups


def test_throttling_is_retried_with_backoff(emulator):
    lines = []
    emulator.faults[:] = [
        ApiFault(400, "Throttling.User", "Request was denied due to user flow control.")
    ] * 2
    c = client(emulator, backoff_s=0.05, log=lines.append)
    with pytest.raises(openapi.ApiError, match="InvalidDBResourceGroup.NotFound"):
        c.describe("after-throttling")
    assert len(lines) == 2 and all(line.startswith("Throttling.User: retrying") for line in lines)
    emulator.faults[:] = [ApiFault(400, "Throttling.User", "denied")] * 3
    with pytest.raises(openapi.ApiError, match="Throttling.User"):
        client(emulator, backoff_s=0.01, retries=2).describe("x")
    emulator.faults.clear()


def test_cli_wrong_secret_is_one_line(emulator):
    env = {
        **os.environ,
        "ALIBABA_CLOUD_ACCESS_KEY_ID": "test-key-id",
        "ALIBABA_CLOUD_ACCESS_KEY_SECRET": "not-the-secret",
    }
    proc = adbray("group", "create", EXAMPLE_SPEC, "--cluster-id", "amv-unit1", "--endpoint", emulator.endpoint,
                  env=env)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert (
        len(lines) == 1 and lines[0].startswith("error: SignatureDoesNotMatch:") and "request id" in lines[0]
    )
    assert "not-the-secret" not in proc.stderr + proc.stdout


def test_no_credentials_in_the_chain_is_one_line(emulator, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALIBABA_CLOUD")}
    env["HOME"] = str(tmp_path)  # no ~/.alibabacloud profile either
    proc = adbray("group", "describe", "x", "--cluster-id", "amv-unit1", "--endpoint", emulator.endpoint,
                  env=env)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        ("error: no usable Alibaba Cloud credentials: set ALIBABA_CLOUD_ACCESS_KEY_ID/ALIBABA_CLOUD_ACCESS_KEY_SECRET,"
         " a profile (~/.alibabacloud/credentials) or a RAM role")
    ]


def test_emulator_command_serves_until_sigterm():
    import signal

    env = {
        **os.environ,
        "ALIBABA_CLOUD_ACCESS_KEY_ID": "cli-key",
        "ALIBABA_CLOUD_ACCESS_KEY_SECRET": "cli-secret",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "deploy.cli", "emulator"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline().strip()
        assert line.startswith("emulator listening on http://127.0.0.1:"), proc.stderr.read()
        endpoint = line.rsplit(" ", 1)[1]
        c = openapi.GroupClient(
            "amv-cli1",
            endpoint=endpoint,
            access_key_id="cli-key",
            access_key_secret="cli-secret",
            log=lambda *_: None,
        )
        assert c.list() == []
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0


# -- create survives a lost answer (no clusters: these emulators never provision) ---------------


@pytest.fixture
def quiet_emulator():
    """A fresh emulator whose groups stay ``creating`` (no backing cluster, no Ray)."""
    emu = Emulator("test-key-id", "test-key-secret", log=lambda *_: None)
    emu._provision = lambda group: None
    emu.start()
    yield emu
    emu.stop()


def lose_first_create_answer(emu, applied: bool):
    """The next CreateDBResourceGroup answers 500; with ``applied`` the group is created anyway."""
    real, calls = emu.create_group, []

    def create_group(query):
        calls.append(query)
        if len(calls) == 1:
            if applied:
                real(query)
            raise ApiFault(500, "InternalError", "The request processing has failed.")
        return real(query)

    emu.create_group = create_group
    return calls


def test_create_retried_after_a_lost_answer_succeeds(quiet_emulator):
    calls = lose_first_create_answer(quiet_emulator, applied=True)
    lines, token = [], openapi.new_token()
    body = client(quiet_emulator, backoff_s=0.01, log=lines.append).create(load_spec(EXAMPLE_SPEC), token)
    assert len(calls) == 2 and body.get("RequestId")
    assert quiet_emulator.groups[("amv-unit1", "squares")].token == token
    assert any("already created" in line for line in lines), lines


def test_create_duplicate_of_an_older_group_is_still_an_error(quiet_emulator):
    c = client(quiet_emulator, backoff_s=0.01)
    spec = load_spec(EXAMPLE_SPEC)
    c.create(spec, "a" * 32)
    lose_first_create_answer(quiet_emulator, applied=False)
    with pytest.raises(openapi.ApiError) as e:
        c.create(spec, "b" * 32)
    assert e.value.code == "InvalidDBResourceGroup.Duplicate"
    assert quiet_emulator.groups[("amv-unit1", "squares")].token == "a" * 32


def test_cli_create_keeps_the_token_when_the_first_answer_is_lost(quiet_emulator, tmp_path):
    lose_first_create_answer(quiet_emulator, applied=True)
    env = {
        **os.environ,
        "ALIBABA_CLOUD_ACCESS_KEY_ID": "test-key-id",
        "ALIBABA_CLOUD_ACCESS_KEY_SECRET": "test-key-secret",
        "ADBRAY_STATE": str(tmp_path),
    }
    proc = adbray("group", "create", EXAMPLE_SPEC, "--cluster-id", "amv-unit1", "--endpoint",
                  quiet_emulator.endpoint, env=env)
    assert proc.returncode == 0, proc.stderr
    stored = tmp_path / "tokens" / "amv-unit1" / "squares.token"
    assert stored.read_text().strip() == quiet_emulator.groups[("amv-unit1", "squares")].token
    assert stat.S_IMODE(os.stat(stored).st_mode) == 0o600


def test_keys_set_after_the_sdk_was_imported_are_used(monkeypatch):
    """The SDK's credential chain reads the environment once, at import; adbray reads it per client, so a
    long-lived process (a notebook, a test session) that sets the keys later still signs with them."""
    import alibabacloud_credentials.utils.auth_util  # noqa: F401 - imported before the keys exist

    from deploy.openapi import sdk_config

    monkeypatch.setenv("ALIBABA_CLOUD_ACCESS_KEY_ID", "late-id")
    monkeypatch.setenv("ALIBABA_CLOUD_ACCESS_KEY_SECRET", "late-secret")
    monkeypatch.setenv("ALIBABA_CLOUD_SECURITY_TOKEN", "late-sts")
    cfg = sdk_config(endpoint="http://127.0.0.1:1")
    assert (cfg.access_key_id, cfg.access_key_secret, cfg.security_token) == ("late-id", "late-secret", "late-sts")
