"""Run folders, Parquet with overwrite semantics, object-store URIs, MySQL, rejects.

Everything a template writes goes through here so that a re-run replaces its
outputs instead of duplicating rows: Parquet folders are replaced crash-safely
(:func:`replace_dir`), MySQL rows are upserted on a key the table must have, and
table names from config are checked (:func:`checked_table_name`) before they
reach SQL. An unreadable Parquet file is a one-line :class:`CorruptParquet`
naming the file.
"""
from __future__ import annotations

import ctypes
import errno
import json
import math
import os
import posixpath
import re
import shutil
import time
import uuid
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

REJECT_SCHEMA = pa.schema(
    [("id", pa.string()), ("stage", pa.string()), ("reason", pa.string())]
)


# ---------------------------------------------------------------- run folders
def new_run_id() -> str:
    """A sortable run id: ``YYYYmmdd-HHMMSS-xxxx``."""
    return time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:4]


def runs_root() -> str:
    """Where local run folders go: ``$ADBRAY_RUNS`` or ``runs`` (relative to the working directory)."""
    return os.environ.get("ADBRAY_RUNS", "runs")


def run_dir(template: str, run_id: str | None = None, root: str | None = None) -> str:
    """``<root>/<template>/<run_id>`` (root defaults to ``$ADBRAY_RUNS`` or ``runs``).

    Local folders are created; object-store URIs are returned as given.
    """
    root = root or runs_root()
    path = f"{root.rstrip('/')}/{template}/{run_id or new_run_id()}"
    if not is_remote(path):
        path = str(Path(path).resolve())
        Path(path).mkdir(parents=True, exist_ok=True)
    return path


# ------------------------------------------------------------- object stores
# The AWS SDK inside pyarrow probes the cloud metadata address when it has no keys: never here.
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"


def is_remote(uri: str) -> bool:
    return urlparse(str(uri)).scheme in ("oss", "s3")


class StorageError(ValueError):
    """An object-store URI that cannot be used as configured (one line)."""


def _endpoint_url(endpoint: str) -> tuple[str, str]:
    """``(host[:port], scheme)`` of an endpoint given with or without ``http(s)://``."""
    parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
    return parsed.netloc, parsed.scheme


def _oss_region(host: str) -> str:
    """OSS's region from its endpoint (``oss-cn-hangzhou[-internal].aliyuncs.com`` -> ``cn-hangzhou``)."""
    m = re.search(r"(?:^|\.)oss-([a-z0-9-]+?)(?:-internal)?\.aliyuncs\.com", host)
    return m.group(1) if m else "us-east-1"


def filesystem_for(uri: str, endpoint: str | None = None) -> tuple[pafs.FileSystem, str]:
    """Return ``(filesystem, path)`` for a local path, ``s3://`` or ``oss://`` URI: the one storage
    resolver every read and write goes through.

    ``oss://bucket/key`` is OSS through its S3-compatible API: the endpoint comes from ``endpoint``
    or ``$OSS_ENDPOINT`` (``oss-cn-hangzhou.aliyuncs.com``, or ``http://127.0.0.1:PORT`` for a local
    cluster's stand-in), keys from ``$OSS_ACCESS_KEY_ID``/``$OSS_ACCESS_KEY_SECRET`` (or
    ``$ALIBABA_CLOUD_ACCESS_KEY_ID``/``_SECRET``), the region from ``$OSS_REGION`` or the endpoint.
    Alibaba's endpoints are addressed virtual-host style, custom endpoints path style.
    ``s3://`` uses ``$AWS_ENDPOINT_URL``/``$AWS_ACCESS_KEY_ID``/``$AWS_SECRET_ACCESS_KEY``/``$AWS_REGION``
    when set. Keys are always passed explicitly and ``AWS_EC2_METADATA_DISABLED=true`` is set, so
    the SDK never probes a cloud metadata address.
    """
    parsed = urlparse(str(uri))
    path = f"{parsed.netloc}{parsed.path}".rstrip("/")
    if parsed.scheme == "oss":
        endpoint = endpoint or os.environ.get("OSS_ENDPOINT")
        if not endpoint:
            raise StorageError(f"{uri}: oss:// needs an endpoint: set OSS_ENDPOINT (e.g. "
                               "oss-cn-hangzhou-internal.aliyuncs.com)")
        key, secret, token = oss_credentials(uri)
        host, scheme = _endpoint_url(endpoint)
        aliyun = host.endswith("aliyuncs.com")
        region = os.environ.get("OSS_REGION") or _oss_region(host)
        return _s3(host, scheme, key, secret, token, region, aliyun), path
    if parsed.scheme == "s3":
        endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL")
        host, scheme = _endpoint_url(endpoint) if endpoint else (None, "https")
        key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        return _s3(host, scheme, key, secret, os.environ.get("AWS_SESSION_TOKEN"), region, False), path
    return pafs.LocalFileSystem(), str(Path(uri).resolve())


def oss_credentials(uri: str = "oss://") -> tuple[str, str, str | None]:
    """``(key id, secret, STS token or None)`` for OSS, first found of:

    1. ``$OSS_ACCESS_KEY_ID``/``$OSS_ACCESS_KEY_SECRET`` (+ ``$OSS_SESSION_TOKEN``), then the same from
       ``$ALIBABA_CLOUD_ACCESS_KEY_ID``/``_SECRET`` (+ ``$ALIBABA_CLOUD_SECURITY_TOKEN``);
    2. the Alibaba Cloud credential chain without a metadata probe: RRSA/OIDC
       (``$ALIBABA_CLOUD_OIDC_TOKEN_FILE`` + role and provider ARNs) and the credentials file
       (``$ALIBABA_CLOUD_CREDENTIALS_FILE`` or ``~/.alibabacloud/credentials.ini``, profile
       ``$ALIBABA_CLOUD_PROFILE``; any type the SDK knows: access_key, ram_role_arn, ecs_ram_role, ...);
    3. the node's ECS RAM role, only when ``$ALIBABA_CLOUD_ECS_METADATA`` names it (the SDK's own opt-in).

    StorageError (one line) when none gives keys.
    """
    for key, secret, token in (("OSS_ACCESS_KEY_ID", "OSS_ACCESS_KEY_SECRET", "OSS_SESSION_TOKEN"),
                               ("ALIBABA_CLOUD_ACCESS_KEY_ID", "ALIBABA_CLOUD_ACCESS_KEY_SECRET",
                                "ALIBABA_CLOUD_SECURITY_TOKEN")):
        if os.environ.get(key) and os.environ.get(secret):
            return os.environ[key], os.environ[secret], os.environ.get(token) or None
    providers, tried = _credential_sources(os.environ.get("ALIBABA_CLOUD_CREDENTIALS_FILE"),
                                           os.environ.get("ALIBABA_CLOUD_PROFILE", "default"),
                                           os.environ.get("ALIBABA_CLOUD_OIDC_TOKEN_FILE"),
                                           os.environ.get("ALIBABA_CLOUD_ECS_METADATA"))
    tried = list(tried)
    for provider in providers:
        try:
            found = provider.get_credentials()  # refreshable sources renew their STS tokens themselves
        except Exception as e:  # noqa: BLE001 - each source says why it has nothing; the error lists them
            tried.append(f"{type(provider).__name__}: {first_line(e)}")
            continue
        return found.get_access_key_id(), found.get_access_key_secret(), found.get_security_token() or None
    raise StorageError(f"{uri}: oss:// needs keys: set OSS_ACCESS_KEY_ID and OSS_ACCESS_KEY_SECRET, or give "
                       "an Alibaba Cloud credentials file, RRSA or ALIBABA_CLOUD_ECS_METADATA"
                       + (f" ({'; '.join(tried)})" if tried else ""))


@lru_cache(maxsize=4)
def _credential_sources(profile_file, profile, oidc_token_file, ecs_role) -> tuple[list, tuple[str, ...]]:
    """(the credential chain's sources that never probe a metadata address unless asked, why others could
    not be set up). Kept per configuration, so that their cached STS tokens are reused and renewed."""
    from alibabacloud_credentials.provider import (
        EcsRamRoleCredentialsProvider,
        OIDCRoleArnCredentialsProvider,
        ProfileCredentialsProvider,
    )

    default_file = Path.home() / ".alibabacloud" / "credentials.ini"
    wanted = []
    if oidc_token_file:  # RRSA
        wanted.append((OIDCRoleArnCredentialsProvider, {
            "oidc_token_file_path": oidc_token_file, "role_arn": os.environ.get("ALIBABA_CLOUD_ROLE_ARN"),
            "oidc_provider_arn": os.environ.get("ALIBABA_CLOUD_OIDC_PROVIDER_ARN")}))
    if profile_file or default_file.is_file():
        wanted.append((ProfileCredentialsProvider, {"profile_file": profile_file or str(default_file),
                                                    "profile_name": profile}))
    if ecs_role:
        wanted.append((EcsRamRoleCredentialsProvider, {"role_name": ecs_role}))
    providers, errors = [], []
    for kind, kwargs in wanted:
        try:
            providers.append(kind(**kwargs))
        except Exception as e:  # noqa: BLE001 - a source set up wrongly is reported, the others still tried
            errors.append(f"{kind.__name__}: {first_line(e)}")
    return providers, tuple(errors)


@lru_cache(maxsize=16)
def _s3(host, scheme, key, secret, token, region, virtual) -> pafs.S3FileSystem:
    kwargs = {"endpoint_override": host, "scheme": scheme} if host else {}
    if key:
        kwargs.update(access_key=key, secret_key=secret)
        if token:
            kwargs["session_token"] = token
    return pafs.S3FileSystem(region=region, force_virtual_addressing=virtual, **kwargs)


def join(uri: str, *parts: str) -> str:
    """``uri/part/...`` for local paths and object-store URIs alike."""
    return "/".join([str(uri).rstrip("/"), *(str(p).strip("/") for p in parts)])


def write_bytes(uri: str, data: bytes) -> str:
    """Write one file (parent folders created where the filesystem has them)."""
    fs, path = filesystem_for(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    with fs.open_output_stream(path) as f:
        f.write(data)
    return uri


def read_bytes(uri: str) -> bytes:
    """One file's bytes; FileNotFoundError when it does not exist."""
    fs, path = filesystem_for(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_json(uri: str, value) -> str:
    return write_bytes(uri, json.dumps(value, indent=2, default=str).encode())


def read_json(uri: str):
    return json.loads(read_bytes(uri))


def exists(uri: str) -> bool:
    fs, path = filesystem_for(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def list_files(uri: str) -> list[str]:
    """Every file below a folder (URIs in the folder's own scheme), sorted."""
    fs, path = filesystem_for(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    except FileNotFoundError:
        return []
    return sorted(join(uri, posixpath.relpath(i.path, path)) for i in infos if i.type == pafs.FileType.File)


def upload_dir(local: str, uri: str) -> str:
    """Copy a local folder's files to ``uri`` (any scheme), replacing files of the same name."""
    fs, path = filesystem_for(uri)
    fs.create_dir(path, recursive=True)  # a local destination's folder is not made by copy_files
    pafs.copy_files(str(Path(local).resolve()), path, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs)
    return uri


def download_dir(uri: str, local: str) -> str:
    """Copy the files below ``uri`` into a local folder; returns the local folder."""
    fs, path = filesystem_for(uri)
    Path(local).mkdir(parents=True, exist_ok=True)
    pafs.copy_files(path, str(Path(local).resolve()), source_filesystem=fs,
                    destination_filesystem=pafs.LocalFileSystem())
    return local


def train_storage(uri: str) -> tuple[str, pafs.FileSystem | None]:
    """``(storage_path, storage_filesystem)`` for Ray Train's ``RunConfig`` (``None``: local)."""
    fs, path = filesystem_for(uri)
    return (path, None) if isinstance(fs, pafs.LocalFileSystem) else (path, fs)


# ------------------------------------------------------------------- parquet
def write_table(table: pa.Table, uri: str, name: str = "part-0.parquet") -> str:
    """Write one Arrow table as a Parquet folder, replacing what was there."""
    fs, path = filesystem_for(uri)
    replace_dir(fs, path, lambda tmp: pq.write_table(table, f"{tmp}/{name}", filesystem=fs))
    return uri


def write_dataset(ds, uri: str) -> str:
    """Execute a Ray Dataset into a Parquet folder, replacing what was there.

    The new files are written beside the target and swapped in (:func:`replace_dir`),
    so a failed or interrupted write leaves a complete output behind.
    """
    fs, path = filesystem_for(uri)
    replace_dir(fs, path, lambda tmp: ds.write_parquet(tmp, filesystem=fs))
    return uri


def replace_dir(fs: pafs.FileSystem, path: str, write) -> None:
    """Call ``write(folder)`` on a fresh sibling folder and make its content the new ``path``.

    Crash-safe: whenever this call dies, a complete output (old or new) survives.
    Locally the new folder is swapped in with one atomic exchange (Linux
    ``renameat2``), so ``path`` holds a complete output at every instant; where the
    filesystem cannot exchange, two renames (old -> ``<path>.old-*``, new -> ``path``)
    leave ``path`` absent, never partial, for that instant. Object stores have no
    rename: the new files go under ``<path>.tmp-*``, a ``.ready`` object lists them,
    then they are moved over ``path`` (a reader during that move may see a mix).
    Each call first finishes or undoes what a crashed call on the same ``path``
    left: a ``.ready`` write is moved in, an ``.old-*`` folder is restored when
    ``path`` is gone, other leftovers are deleted. One writer per ``path`` at a time.
    """
    if isinstance(fs, pafs.LocalFileSystem):
        _replace_local(path, write)
    else:
        _replace_store(fs, path, write)


def _leftovers(names: Iterable[str], target: str) -> list[str]:
    """The temp (``.tmp-*``, ``.tmp-*.ready``) and backup (``.old-*``) names of ``target``."""
    pattern = re.compile(re.escape(target) + r"\.(tmp|old)-[0-9a-f]{8}(\.ready)?")
    return sorted(n for n in names if pattern.fullmatch(n))


def _replace_local(path: str, write) -> None:
    _recover_local(path)
    tag = uuid.uuid4().hex[:8]
    tmp = f"{path}.tmp-{tag}"
    Path(tmp).mkdir(parents=True)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not os.path.lexists(path):
        os.replace(tmp, path)
    elif _exchange(tmp, path):
        shutil.rmtree(tmp, ignore_errors=True)  # now the old output
    else:
        old = f"{path}.old-{tag}"
        os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            os.replace(old, path)
            raise
        shutil.rmtree(old, ignore_errors=True)


def _recover_local(path: str) -> None:
    parent, name = os.path.split(path)
    if not os.path.isdir(parent):
        return
    left = _leftovers(os.listdir(parent), name)
    olds = [n for n in left if ".old-" in n]
    if olds and not os.path.lexists(path):  # died between the two renames: the old output is whole
        keep = max(olds, key=lambda n: os.stat(os.path.join(parent, n)).st_mtime)
        os.replace(os.path.join(parent, keep), path)
        left.remove(keep)
    for n in left:
        shutil.rmtree(os.path.join(parent, n), ignore_errors=True)


@lru_cache(maxsize=1)
def _libc():
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def _exchange(a: str, b: str) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    fn = getattr(_libc(), "renameat2", None)
    if fn is None:
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), a)


def _store_files(fs: pafs.FileSystem, folder: str) -> list[str]:
    """Relative names of the files under ``folder`` (none when it does not exist)."""
    infos = fs.get_file_info(pafs.FileSelector(folder, recursive=True, allow_not_found=True))
    return sorted(i.path[len(folder) + 1:] for i in infos if i.type == pafs.FileType.File)


def _delete_store_dir(fs: pafs.FileSystem, folder: str) -> None:
    if fs.get_file_info(folder).type != pafs.FileType.NotFound:
        fs.delete_dir(folder)


def _replace_store(fs: pafs.FileSystem, path: str, write) -> None:
    _recover_store(fs, path)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    fs.create_dir(tmp)
    try:
        write(tmp)
    except BaseException:
        _delete_store_dir(fs, tmp)
        raise
    names = _store_files(fs, tmp)
    with fs.open_output_stream(f"{tmp}.ready") as f:  # from here on the new output wins
        f.write("\n".join(names).encode())
    _promote(fs, tmp, path, names)


def _promote(fs: pafs.FileSystem, tmp: str, path: str, names: list[str]) -> None:
    """Make ``path`` hold exactly ``names``, moved from ``tmp``; safe to repeat after a crash."""
    keep = set(names)
    for name in _store_files(fs, path):
        if name not in keep:
            fs.delete_file(f"{path}/{name}")
    pending = set(_store_files(fs, tmp))
    for parent in sorted({posixpath.dirname(f"{path}/{n}") for n in names if n in pending}):
        fs.create_dir(parent)
    for name in names:
        if name in pending:
            fs.move(f"{tmp}/{name}", f"{path}/{name}")
    _delete_store_dir(fs, tmp)
    fs.delete_file(f"{tmp}.ready")


def _recover_store(fs: pafs.FileSystem, path: str) -> None:
    parent, name = posixpath.split(path)
    infos = fs.get_file_info(pafs.FileSelector(parent, allow_not_found=True))
    left = _leftovers([i.base_name for i in infos], name)
    for ready in (n for n in left if n.endswith(".ready")):
        tmp = f"{parent}/{ready[:-len('.ready')]}"
        with fs.open_input_stream(f"{parent}/{ready}") as f:
            names = [n for n in f.read().decode().split("\n") if n]
        _promote(fs, tmp, path, names)
    for n in left:
        if not n.endswith(".ready") and f"{n}.ready" not in left:
            _delete_store_dir(fs, f"{parent}/{n}")


class CorruptParquet(RuntimeError):
    """A Parquet file that cannot be read (corrupt, truncated, not Parquet); one line naming it."""


_FRAGMENT = re.compile(r"Failed to read fragment (\S+) after")


def first_line(e: BaseException) -> str:
    """An error's first non-empty line (its type's name when it has none), for one-line messages."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


def _parquet_files(fs: pafs.FileSystem, path: str) -> list[str]:
    if fs.get_file_info(path).type == pafs.FileType.File:
        return [path]
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return sorted(i.path for i in infos if i.type == pafs.FileType.File
                  and not i.base_name.startswith((".", "_")))


def find_corrupt_parquet(uri: str, columns: Sequence[str] | None = None) -> CorruptParquet | None:
    """The error for the first unreadable Parquet file under ``uri`` (footers first, then the
    ``columns`` data), or None when every file reads."""
    fs, path = filesystem_for(uri)
    scheme = urlparse(str(uri)).scheme if is_remote(uri) else ""
    files = _parquet_files(fs, path)
    for read_data in (False, True):
        for f in files:
            try:
                with fs.open_input_file(f) as src:
                    pf = pq.ParquetFile(src)
                    if read_data:
                        names = pf.schema_arrow.names
                        pf.read(columns=[c for c in columns if c in names] if columns is not None else None)
            except (pa.ArrowException, OSError) as e:
                return CorruptParquet(f"cannot read Parquet file {scheme + '://' if scheme else ''}{f}: "
                                      f"{first_line(e)}")
    return None


def corrupt_parquet_error(exc: BaseException) -> CorruptParquet | None:
    """The one-line CorruptParquet behind ``exc``, e.g. a Ray Data read task's multi-line
    RayTaskError (Ray 2.60's Parquet reader names the file in it); None for anything else."""
    cause = exc.cause if isinstance(getattr(exc, "cause", None), BaseException) else exc
    if isinstance(cause, CorruptParquet):
        return cause
    if isinstance(cause, FileNotFoundError) or not isinstance(cause, (pa.ArrowException, OSError)):
        return None
    m = _FRAGMENT.search(str(cause))
    return CorruptParquet(f"cannot read Parquet file {m.group(1)}: {first_line(cause)}") if m else None


def read_table(uri: str, columns: Sequence[str] | None = None) -> pa.Table:
    """Read a Parquet file or folder into one Arrow table (an unreadable file: CorruptParquet)."""
    fs, path = filesystem_for(uri)
    return _naming_corrupt_file(uri, columns, lambda: pq.read_table(path, columns=columns, filesystem=fs))


def read_parquet(uri: str, columns: Sequence[str] | None = None, **kwargs):
    """A lazy Ray Dataset over a Parquet file or folder (local, ``oss://``, ``s3://``).

    A file whose footer cannot be read is a CorruptParquet here; one with corrupt data
    pages fails when the Dataset executes, and :func:`corrupt_parquet_error` (used by the
    CLI) turns that task error into the same one line.
    """
    import ray

    fs, path = filesystem_for(uri)
    return _naming_corrupt_file(
        uri, columns, lambda: ray.data.read_parquet(path, columns=columns, filesystem=fs, **kwargs))


def every_cpu_to_work(ds, max_block_mb: int | None = None):
    """``ds`` (and what is derived from it) without Ray Data's per-operator CPU reservation, which holds part of
    the cluster's CPUs back for each operator: with a few operators on a few CPUs that left decode or scoring
    tasks waiting beside idle CPUs (2 cores: 1.25 of 2 decode tasks ran). With ``max_block_mb``, blocks of at
    most that size: Ray Data's 128 MiB default makes a few huge blocks of a small Parquet input, and an actor
    scores a whole block while the others wait. Changes ``ds``'s own copy of the context; returns ``ds``."""
    ds.context.op_resource_reservation_enabled = False
    if max_block_mb is not None:
        ds.context.target_max_block_size = max_block_mb << 20
    return ds


def _naming_corrupt_file(uri: str, columns, read):
    """``read()``; a failed read of a corrupt file becomes a one-line CorruptParquet naming it."""
    try:
        return read()
    except FileNotFoundError:
        raise
    except (pa.ArrowException, OSError):
        bad = find_corrupt_parquet(uri, columns)
        if bad is None:
            raise
        raise bad from None


# ------------------------------------------------------------------- rejects
def reject_ratio_failure(rejected: int, total: int, max_ratio: float, what: str, field: str, where: str) -> str | None:
    """The one-line failure when more than ``max_ratio`` of ``total`` records were rejected, else None
    (a step returns it as ``StepResult.failure``: outputs and the summary first, then exit 1)."""
    if total and rejected / total > max_ratio:
        return f"{rejected} of {total} {what} rejected (> {field} {max_ratio}); see {where}"
    return None


def reject(key: str, stage: str, reason: str, **extra) -> dict:
    """One rejects record: ``id`` (or path), ``stage`` and a one-line ``reason``."""
    reason = str(reason).strip().splitlines()[0] if str(reason).strip() else "unknown error"
    return {"id": str(key), "stage": stage, "reason": reason[:500], **extra}


def rejects_table(records: Iterable[dict], schema: pa.Schema = REJECT_SCHEMA) -> pa.Table:
    """Build an Arrow table of rejects (empty tables keep the schema)."""
    rows = list(records)
    names = schema.names
    return pa.table({n: [r.get(n) for r in rows] for n in names}, schema=schema)


# --------------------------------------------------------------------- MySQL
def mysql_params(url: str) -> dict:
    """``mysql://user:pw@host:port/db`` -> pymysql.connect keyword arguments."""
    p = urlparse(url)
    if p.scheme not in ("mysql", "mysql+pymysql"):
        raise ValueError(f"not a mysql:// URL: {url!r}")
    return {
        "host": p.hostname or "127.0.0.1",
        "port": p.port or 3306,
        "user": p.username or "root",
        "password": p.password or "",
        "database": (p.path or "/").lstrip("/") or None,
        "charset": "utf8mb4",
    }


def mysql_connect(url: str):
    """A pymysql connection (autocommit off) for a ``mysql://`` URL."""
    import pymysql

    return pymysql.connect(**mysql_params(url))


def read_mysql(url: str, query: str, parallelism: int = -1, shard_key: str | None = None):
    """A lazy Ray Dataset over ``query`` with batched reads (``ray.data.read_sql``).

    With ``shard_key`` the read is split into parallel ranged queries.
    """
    import ray

    kwargs = {}
    if shard_key:
        kwargs["shard_keys"] = [shard_key]
        kwargs["shard_hash_fn"] = "CRC32"
    return ray.data.read_sql(query, lambda: mysql_connect(url), override_num_blocks=parallelism
                             if parallelism > 0 else None, **kwargs)


_SQL_TYPES = {
    pa.types.is_boolean: "BOOLEAN",
    pa.types.is_integer: "BIGINT",
    pa.types.is_floating: "DOUBLE",
    pa.types.is_timestamp: "DATETIME(6)",
    pa.types.is_date: "DATE",
}


def _sql_type(t: pa.DataType, is_key: bool) -> str:
    for check, name in _SQL_TYPES.items():
        if check(t):
            return name
    return "VARCHAR(191)" if is_key else "TEXT"


_IDENT = re.compile(r"[A-Za-z0-9_]{1,64}")


def checked_table_name(name: str, field: str = "table") -> str:
    """``name`` when it is a safe MySQL table name (``table`` or ``db.table``, each part
    ``[A-Za-z0-9_]{1,64}``), else a one-line ValueError naming the config ``field``."""
    parts = name.split(".") if isinstance(name, str) else []
    if not 1 <= len(parts) <= 2 or not all(_IDENT.fullmatch(p) for p in parts):
        raise ValueError(f"{field}: invalid table name {name!r} (letters, digits and _, at most 64, "
                         f"optionally db.table)")
    return name


def sql_table(name: str, field: str = "table") -> str:
    """A checked table name quoted for SQL: db.t -> `db`.`t`."""
    return ".".join(f"`{p}`" for p in checked_table_name(name, field).split("."))


def _ident(name: str) -> str:
    if not _IDENT.fullmatch(str(name)):
        raise ValueError(f"unsafe SQL identifier {name!r} (letters, digits and _, at most 64)")
    return f"`{name}`"


def ensure_table(conn, table: str, schema: pa.Schema, key: Sequence[str]) -> None:
    """Create ``table`` from an Arrow schema with a primary key on ``key``, if missing.

    An existing table must have a PRIMARY or UNIQUE key on exactly the ``key`` columns,
    else upserts would add rows instead of replacing them: a one-line ValueError.
    """
    missing = [k for k in key if k not in schema.names]
    if not key or missing:
        raise ValueError(f"upsert key {list(key)} is not among the columns {schema.names}")
    cols = ", ".join(f"{_ident(f.name)} {_sql_type(f.type, f.name in key)}" for f in schema)
    pk = ", ".join(_ident(k) for k in key)
    db, _, name = table.rpartition(".")
    with conn.cursor() as cur:
        cur.execute(f"CREATE TABLE IF NOT EXISTS {sql_table(table)} ({cols}, PRIMARY KEY ({pk}))")
        cur.execute("SELECT INDEX_NAME, COLUMN_NAME FROM information_schema.STATISTICS "
                    "WHERE TABLE_SCHEMA = COALESCE(%s, DATABASE()) AND TABLE_NAME = %s AND NON_UNIQUE = 0",
                    (db or None, name))
        unique: dict[str, set] = {}
        for index, column in cur.fetchall():
            unique.setdefault(index, set()).add(column.lower())
    if {k.lower() for k in key} not in unique.values():
        raise ValueError(f"MySQL table {table} has no PRIMARY or UNIQUE key on ({', '.join(key)}): "
                         f"upserts would duplicate rows; add that key or drop the table")


def upsert_mysql(url: str, table: str, data: pa.Table, key: Sequence[str], batch_rows: int = 1000) -> int:
    """Idempotent write: insert rows, replacing any with the same ``key``.

    The table is created on first use; an existing one must have a PRIMARY or UNIQUE
    key on ``key`` (checked). NaN and +/-inf floats are written as NULL (MySQL has no
    such values). Returns the number of rows written.
    """
    target = sql_table(table)
    conn = mysql_connect(url)
    try:
        ensure_table(conn, table, data.schema, key)
        names = data.schema.names
        cols = ", ".join(_ident(n) for n in names)
        marks = ", ".join(["%s"] * len(names))
        updates = ", ".join(f"{_ident(n)}=VALUES({_ident(n)})" for n in names if n not in key) or \
            f"{_ident(key[0])}={_ident(key[0])}"
        sql = f"INSERT INTO {target} ({cols}) VALUES ({marks}) ON DUPLICATE KEY UPDATE {updates}"
        rows = data.to_pylist()
        with conn.cursor() as cur:
            for i in range(0, len(rows), batch_rows):
                cur.executemany(sql, [tuple(_py(r[n]) for n in names) for r in rows[i:i + batch_rows]])
        conn.commit()
        return len(rows)
    finally:
        conn.close()


def _py(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (list, dict)):
        import json

        return json.dumps(value)
    return value
