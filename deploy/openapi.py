"""AnalyticDB for MySQL OpenAPI (2021-12-01) for Ray cluster resource groups, through the real SDK.

``build_request(spec, cluster_id)`` turns a ``resource_group.yaml`` into the
``CreateDBResourceGroupRequest`` the service expects (GroupType Job,
Classification AI, Engine RayCluster, RayConfig); :class:`GroupClient` sends
Create/Describe/Modify/Delete with the standard Alibaba Cloud credential chain,
retries throttling with backoff and turns API errors into one-line
:class:`ApiError` s that carry the request id. Credentials and tokens are never
printed: ``plan()`` redacts the AuthToken.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

from .spec import BILLING_NOTE, ResourceGroupSpec, billing

API_VERSION = "2021-12-01"
DEFAULT_REGION = os.environ.get("ALIBABA_CLOUD_REGION_ID", "cn-hangzhou")
READY, FAILED_STATES = "ok", ("failed", "error", "deleted", "deleting")
RETRYABLE_CODES = ("Throttling", "ServiceUnavailable", "InternalError", "OperationDenied.ConcurrentOperation")
REDACTED = "<redacted>"


class ApiError(RuntimeError):
    """An OpenAPI call failed; the message is one line with the error code and request id."""

    def __init__(self, message: str, code: str = "", request_id: str = "", status: int | None = None):
        super().__init__(message)
        self.code, self.request_id, self.status = code, request_id, status


def endpoint_for(region: str) -> str:
    """The public AnalyticDB for MySQL endpoint of a region."""
    return f"adb.{region}.aliyuncs.com"


def job_storage_env(region: str, api_endpoint: str | None) -> dict:
    """What a job on a group needs to reach the group's OSS storage through ``pipelines.io``: the region's
    VPC-internal OSS endpoint (S3-compatible) and the region, or ``$ADBRAY_GROUP_OSS_ENDPOINT`` when set.
    No keys: inside the group they come from the credential chain (``pipelines.io.oss_credentials``).
    A custom OpenAPI endpoint (the emulator, a private deployment) gets nothing: its nodes carry their own."""
    if api_endpoint and not urlparse(api_endpoint if "://" in api_endpoint else f"https://{api_endpoint}") \
            .hostname.endswith(".aliyuncs.com"):
        return {}
    oss = os.environ.get("ADBRAY_GROUP_OSS_ENDPOINT") or f"oss-{region}-internal.aliyuncs.com"
    return {"OSS_ENDPOINT": oss, "OSS_REGION": region}


STORAGE_MOUNT_PATH = "/mnt/adbray-storage"  # where the group mounts its storage (StorageMounts.MountPath)


def ray_config(spec: ResourceGroupSpec, token: str | None) -> dict:
    """The ``RayConfig`` map (service field names) for a spec."""
    cfg = {
        "Category": spec.category,
        "HeadSpec": spec.head.spec,
        "HeadSpecType": "CPU",
        "HeadDiskCapacity": str(spec.head.disk_gb),
        "WorkerGroups": [
            {
                "GroupName": g.name,
                "WorkerSpecType": g.type,
                "WorkerSpecName": g.spec,
                "WorkerDiskCapacity": str(g.disk_gb),
                "MinWorkerQuantity": g.min_workers,
                "MaxWorkerQuantity": g.max_workers,
                **({"AllocateUnit": g.distribution_unit} if g.distribution_unit else {}),
            }
            for g in spec.worker_groups
        ],
    }
    if spec.requirements:
        cfg["UserDefinedRequirements"] = "\n".join(spec.requirements)
    if spec.storage:  # the SDK's StorageMounts entry: {StorageId, StorageName, MountPath}
        cfg["StorageMounts"] = [{"StorageName": spec.storage, "MountPath": STORAGE_MOUNT_PATH}]
    if token:
        cfg["AuthToken"] = token
    return cfg


def create_params(spec: ResourceGroupSpec, cluster_id: str, region: str, token: str | None) -> dict:
    """Top-level CreateDBResourceGroup parameters (RayConfig as a map)."""
    return {
        "DBClusterId": cluster_id,
        "GroupName": spec.name,
        "GroupType": "Job",
        "Classification": "AI",
        "Engine": "RayCluster",
        "RegionId": region,
        "RayConfig": ray_config(spec, token),
    }


def build_request(
    spec: ResourceGroupSpec, cluster_id: str, region: str = DEFAULT_REGION, token: str | None = None
):
    """The SDK's ``CreateDBResourceGroupRequest`` for a spec."""
    from alibabacloud_adb20211201 import models

    return models.CreateDBResourceGroupRequest().from_map(create_params(spec, cluster_id, region, token))


def plan(spec: ResourceGroupSpec, cluster_id: str = "amv-<cluster-id>", region: str = DEFAULT_REGION) -> dict:
    """What ``create`` would send (AuthToken redacted) and what the group reserves at min and max."""
    params = build_request(spec, cluster_id, region, token=REDACTED).to_map()
    params = {k: v for k, v in params.items() if v not in (None, [], {})}
    params["RayConfig"] = {k: v for k, v in params["RayConfig"].items() if v not in (None, [], {})}
    return {
        "action": "CreateDBResourceGroup",
        "version": API_VERSION,
        "request": params,
        "reserved": {"min": spec.reserved("min"), "max": spec.reserved("max")},
        "billing": {"note": BILLING_NOTE, "min": billing(spec, "min"), "max": billing(spec, "max")},
    }


# -- tokens -------------------------------------------------------------------------------------


def token_path(cluster_id: str, group: str) -> Path:
    from .local import STATE_ROOT

    return STATE_ROOT / "tokens" / cluster_id / f"{group}.token"


def store_token(cluster_id: str, group: str, token: str) -> Path:
    """Write the group's Ray token to a file created 0600 (O_EXCL, renamed into place) in 0700 folders."""
    from .local import private_dir, write_private

    path = token_path(cluster_id, group)
    private_dir(path.parent)
    return write_private(path, token)


def load_token(cluster_id: str, group: str) -> str | None:
    path = token_path(cluster_id, group)
    return path.read_text().strip() if path.is_file() else None


def new_token() -> str:
    """A strong Ray auth token (256 bits)."""
    return secrets.token_hex(32)


# -- client -------------------------------------------------------------------------------------


def sdk_config(
    region: str = DEFAULT_REGION,
    endpoint: str | None = None,
    access_key_id: str | None = None,
    access_key_secret: str | None = None,
):
    """SDK Config: explicit keys, else the default credential chain (env, profile, RAM role)."""
    from alibabacloud_tea_openapi.models import Config

    cfg = Config(region_id=region, endpoint=endpoint_for(region))
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        cfg.endpoint = parsed.netloc
        cfg.protocol = parsed.scheme
    # the environment's keys, read now: the SDK's chain reads them once, when it is first imported, so a
    # long-lived process (a notebook, a test session) that sets them later would not be seen
    if not (access_key_id and access_key_secret):
        access_key_id = os.environ.get("ALIBABA_CLOUD_ACCESS_KEY_ID")
        access_key_secret = os.environ.get("ALIBABA_CLOUD_ACCESS_KEY_SECRET")
        cfg.security_token = os.environ.get("ALIBABA_CLOUD_SECURITY_TOKEN") or None
    if access_key_id and access_key_secret:
        cfg.access_key_id, cfg.access_key_secret = access_key_id, access_key_secret
    else:
        import logging

        from alibabacloud_credentials.client import Client as CredentialClient

        # the chain logs each failed provider with a traceback; the one-line ApiError says it instead
        logging.getLogger("credentials").setLevel(logging.CRITICAL)
        cfg.credential = CredentialClient()  # resolved lazily, on the first call
    cfg.connect_timeout, cfg.read_timeout = 10_000, 30_000
    return cfg


def _one_line(e: Exception) -> ApiError:
    if "CredentialException" in f"{type(e).__name__} {e} {getattr(e, 'message', '')} {e.__cause__!r}":
        return ApiError(
            "no usable Alibaba Cloud credentials: set ALIBABA_CLOUD_ACCESS_KEY_ID/"
            "ALIBABA_CLOUD_ACCESS_KEY_SECRET, a profile (~/.alibabacloud/credentials) or a RAM role",
            code="InvalidCredentials",
        )
    code = str(getattr(e, "code", "") or type(e).__name__)
    request_id = str(getattr(e, "request_id", "") or (getattr(e, "data", None) or {}).get("RequestId", ""))
    data = getattr(e, "data", None) or {}
    message = data.get("Message") or getattr(e, "message", None) or str(e)
    message = " ".join(str(message).split())
    if "credential" in message.lower() and "secret" in message.lower():
        message = "credentials are missing or invalid"
    rid = f" (request id {request_id})" if request_id and request_id != "None" else ""
    return ApiError(
        f"{code}: {message}{rid}", code=code, request_id=request_id, status=getattr(e, "status_code", None)
    )


class GroupClient:
    """Create/describe/modify/delete/wait for Ray resource groups of one AnalyticDB cluster."""

    def __init__(
        self,
        cluster_id: str,
        region: str = DEFAULT_REGION,
        endpoint: str | None = None,
        access_key_id: str | None = None,
        access_key_secret: str | None = None,
        retries: int = 4,
        backoff_s: float = 1.0,
        log=None,
    ):
        from alibabacloud_adb20211201.client import Client

        if not cluster_id:
            raise ApiError("a cluster id (amv-...) is required")
        self.cluster_id, self.region = cluster_id, region
        self.retries, self.backoff_s = retries, backoff_s
        self.log = log or (lambda m: print(m, file=sys.stderr))
        self.client = Client(sdk_config(region, endpoint, access_key_id, access_key_secret))

    def _call(self, method: str, request, failures: list | None = None) -> dict:
        """One API call with retries of transient errors (each retried error is added to ``failures``)."""
        for attempt in range(self.retries + 1):
            try:
                return getattr(self.client, method)(request).body.to_map()
            except Exception as e:  # noqa: BLE001 - the SDK raises its own exception tree; normalise it
                err = _one_line(e)
                transient = (
                    err.code.startswith(RETRYABLE_CODES)
                    or (err.status or 0) >= 500
                    or type(e).__name__ in ("ConnectionError", "RetryError")
                )
                if not transient or attempt == self.retries:
                    raise err from None
                if failures is not None:
                    failures.append(err)
                delay = self.backoff_s * 2**attempt
                self.log(f"{err.code}: retrying in {delay:.0f}s ({attempt + 1}/{self.retries})")
                time.sleep(delay)
        raise AssertionError("unreachable")

    def create(self, spec: ResourceGroupSpec, token: str | None) -> dict:
        """CreateDBResourceGroup; returns the response body (RequestId).

        An attempt whose answer is lost (5xx, dropped connection) may still have created the group,
        so its retry gets ``Duplicate``. When the group did not exist before this call, that group
        is this call's (with ``token``): create succeeds and the caller stores the token. A group
        that existed before stays a ``Duplicate`` error.
        """
        existed = self._exists(spec.name)
        failures: list[ApiError] = []
        request = build_request(spec, self.cluster_id, self.region, token)
        try:
            return self._call("create_dbresource_group", request, failures)
        except ApiError as e:
            lost = any(f.status is None or f.status >= 500 for f in failures)
            if e.code != "InvalidDBResourceGroup.Duplicate" or existed or not lost:
                raise
            try:
                self.describe(spec.name)
            except ApiError:
                raise e from None
            self.log(f"group {spec.name} was already created by the attempt whose answer was lost")
            return {"RequestId": e.request_id}

    def _exists(self, name: str) -> bool:
        """Whether the group exists now (DescribeDBResourceGroup)."""
        try:
            self.describe(name)
        except ApiError as e:
            if e.code == "InvalidDBResourceGroup.NotFound":
                return False
            raise
        return True

    def describe(self, name: str) -> dict:
        """The group's GroupsInfo entry (Status, RayConfig with addresses); ApiError if absent."""
        from alibabacloud_adb20211201 import models

        body = self._call(
            "describe_dbresource_group",
            models.DescribeDBResourceGroupRequest(
                dbcluster_id=self.cluster_id, group_name=name, region_id=self.region
            ),
        )
        for info in body.get("GroupsInfo") or []:
            if info.get("GroupName") == name:
                return info
        raise ApiError(
            f"InvalidDBResourceGroup.NotFound: no resource group {name!r} in {self.cluster_id} "
            f"(request id {body.get('RequestId')})",
            code="InvalidDBResourceGroup.NotFound",
            request_id=body.get("RequestId", ""),
        )

    def list(self) -> list[dict]:
        """Every group of the cluster (DescribeDBResourceGroup without a name)."""
        from alibabacloud_adb20211201 import models

        body = self._call(
            "describe_dbresource_group",
            models.DescribeDBResourceGroupRequest(dbcluster_id=self.cluster_id, region_id=self.region),
        )
        return body.get("GroupsInfo") or []

    def modify(self, spec: ResourceGroupSpec) -> dict:
        """ModifyDBResourceGroup with the spec's RayConfig (worker counts, specs, requirements)."""
        from alibabacloud_adb20211201 import models

        req = models.ModifyDBResourceGroupRequest().from_map(
            {
                "DBClusterId": self.cluster_id,
                "GroupName": spec.name,
                "GroupType": "Job",
                "RegionId": self.region,
                "RayConfig": ray_config(spec, None),
            }
        )
        return self._call("modify_dbresource_group", req)

    def delete(self, name: str) -> dict:
        from alibabacloud_adb20211201 import models

        return self._call(
            "delete_dbresource_group",
            models.DeleteDBResourceGroupRequest(dbcluster_id=self.cluster_id, group_name=name),
        )

    def wait(self, name: str, timeout: float = 1200, interval: float = 2.0, log=None) -> dict:
        """Poll DescribeDBResourceGroup until Status is ``ok``; ApiError on a failed state or timeout."""
        deadline, last = time.time() + timeout, None
        while True:
            info = self.describe(name)
            status = str(info.get("Status", "")).lower()
            if status != last and status != READY and log:
                log(f"group {name}: {status}")
            last = status
            if status == READY:
                return info
            if status in FAILED_STATES:
                raise ApiError(
                    f"group {name} is {status}: {info.get('Message') or 'no message'}", code=status
                )
            if time.time() > deadline:
                raise ApiError(f"group {name} still {status} after {timeout:.0f}s", code="Timeout")
            time.sleep(interval)


def spec_from_ray_config(name: str, rc: dict) -> ResourceGroupSpec:
    """A RayConfig map (request or Describe form) -> a validated spec; ConfigError if invalid."""
    from pipelines.config import ConfigError, validate

    if not isinstance(rc, dict):
        raise ConfigError("RayConfig must be a JSON object")
    groups = rc.get("WorkerGroups") or []
    if not isinstance(groups, list) or not groups or not all(isinstance(g, dict) for g in groups):
        raise ConfigError("RayConfig.WorkerGroups must list at least one worker group")

    def disk(value, where):
        text = str(value if value not in (None, "") else 100)
        if not text.isdigit():
            raise ConfigError(f"RayConfig: {where}: {text!r} is not a size in GB")
        return int(text)

    data = {
        "name": name,
        "category": rc.get("Category") or "BASIC",
        "head": {
            "spec": rc.get("HeadSpec") or "small",
            "disk_gb": disk(rc.get("HeadDiskCapacity"), "HeadDiskCapacity"),
        },
        "worker_groups": [
            {
                "name": g.get("GroupName"),
                "type": g.get("WorkerSpecType") or "CPU",
                "spec": g.get("WorkerSpecName"),
                "disk_gb": disk(g.get("WorkerDiskCapacity"), f"WorkerGroups.{i}.WorkerDiskCapacity"),
                "min_workers": g.get("MinWorkerQuantity"),
                "max_workers": g.get("MaxWorkerQuantity"),
                **({"distribution_unit": g["AllocateUnit"]} if g.get("AllocateUnit") else {}),
            }
            for i, g in enumerate(groups)
        ],
        "requirements": [
            r
            for r in str(rc.get("UserDefinedRequirements") or "").splitlines()
            if r.strip() and not r.strip().startswith("#")
        ],
    }
    mounts = rc.get("StorageMounts") or []
    oss = [m["StorageName"] for m in mounts if isinstance(m, dict) and str(m.get("StorageName", "")).startswith("oss://")] \
        if isinstance(mounts, list) else []
    if oss:
        data["storage"] = oss[0]
    return validate(ResourceGroupSpec, data, source="RayConfig")


def addresses(info: dict) -> dict:
    """Dashboard, ray:// and Grafana addresses from a GroupsInfo entry."""
    rc = info.get("RayConfig") or {}
    return {
        "dashboard": rc.get("RayDashboardAddress"),
        "cluster": rc.get("RayClusterAddress"),
        "grafana": rc.get("RayGrafanaAddress"),
        "serve": rc.get("RayServePublicAddress"),
    }


def dumps(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=False)
