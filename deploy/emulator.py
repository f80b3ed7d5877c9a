"""An AnalyticDB OpenAPI emulator for Ray resource groups, backed by real local clusters.

Serves the RPC actions Create/Describe/Modify/DeleteDBResourceGroup (API
2021-12-01) on 127.0.0.1 the way the service does: RPC-style POST with the
parameters in the query string (``RayConfig`` as a JSON string), the request
signature (``ACS3-HMAC-SHA256``, what alibabacloud-tea-openapi sends) checked
against the configured access key, the service's error body
(``Code``/``Message``/``RequestId``) with HTTP 400/403/404. Each group moves
``creating -> ok`` once its local-provider cluster is up (``deploy.local.up``
with the group's ``AuthToken`` as the Ray token), and ``deleting -> deleted``
once that cluster is stopped. ``DescribeDBResourceGroup`` returns the cluster's
dashboard, ray:// and metrics addresses, and its Serve address
(``RayServePublicAddress``: 127.0.0.1 and a port chosen per group, where
``adbray serve`` starts the group's Serve proxy). ``ModifyDBResourceGroup`` moves
the group ``ok -> modifying -> ok`` while the change is applied to the backing
cluster for real (:func:`deploy.local.apply_change`: workers restarted for a new
spec or type, deleted above a new max or with their group, started up to a new min).

Versions: a real group's Ray and Python versions are whatever its image runs, read
by clients from its dashboard (``/api/v0/cluster_metadata``, ``/api/version``) and
the Ray client handshake. Locally they always match, so :meth:`Emulator.report_versions`
puts a :class:`DashboardProxy` in front of a group's dashboard that answers those two
endpoints with other versions (everything else passes through); Describe then gives
the proxy as ``RayDashboardAddress``, as a group on another image would be seen.

Test-only actions (Python methods, never RPC actions: the service has no such API): ``faults``
(injected error answers), :meth:`Emulator.report_versions` (above) and :meth:`Emulator.restart_head`,
which rehearses the head of a HIGH_AVAILABILITY group failing and coming back
(:func:`deploy.local.restart_head` on its backing cluster: the GCS state comes back from Redis);
the group stays ``ok`` meanwhile, as a group whose head restarts does, and refuses modify and delete
until it returns.

Hardening (the emulator listens on a port anyone on the machine can reach): the
body is read only after its ``Content-Length`` is checked (a non-negative
integer up to ``max_body_bytes``, 1 MiB; else 400/413), each connection has a
socket timeout (``request_timeout_s``; a stalled body gets 408), at most
``max_handlers`` connections are served at once (more get 503 ``Throttling``),
the signed ``host`` must be this endpoint, a nonce is remembered until its
request's own date leaves the ±15 min window (so no replay inside it), and
malformed input (deep JSON, a non-UTF-8 form body) is a 400, never a 500.
Group state is read and changed under ``lock``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.client import HTTPConnection
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import quote, unquote, urlsplit

from pipelines.config import ConfigError
from pipelines.connect import cluster_versions, local_versions

from . import local
from .openapi import API_VERSION, ray_config, spec_from_ray_config
from .spec import ResourceGroupSpec

ACTIONS = (
    "CreateDBResourceGroup",
    "DescribeDBResourceGroup",
    "ModifyDBResourceGroup",
    "DeleteDBResourceGroup",
)
MAX_CLOCK_SKEW_S = 15 * 60
MAX_BODY_BYTES = 1024 * 1024
MAX_HANDLERS = 32
REQUEST_TIMEOUT_S = 30.0
MAX_JSON_DEPTH = 16
CLUSTER_ID_RE = re.compile(r"am[a-z]-[A-Za-z0-9]{1,64}")


class ApiFault(Exception):
    """An error answer: HTTP status, service error code, message."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass
class Group:
    cluster_id: str
    spec: ResourceGroupSpec
    token: str
    status: str = "creating"
    message: str = ""
    created: str = field(default_factory=lambda: _now())
    updated: str = field(default_factory=lambda: _now())
    cluster: local.ClusterState | None = None
    serve_port: int = field(default_factory=local.free_port)  # its RayServePublicAddress
    proxy: DashboardProxy | None = None  # set by Emulator.report_versions
    changes: list[str] = field(default_factory=list)  # what the last modify did to the nodes
    restarting: bool = False  # Emulator.restart_head (test-only) is restarting its head

    @property
    def local_name(self) -> str:
        return f"emu-{self.cluster_id}-{self.spec.name}"


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def checked_spec(name: str, rc: dict) -> ResourceGroupSpec:
    """Validate a RayConfig like the service does; ApiFault(400) naming the field otherwise."""
    try:
        return spec_from_ray_config(name, rc)
    except ConfigError as e:
        raise ApiFault(400, "InvalidParameter.RayConfig", str(e)) from None


def describe_entry(group: Group) -> dict:
    """A ``GroupsInfo`` entry as DescribeDBResourceGroup returns it (never the AuthToken)."""
    spec = group.spec
    rc = ray_config(spec, token=None)
    if group.status in ("ok", "modifying") and group.cluster:
        c = group.cluster
        rc.update(
            RayDashboardAddress=group.proxy.url if group.proxy else c.dashboard_url,
            RayClusterAddress=c.client_address,
            RayGrafanaAddress=f"{c.dashboard_url}/#/metrics",
            RayServePublicAddress=f"http://127.0.0.1:{group.serve_port}",
        )
    return {
        "GroupName": spec.name,
        "GroupType": "Job",
        "Classification": "AI",
        "Engine": "RayCluster",
        "Status": group.status,
        "Message": group.message,
        "CreateTime": group.created,
        "UpdateTime": group.updated,
        "RayConfig": rc,
    }


class Emulator:
    """The emulator: state, request handling, and a threaded HTTP server on 127.0.0.1."""

    def __init__(
        self, access_key_id: str, access_key_secret: str, port: int = 0, log=None, autoscale: bool = True
    ):
        if not access_key_id or not access_key_secret:
            raise ValueError(
                "the emulator needs an access key id and secret (or the ALIBABA_CLOUD_ACCESS_KEY_* env vars)"
            )
        self.keys = {access_key_id: access_key_secret}
        self.port, self.log = port, log or (lambda m: print(m, file=sys.stderr, flush=True))
        self.autoscale = autoscale
        self.groups: dict[tuple[str, str], Group] = {}
        self.lock = threading.Lock()
        self.nonces: dict[str, float] = {}
        self.faults: list[ApiFault] = []  # injected answers for the next requests (throttling rehearsal)
        self.server: ThreadingHTTPServer | None = None
        self.threads: list[threading.Thread] = []
        # limits, read by start(): body size, per-connection socket timeout, concurrent connections
        self.max_body_bytes, self.request_timeout_s, self.max_handlers = (
            MAX_BODY_BYTES, REQUEST_TIMEOUT_S, MAX_HANDLERS
        )
        self.active = 0  # connections being served now
        self._active_lock = threading.Lock()

    # -- server ---------------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Emulator:
        emulator = self

        class Handler(BaseHTTPRequestHandler):
            timeout = emulator.request_timeout_s  # socket timeout: a stalled client cannot hold a thread

            def do_POST(self):
                emulator.handle(self)

            do_GET = do_POST

            def log_message(self, *args):
                pass

        self.server = _Server(self, Handler)
        self.port = self.server.server_address[1]
        t = threading.Thread(target=self.server.serve_forever, name="adbray-emulator", daemon=True)
        t.start()
        self.log(f"emulator listening on {self.endpoint}")
        return self

    def stop(self, delete_groups: bool = True) -> None:
        """Stop serving; with ``delete_groups`` also stop every backing cluster."""
        if self.server:
            self.server.shutdown()
            self.server.server_close()
        with self.lock:
            threads = list(self.threads)
        for t in threads:
            t.join(timeout=300)
        if delete_groups:
            with self.lock:
                groups = [g for g in self.groups.values() if g.cluster and g.status != "deleted"]
            for g in groups:
                self._teardown(g)

    def refuse_busy(self, sock) -> None:
        """Answer 503 Throttling on a connection that gets no handler (all ``max_handlers`` busy)."""
        request_id = str(uuid.uuid4()).upper()
        fault = ApiFault(503, "Throttling", "Request was denied: too many concurrent requests.")
        out = json.dumps(self._error_payload(request_id, fault)).encode()
        head = (
            "HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json;charset=utf-8\r\n"
            f"Content-Length: {len(out)}\r\nx-acs-request-id: {request_id}\r\nConnection: close\r\n\r\n"
        )
        try:
            sock.settimeout(1.0)
            sock.sendall(head.encode() + out)
            sock.shutdown(socket.SHUT_WR)
            # read what the client sent, briefly, so closing does not reset the answer away
            deadline = time.monotonic() + 0.2
            while time.monotonic() < deadline:
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                if not sock.recv(65536):
                    break
        except OSError:
            pass

    # -- protocol -------------------------------------------------------------------------------

    def read_body(self, http: BaseHTTPRequestHandler) -> bytes:
        """The request body, after checking its Content-Length (ApiFault 400/411/413 otherwise)."""
        if http.headers.get("transfer-encoding"):
            raise ApiFault(411, "MissingContentLength", "Send the body with a Content-Length, not chunked.")
        values = {v.strip() for v in http.headers.get_all("content-length") or ["0"]}
        text = values.pop() if len(values) == 1 else ",".join(sorted(values))
        if not re.fullmatch(r"[0-9]{1,16}", text):
            raise ApiFault(
                400,
                "InvalidParameter.ContentLength",
                f"Content-Length {text[:40]!r} is not a non-negative integer.",
            )
        length = int(text)
        if length > self.max_body_bytes:
            raise ApiFault(
                413, "RequestEntityTooLarge", f"The request body is larger than {self.max_body_bytes} bytes."
            )
        body = http.rfile.read(length) if length else b""
        if len(body) != length:
            raise ApiFault(
                400, "InvalidParameter.ContentLength", "The body is shorter than its Content-Length."
            )
        return body

    def handle(self, http: BaseHTTPRequestHandler) -> None:
        request_id = str(uuid.uuid4()).upper()
        try:
            if http.command != "POST":
                raise ApiFault(400, "UnsupportedHTTPMethod", "RPC actions are sent with POST")
            body = self.read_body(http)
            split = urlsplit(http.path)
            query = parse_query(split.query)
            self.verify_signature(http.command, split.path or "/", query, http.headers, body)
            with self.lock:
                fault = self.faults.pop(0) if self.faults else None
            if fault:
                raise fault
            action = http.headers.get("x-acs-action") or query.get("Action", "")
            if action not in ACTIONS:
                raise ApiFault(404, "InvalidAction.NotFound", f"Specified api {action!r} is not found")
            version = http.headers.get("x-acs-version") or query.get("Version", "")
            if version != API_VERSION:
                raise ApiFault(400, "InvalidVersion", f"Specified parameter Version {version!r} is not valid")
            if body and "form" in (http.headers.get("content-type") or ""):
                try:
                    query.update(parse_query(body.decode("utf-8")))
                except UnicodeDecodeError:
                    raise ApiFault(400, "InvalidParameter", "The form body is not valid UTF-8.") from None
            result = getattr(self, action.replace("DBResourceGroup", "_group").lower())(query)
            self._answer(http, 200, {"RequestId": request_id, **result})
        except ApiFault as f:
            self.log(f"{f.code}: {f.message} (request id {request_id})")
            if f.status in (411, 413) or f.code == "InvalidParameter.ContentLength":
                http.close_connection = True  # the body was not read: nothing more on this connection
            self._answer(http, f.status, self._error_payload(request_id, f))
        except TimeoutError:
            http.close_connection = True
            fault = ApiFault(408, "RequestTimeout", "The request was not received in time.")
            self._answer(http, 408, self._error_payload(request_id, fault))
        except Exception as e:  # noqa: BLE001 - an emulator bug must still answer like the service would
            self.log(f"InternalError: {type(e).__name__}: {e}")
            self._answer(
                http,
                500,
                {
                    "RequestId": request_id,
                    "Code": "InternalError",
                    "Message": "The request processing has failed due to some unknown error.",
                },
            )

    def _error_payload(self, request_id: str, f: ApiFault) -> dict:
        """The service's error body."""
        return {
            "RequestId": request_id,
            "HostId": f"127.0.0.1:{self.port}",
            "Code": f.code,
            "Message": f.message,
            "Recommend": "https://api.aliyun.com/troubleshoot",
        }

    @staticmethod
    def _answer(http, status: int, payload: dict) -> None:
        out = json.dumps(payload).encode()
        try:
            http.send_response(status)
            http.send_header("Content-Type", "application/json;charset=utf-8")
            http.send_header("Content-Length", str(len(out)))
            http.send_header("x-acs-request-id", payload["RequestId"])
            if http.close_connection:
                http.send_header("Connection", "close")
            http.end_headers()
            http.wfile.write(out)
        except OSError:  # the client went away (or stalled past the socket timeout)
            http.close_connection = True

    def verify_signature(self, method: str, path: str, query: dict, headers, body: bytes) -> None:
        """Check an ACS3-HMAC-SHA256 signature exactly as the SDK computes it."""
        auth = headers.get("Authorization") or ""
        m = re.fullmatch(
            r"(ACS3-HMAC-SHA256) Credential=([^,]+),SignedHeaders=([^,]+),Signature=([0-9a-f]+)", auth.strip()
        )
        if not m:
            raise ApiFault(
                400, "IncompleteSignature", "The request signature does not conform to Aliyun standards."
            )
        algo, ak, signed, signature = m.groups()
        if ak not in self.keys:
            raise ApiFault(404, "InvalidAccessKeyId.NotFound", "Specified access key is not found.")
        names = signed.split(";")
        for needed in (
            "host",
            "x-acs-action",
            "x-acs-version",
            "x-acs-date",
            "x-acs-signature-nonce",
            "x-acs-content-sha256",
        ):
            if needed not in names:
                raise ApiFault(400, "IncompleteSignature", f"The header {needed} must be signed.")
        host = (headers.get("host") or "").strip().lower()
        if host not in (f"127.0.0.1:{self.port}", f"localhost:{self.port}"):
            raise ApiFault(
                400, "SignatureDoesNotMatch", f"The signed host {host[:100]!r} is not this endpoint."
            )
        payload_hash = headers.get("x-acs-content-sha256") or ""
        if payload_hash != hashlib.sha256(body).hexdigest():
            raise ApiFault(
                400, "InvalidParameter.ContentSha256", "x-acs-content-sha256 does not match the body."
            )
        try:
            sent = datetime.strptime(headers.get("x-acs-date") or "", "%Y-%m-%dT%H:%M:%SZ")
        except ValueError:
            raise ApiFault(
                400, "InvalidTimeStamp.Format", "Specified time stamp or date value is not well formatted."
            )
        sent_ts = sent.replace(tzinfo=timezone.utc).timestamp()
        if abs(time.time() - sent_ts) > MAX_CLOCK_SKEW_S:
            raise ApiFault(400, "InvalidTimeStamp.Expired", "Specified time stamp or date value is expired.")
        canonical_headers = "".join(f"{n}:{(headers.get(n) or '').strip()}\n" for n in names)
        canonical_query = "&".join(f"{k}={quote(query[k], safe='~')}" for k in sorted(query))
        canonical = f"{method}\n{path}\n{canonical_query}\n{canonical_headers}\n{signed}\n{payload_hash}"
        to_sign = f"{algo}\n{hashlib.sha256(canonical.encode()).hexdigest()}"
        expected = hmac.new(self.keys[ak].encode(), to_sign.encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, signature):
            raise ApiFault(
                400, "SignatureDoesNotMatch", "Specified signature is not matched with our calculation."
            )
        nonce = headers.get("x-acs-signature-nonce") or ""
        with self.lock:
            # a nonce is kept until its request's date leaves the window: until then the date passes
            now = time.time()
            self.nonces = {n: until for n, until in self.nonces.items() if until >= now}
            if nonce in self.nonces:
                raise ApiFault(400, "SignatureNonceUsed", "Specified signature nonce was used already.")
            self.nonces[nonce] = sent_ts + MAX_CLOCK_SKEW_S

    # -- actions --------------------------------------------------------------------------------

    @staticmethod
    def _required(query: dict, *names: str) -> None:
        for n in names:
            if not query.get(n):
                raise ApiFault(
                    400,
                    "MissingParameter",
                    f"The input parameter {n} that is mandatory for processing this request is not supplied.",
                )
        if not CLUSTER_ID_RE.fullmatch(query["DBClusterId"]):
            raise ApiFault(
                404, "InvalidDBClusterId.NotFound", f"The DBClusterId {query['DBClusterId']!r} is not found."
            )

    def _group(self, query: dict) -> Group:
        """The live group a query names (call with ``lock`` held)."""
        self._required(query, "DBClusterId", "GroupName")
        group = self.groups.get((query["DBClusterId"], query["GroupName"]))
        if group is None or group.status == "deleted":
            raise ApiFault(
                404,
                "InvalidDBResourceGroup.NotFound",
                f"The resource group {query['GroupName']!r} is not found.",
            )
        return group

    @staticmethod
    def _ray_config(query: dict) -> dict:
        try:
            rc = json.loads(query.get("RayConfig") or "")
        except (json.JSONDecodeError, RecursionError):
            raise ApiFault(400, "InvalidParameter", "RayConfig is not valid JSON") from None
        if json_depth(rc) > MAX_JSON_DEPTH:
            raise ApiFault(400, "InvalidParameter", f"RayConfig nests deeper than {MAX_JSON_DEPTH} levels")
        return rc

    def create_group(self, query: dict) -> dict:
        self._required(query, "DBClusterId", "GroupName", "GroupType")
        for key, want in (("GroupType", "Job"), ("Classification", "AI"), ("Engine", "RayCluster")):
            if query.get(key) != want:
                raise ApiFault(
                    400,
                    "InvalidParameter",
                    f"A Ray cluster resource group needs {key}={want}, got {query.get(key)!r}",
                )
        name, cluster_id = query["GroupName"], query["DBClusterId"]
        rc = self._ray_config(query)
        spec = checked_spec(name, rc)
        token = str(rc.get("AuthToken") or "")  # none: a group as the console makes it, without Ray auth
        if token and len(token) < 16:
            raise ApiFault(
                400, "InvalidParameter.RayConfig", "RayConfig.AuthToken must be at least 16 characters"
            )
        with self.lock:
            old = self.groups.get((cluster_id, name))
            if old is not None and old.status != "deleted":
                raise ApiFault(
                    400, "InvalidDBResourceGroup.Duplicate", f"The resource group {name!r} already exists."
                )
            group = Group(cluster_id, spec, token)
            self.groups[(cluster_id, name)] = group
        self._background(self._provision, group)
        return {}

    def describe_group(self, query: dict) -> dict:
        self._required(query, "DBClusterId")
        with self.lock:
            if query.get("GroupName"):
                return {"GroupsInfo": [describe_entry(self._group(query))]}
            return {
                "GroupsInfo": [
                    describe_entry(g)
                    for (cid, _), g in self.groups.items()
                    if cid == query["DBClusterId"] and g.status != "deleted"
                ]
            }

    def modify_group(self, query: dict) -> dict:
        with self.lock:
            group = self._group(query)
            if group.status != "ok" or group.restarting:
                raise ApiFault(400, "OperationDenied.GroupStatus",
                               f"The resource group is {'restarting its head' if group.restarting else group.status}.")
            spec = checked_spec(group.spec.name, self._ray_config(query))
            if spec.category != group.spec.category:
                raise ApiFault(400, "OperationDenied.Category", "Category cannot be changed after creation.")
            before = group.spec
            group.spec, group.updated = spec, _now()
            if group.cluster is not None:
                group.status = "modifying"
        if group.cluster is not None:
            self._background(lambda g: self._apply(g, before, spec), group)
        return {}

    def delete_group(self, query: dict) -> dict:
        with self.lock:
            group = self._group(query)
            if group.status in ("creating", "deleting", "modifying") or group.restarting:  # a change runs on its nodes
                raise ApiFault(400, "OperationDenied.GroupStatus",
                               f"The resource group is {'restarting its head' if group.restarting else group.status}.")
            group.status, group.updated = "deleting", _now()
        self._background(self._teardown, group)
        return {}

    # -- backing clusters -----------------------------------------------------------------------

    def _background(self, fn, group: Group) -> None:
        t = threading.Thread(target=fn, args=(group,), daemon=True)
        with self.lock:
            self.threads = [x for x in self.threads if x.is_alive()] + [t]
        t.start()

    def _provision(self, group: Group) -> None:
        spec = group.spec.model_copy(update={"name": group.local_name})
        scale = self.autoscale and any(g.min_workers != g.max_workers for g in spec.worker_groups)
        try:
            cluster = local.up(spec, token=group.token or None, log=self.log, autoscale=scale,
                               auth=bool(group.token))
            status, message = "ok", ""
        except Exception as e:  # noqa: BLE001 - a group that cannot start is 'failed', as on the service
            cluster, status, message = None, "failed", " ".join(str(e).split())
        with self.lock:
            group.cluster, group.status, group.message, group.updated = cluster, status, message, _now()
        self.log(f"group {group.spec.name}: {status} {message}".rstrip())

    def _apply(self, group: Group, old: ResourceGroupSpec, new: ResourceGroupSpec) -> None:
        """Apply a modify to the backing cluster; the group is ``ok`` again after, ``failed`` if it broke."""
        local_old = old.model_copy(update={"name": group.local_name})
        local_new = new.model_copy(update={"name": group.local_name})
        try:
            done = local.apply_change(group.cluster, local_old, local_new, log=self.log)
            status, message = "ok", ""
        except Exception as e:  # noqa: BLE001 - said in the group's status, as the service would
            done, status, message = [], "failed", " ".join(str(e).split())
        with self.lock:
            group.changes, group.status, group.message, group.updated = done, status, message, _now()

    def report_versions(self, cluster_id: str, name: str, ray: str | None = None,
                        python: str | None = None) -> str | None:
        """Make a group look like one whose image runs other Ray/Python versions: its dashboard is then seen
        through a :class:`DashboardProxy` that reports them (None for both: the real dashboard again).
        Returns the address Describe now gives."""
        with self.lock:
            group = self.groups[(cluster_id, name)]
            if group.proxy:
                group.proxy.stop()
                group.proxy = None
            if (ray or python) and group.cluster:
                real = cluster_versions(group.cluster.dashboard_url, group.cluster.headers()) or local_versions()
                group.proxy = DashboardProxy(group.cluster.dashboard_url,
                                             {"ray": ray or real["ray"], "python": python or real["python"]}).start()
            return group.proxy.url if group.proxy else (group.cluster.dashboard_url if group.cluster else None)

    def restart_head(self, cluster_id: str, name: str, timeout: float = 180.0) -> dict:
        """TEST-ONLY action (no such API on the service): restart the head of a HIGH_AVAILABILITY group the way
        a failed head comes back (:func:`deploy.local.restart_head` on its backing cluster); returns its
        timings once every worker reconnected. Raises ApiFault (400) for a group that is not ``ok`` or not
        HIGH_AVAILABILITY, and (500) when the cluster does not come back; the group is ``failed`` then."""
        with self.lock:
            group = self._group({"DBClusterId": cluster_id, "GroupName": name})
            if group.status != "ok" or group.restarting or group.cluster is None:
                raise ApiFault(400, "OperationDenied.GroupStatus", f"The resource group is {group.status}.")
            if group.spec.category != "HIGH_AVAILABILITY":
                raise ApiFault(400, "OperationDenied.Category", f"The resource group is {group.spec.category}: "
                               "a head restart keeps its state only with HIGH_AVAILABILITY.")
            group.restarting = True
        try:
            return local.restart_head(group.cluster, timeout=timeout, log=self.log)
        except local.LocalClusterError as e:
            with self.lock:
                group.status, group.message, group.updated = "failed", " ".join(str(e).split()), _now()
            raise ApiFault(500, "InternalError", str(e)) from None
        finally:
            with self.lock:
                group.restarting = False

    def _teardown(self, group: Group) -> None:
        try:
            if group.cluster:
                local.down(group.cluster.name, log=self.log)
        except local.LocalClusterError as e:
            self.log(f"group {group.spec.name}: {e}")
        with self.lock:
            if group.proxy:
                group.proxy.stop()
            group.cluster, group.proxy, group.status, group.updated = None, None, "deleted", _now()


class DashboardProxy:
    """A pass-through HTTP proxy in front of a Ray dashboard that reports other Ray and Python versions on
    ``/api/version`` and ``/api/v0/cluster_metadata`` (where clients read them). WebSocket upgrades (log
    tailing) are refused with 501, so clients fall back to polling."""

    def __init__(self, upstream: str, versions: dict):
        self.upstream, self.versions = urlsplit(upstream), dict(versions)
        self.server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> DashboardProxy:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            timeout = 60

            def _forward(self):
                proxy.forward(self)

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _forward

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, name="adbray-dashboard-proxy", daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server:
            self.server.shutdown()
            self.server.server_close()

    def rewrite(self, path: str, body: bytes) -> bytes:
        """The upstream answer with this proxy's versions in it (the two version endpoints only)."""
        route = path.split("?", 1)[0]
        if route not in ("/api/version", "/api/v0/cluster_metadata"):
            return body
        data = json.loads(body)
        if route == "/api/version":
            data["ray_version"] = self.versions["ray"]
        else:
            data.setdefault("data", {}).update(rayVersion=self.versions["ray"], pythonVersion=self.versions["python"])
        return json.dumps(data).encode()

    def forward(self, http: BaseHTTPRequestHandler) -> None:
        if "upgrade" in (http.headers.get("connection") or "").lower():
            http.send_error(501, "WebSocket is not proxied")
            return
        length = int(http.headers.get("content-length") or 0)
        body = http.rfile.read(length) if length else None
        headers = {k: v for k, v in http.headers.items() if k.lower() not in ("host", "connection")}
        conn = HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=120)
        try:
            conn.request(http.command, http.path, body=body, headers=headers)
            resp = conn.getresponse()
            out = resp.read()
            if resp.status == 200:
                out = self.rewrite(http.path, out)
            http.send_response(resp.status)
            for k, v in resp.getheaders():
                if k.lower() not in ("content-length", "transfer-encoding", "connection"):
                    http.send_header(k, v)
            http.send_header("Content-Length", str(len(out)))
            http.end_headers()
            if http.command != "HEAD":
                http.wfile.write(out)
        except OSError as e:
            http.send_error(502, f"dashboard unreachable: {e}")
        finally:
            conn.close()


class _Server(ThreadingHTTPServer):
    """A threaded HTTP server that serves at most ``emulator.max_handlers`` connections at once."""

    daemon_threads = True

    def __init__(self, emulator: Emulator, handler):
        self.emulator = emulator
        super().__init__(("127.0.0.1", emulator.port), handler)

    def process_request(self, request, client_address):
        emu = self.emulator
        with emu._active_lock:
            busy = emu.active >= emu.max_handlers
            if not busy:
                emu.active += 1
        if busy:
            emu.refuse_busy(request)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release()

    def _release(self):
        with self.emulator._active_lock:
            self.emulator.active -= 1


def json_depth(value) -> int:
    """How deep lists and objects nest in a parsed JSON value (iterative: no recursion limit)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


def parse_query(text: str) -> dict:
    """``a=1&b=%7B..%7D`` -> {"a": "1", "b": "{..}"} (percent-decoding only, as the signer encodes)."""
    out = {}
    for part in text.split("&"):
        if part:
            k, _, v = part.partition("=")
            out[unquote(k)] = unquote(v)
    return out
