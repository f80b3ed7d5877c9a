"""The emulator's HTTP hardening and signature checks, at the wire level (no groups, no Ray).

Raw sockets and http.client against an Emulator on a free port; signed requests come from the real
SDK's signer (``alibabacloud_tea_openapi.utils.Utils.get_authorization``) or the real SDK client.
"""

import hashlib
import http.client
import json
import socket
import threading
import time
import types
import uuid
from datetime import datetime, timezone
from urllib.parse import quote

import pytest

from deploy import emulator as emulator_module
from deploy import openapi
from deploy.emulator import Emulator, Group
from deploy.openapi import API_VERSION
from deploy.spec import ResourceGroupSpec

KEY, SECRET = "sec-key-id", "sec-key-secret"
CLUSTER = "amv-sec1"
WINDOW = 15 * 60


@pytest.fixture
def emu():
    e = Emulator(KEY, SECRET, log=lambda *_: None).start()
    yield e
    e.stop()


def stamp(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def signed(emu, action="DescribeDBResourceGroup", query=None, body=b"", date=None, nonce=None,
           host=None, content_type=None, signed_body=None, secret=SECRET):
    """(path, headers, body) of an RPC POST signed by the SDK's ACS3-HMAC-SHA256 signer."""
    from alibabacloud_tea_openapi.utils import Utils

    query = {"DBClusterId": CLUSTER, "RegionId": "cn-hangzhou", **(query or {})}
    payload = hashlib.sha256(body if signed_body is None else signed_body).hexdigest()
    headers = {
        "host": host or f"127.0.0.1:{emu.port}",
        "x-acs-action": action,
        "x-acs-version": API_VERSION,
        "x-acs-date": date or stamp(time.time()),
        "x-acs-signature-nonce": nonce or uuid.uuid4().hex,
        "x-acs-content-sha256": payload,
        "accept": "application/json",
    }
    if content_type:
        headers["content-type"] = content_type
    request = types.SimpleNamespace(method="POST", pathname="/", query=query, headers=headers)
    headers["Authorization"] = Utils.get_authorization(request, "ACS3-HMAC-SHA256", payload, KEY, secret)
    path = "/?" + "&".join(f"{k}={quote(v, safe='~')}" for k, v in query.items())
    return path, headers, body


def send(emu, path, headers, body=b"", timeout=10):
    """POST with http.client; (status, JSON body)."""
    conn = http.client.HTTPConnection("127.0.0.1", emu.port, timeout=timeout)
    try:
        conn.request("POST", path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"{}")
    finally:
        conn.close()


def raw(emu, data: bytes, timeout=5.0) -> bytes:
    """Send raw bytes, return everything the server answers before closing (or the timeout)."""
    with socket.create_connection(("127.0.0.1", emu.port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return out
            out += chunk


def parse(answer: bytes) -> tuple[int, dict]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def service_error(payload: dict, code: str) -> bool:
    return payload.get("Code") == code and payload.get("RequestId") and payload.get("Message")


def wait_for(cond, timeout=5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


# -- the request body --------------------------------------------------------------------------


def test_content_length_not_a_number_is_400(emu):
    status, payload = parse(raw(emu, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n"))
    assert status == 400 and service_error(payload, "InvalidParameter.ContentLength"), payload


def test_negative_content_length_is_400_and_does_not_hang(emu):
    status, payload = parse(raw(emu, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n"))
    assert status == 400 and service_error(payload, "InvalidParameter.ContentLength"), payload


def test_oversized_body_is_413_before_it_is_read(emu):
    big = 1024 * 1024 + 1  # the documented cap is 1 MiB
    status, payload = parse(raw(emu, f"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: {big}\r\n\r\n".encode()))
    assert status == 413 and service_error(payload, "RequestEntityTooLarge"), payload


def test_body_at_the_cap_is_read_and_checked(emu):
    body = b"x" * (1024 * 1024)
    path, headers, body = signed(emu, body=body, signed_body=b"other")
    status, payload = send(emu, path, headers, body)
    assert status == 400 and payload["Code"] == "InvalidParameter.ContentSha256"


def test_a_stalled_client_is_dropped_after_the_socket_timeout():
    emu = Emulator(KEY, SECRET, log=lambda *_: None)
    emu.request_timeout_s = 0.5
    emu.start()
    try:
        t0 = time.monotonic()
        answer = raw(emu, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc", timeout=10)
        assert time.monotonic() - t0 < 5
        status, payload = parse(answer)
        assert status == 408 and service_error(payload, "RequestTimeout"), payload
        # a client that sends nothing at all is closed too
        t0 = time.monotonic()
        assert raw(emu, b"", timeout=10) == b"" and time.monotonic() - t0 < 5
    finally:
        emu.stop()


def test_concurrent_handlers_are_capped_with_throttling():
    emu = Emulator(KEY, SECRET, log=lambda *_: None)
    emu.max_handlers = 2
    emu.start()
    idle = []
    try:
        for _ in range(2):  # accepted (and holding a handler) before the next connection is
            idle.append(socket.create_connection(("127.0.0.1", emu.port), timeout=10))
        status, payload = send(emu, *signed(emu))
        assert status == 503 and service_error(payload, "Throttling"), payload
        for s in idle:
            s.close()
        assert wait_for(lambda: emu.active == 0)
        status, payload = send(emu, *signed(emu, query={"GroupName": "g"}))
        assert status == 404 and payload["Code"] == "InvalidDBResourceGroup.NotFound"
    finally:
        for s in idle:
            s.close()
        emu.stop()


# -- signature checks (the real SDK client where it can send the case) ---------------------------


def sdk_client(emu):
    return openapi.GroupClient(CLUSTER, endpoint=emu.endpoint, access_key_id=KEY, access_key_secret=SECRET,
                               retries=0, log=lambda *_: None)


def test_nonce_reuse_is_refused(emu, monkeypatch):
    from alibabacloud_tea_openapi.utils import Utils

    monkeypatch.setattr(Utils, "get_nonce", staticmethod(lambda: "the-same-nonce"))
    c = sdk_client(emu)
    assert c.list() == []
    with pytest.raises(openapi.ApiError) as e:
        c.list()
    assert e.value.code == "SignatureNonceUsed" and e.value.status == 400


@pytest.mark.parametrize("skew", [-WINDOW - 60, WINDOW + 60])
def test_a_date_outside_the_window_is_refused(emu, monkeypatch, skew):
    from alibabacloud_tea_openapi.utils import Utils

    monkeypatch.setattr(Utils, "get_timestamp", staticmethod(lambda: stamp(time.time() + skew)))
    with pytest.raises(openapi.ApiError) as e:
        sdk_client(emu).list()
    assert e.value.code == "InvalidTimeStamp.Expired" and e.value.status == 400


def test_a_body_that_does_not_match_its_signed_hash_is_refused(emu):
    body = b"GroupName=g"
    path, headers, _ = signed(emu, body=body, content_type="application/x-www-form-urlencoded",
                              signed_body=b"GroupName=other")
    status, payload = send(emu, path, headers, body)
    assert status == 400 and service_error(payload, "InvalidParameter.ContentSha256"), payload


def test_a_correctly_signed_raw_request_is_accepted(emu):
    status, payload = send(emu, *signed(emu, query={"GroupName": "g"}))
    assert status == 404 and payload["Code"] == "InvalidDBResourceGroup.NotFound"


def test_a_request_signed_with_another_secret_is_refused(emu):
    status, payload = send(emu, *signed(emu, secret="another-secret"))
    assert status == 400 and service_error(payload, "SignatureDoesNotMatch"), payload


def test_signed_host_must_be_this_endpoint(emu):
    path, headers, body = signed(emu, host="adb.cn-hangzhou.aliyuncs.com", query={"GroupName": "g"})
    status, payload = send(emu, path, headers, body)
    assert status == 400 and service_error(payload, "SignatureDoesNotMatch"), payload
    status, payload = send(emu, *signed(emu, host=f"localhost:{emu.port}", query={"GroupName": "g"}))
    assert status == 404 and payload["Code"] == "InvalidDBResourceGroup.NotFound"


def test_a_future_dated_request_cannot_be_replayed_within_its_window(emu, monkeypatch):
    now = [time.time()]
    fake = types.SimpleNamespace(**{**vars(time), "time": lambda: now[0]})
    monkeypatch.setattr(emulator_module, "time", fake)
    request = signed(emu, date=stamp(now[0] + 14 * 60), query={"GroupName": "g"})
    status, payload = send(emu, *request)
    assert status == 404 and payload["Code"] == "InvalidDBResourceGroup.NotFound"  # accepted once
    now[0] += 16 * 60  # the date is now 2 minutes in the past: still inside the window
    status, payload = send(emu, *request)
    assert status == 400 and payload["Code"] == "SignatureNonceUsed", payload
    now[0] += 14 * 60  # past date + window: the date itself is refused, the nonce is forgotten
    status, payload = send(emu, *request)
    assert status == 400 and payload["Code"] == "InvalidTimeStamp.Expired", payload
    send(emu, *signed(emu, date=stamp(now[0])))
    assert len(emu.nonces) == 1


# -- bodies that used to give 500 --------------------------------------------------------------


def create_query(ray_config: str) -> dict:
    return {"GroupName": "g", "GroupType": "Job", "Classification": "AI", "Engine": "RayCluster",
            "RayConfig": ray_config}


@pytest.mark.parametrize(
    "ray_config",
    ["[" * 5000 + "]" * 5000,
     '{"WorkerGroups": [{"GroupName": ' + "[" * 900 + "]" * 900 + "}]}"],
    ids=["past-the-recursion-limit", "deep-inside-a-field"],
)
def test_deeply_nested_ray_config_is_400(emu, ray_config):
    status, payload = send(emu, *signed(emu, "CreateDBResourceGroup", query=create_query(ray_config)))
    assert status == 400 and payload["Code"].startswith("InvalidParameter"), payload
    assert not emu.groups


def test_non_utf8_form_body_is_400(emu):
    body = b"GroupName=\xff\xfe"
    path, headers, body = signed(emu, "CreateDBResourceGroup", body=body,
                                 content_type="application/x-www-form-urlencoded")
    status, payload = send(emu, path, headers, body)
    assert status == 400 and service_error(payload, "InvalidParameter"), payload


# -- state is read and changed under the lock --------------------------------------------------


SPEC = ResourceGroupSpec.model_validate(
    {"name": "g", "worker_groups": [{"name": "cpu", "type": "CPU", "spec": "small", "min_workers": 1,
                                      "max_workers": 1}]}
)


@pytest.mark.parametrize("action", ["describe_group", "describe_one", "modify_group", "delete_group"])
def test_actions_wait_for_the_state_lock(emu, action):
    emu.groups[(CLUSTER, "g")] = Group(CLUSTER, SPEC, "t" * 32, status="ok")
    query = {"DBClusterId": CLUSTER, "GroupName": "g",
             "RayConfig": json.dumps(openapi.ray_config(SPEC, None))}
    if action == "describe_group":
        query.pop("GroupName")
    fn = getattr(emu, "describe_group" if action == "describe_one" else action)
    done = threading.Event()
    with emu.lock:
        t = threading.Thread(target=lambda: (fn(query), done.set()), daemon=True)
        t.start()
        assert not done.wait(0.5), f"{action} ran without the emulator's lock"
    assert done.wait(10)
