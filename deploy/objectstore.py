"""The local OSS stand-in: moto's S3-compatible server on 127.0.0.1, one bucket per local cluster.

OSS speaks the S3 protocol, so a template that reads and writes ``oss://bucket/...`` through
:func:`pipelines.io.filesystem_for` works unchanged against it. The cluster's processes, its
jobs and the drivers that attach get the same variables a real group's jobs read for OSS
(:func:`storage_env`): ``OSS_ENDPOINT``, ``OSS_ACCESS_KEY_ID``, ``OSS_ACCESS_KEY_SECRET``, plus
``ADBRAY_STORAGE`` (the cluster's storage location, where runs go by default).
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

# moto accepts any key; these are fixed so that a job's environment never carries a real one
LOCAL_KEY_ID = "adbray-local"
LOCAL_KEY_SECRET = "adbray-local-secret"


def bucket_name(cluster: str) -> str:
    """A valid bucket name (3-63 of [a-z0-9-]) for a cluster name."""
    name = re.sub(r"[^a-z0-9-]+", "-", f"adbray-{cluster}".lower()).strip("-")
    return name[:63].rstrip("-")


def storage_env(endpoint: str, uri: str) -> dict:
    """What a process needs to use the stand-in as its OSS, with ``uri`` (``oss://bucket/[prefix/]``) as
    the cluster's storage location (see module docstring)."""
    return {"OSS_ENDPOINT": endpoint, "OSS_ACCESS_KEY_ID": LOCAL_KEY_ID, "OSS_ACCESS_KEY_SECRET": LOCAL_KEY_SECRET,
            "OSS_REGION": "us-east-1", "ADBRAY_STORAGE": uri, "AWS_EC2_METADATA_DISABLED": "true"}


def _server_cmd(port: int) -> list[str]:
    script = Path(sys.executable).with_name("moto_server")
    base = [str(script)] if script.is_file() else [sys.executable, "-m", "moto.server"]
    return [*base, "-H", "127.0.0.1", "-p", str(port)]


def start(port: int, env: dict, log_path: Path) -> subprocess.Popen:
    """Start the server (its own session, so it outlives this process) and wait until it answers."""
    if not (shutil.which("moto_server") or Path(sys.executable).with_name("moto_server").is_file()):
        try:
            import moto.server  # noqa: F401
        except ImportError:
            raise RuntimeError("the OSS stand-in needs moto: pip install 'moto[server]'") from None
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(_server_cmd(port), env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    url, deadline = f"http://127.0.0.1:{port}/", time.time() + 30
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the OSS stand-in exited with {proc.returncode} (log: {log_path})")
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"the OSS stand-in did not answer on {url} within 30 s (log: {log_path})")


def create_bucket(endpoint: str, uri: str) -> None:
    """Create the bucket of ``uri`` (``oss://bucket/...``) on the stand-in (idempotent)."""
    import pyarrow.fs as pafs

    fs = pafs.S3FileSystem(access_key=LOCAL_KEY_ID, secret_key=LOCAL_KEY_SECRET, endpoint_override=endpoint,
                           scheme="http", region="us-east-1", allow_bucket_creation=True)
    fs.create_dir(uri.split("://", 1)[1].split("/", 1)[0])
