"""Run folders, Parquet with overwrite semantics, object-store URIs, MySQL, rejects.

Everything a template writes goes through here so that a re-run replaces its
outputs instead of duplicating rows.
"""
from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Iterable, Sequence
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


def run_dir(template: str, run_id: str | None = None, root: str | None = None) -> str:
    """``<root>/<template>/<run_id>`` (root defaults to ``$ADBRAY_RUNS`` or ``runs``).

    Local folders are created; object-store URIs are returned as given.
    """
    root = root or os.environ.get("ADBRAY_RUNS", "runs")
    path = f"{root.rstrip('/')}/{template}/{run_id or new_run_id()}"
    if not is_remote(path):
        path = str(Path(path).resolve())
        Path(path).mkdir(parents=True, exist_ok=True)
    return path


# ------------------------------------------------------------- object stores
def is_remote(uri: str) -> bool:
    return urlparse(str(uri)).scheme in ("oss", "s3")


def filesystem_for(uri: str, endpoint: str | None = None) -> tuple[pafs.FileSystem, str]:
    """Return ``(filesystem, path)`` for a local path, ``s3://`` or ``oss://`` URI.

    ``oss://`` goes through pyarrow's S3-compatible filesystem; the endpoint comes
    from ``endpoint`` or ``$OSS_ENDPOINT`` (e.g. ``oss-cn-hangzhou.aliyuncs.com``),
    credentials from ``$OSS_ACCESS_KEY_ID``/``$OSS_ACCESS_KEY_SECRET`` (or the
    standard ``ALIBABA_CLOUD_*`` variables).
    """
    parsed = urlparse(str(uri))
    if parsed.scheme == "oss":
        endpoint = endpoint or os.environ.get("OSS_ENDPOINT")
        if not endpoint:
            raise ValueError("oss:// needs an endpoint: set OSS_ENDPOINT or io.endpoint")
        key = os.environ.get("OSS_ACCESS_KEY_ID") or os.environ.get("ALIBABA_CLOUD_ACCESS_KEY_ID")
        secret = os.environ.get("OSS_ACCESS_KEY_SECRET") or os.environ.get("ALIBABA_CLOUD_ACCESS_KEY_SECRET")
        fs = pafs.S3FileSystem(
            endpoint_override=endpoint if "://" in endpoint else f"https://{endpoint}",
            access_key=key, secret_key=secret, force_virtual_addressing=True,
        )
        return fs, f"{parsed.netloc}{parsed.path}"
    if parsed.scheme == "s3":
        kwargs = {"endpoint_override": endpoint} if endpoint else {}
        return pafs.S3FileSystem(**kwargs), f"{parsed.netloc}{parsed.path}"
    return pafs.LocalFileSystem(), str(Path(uri).resolve())


# ------------------------------------------------------------------- parquet
def write_table(table: pa.Table, uri: str, name: str = "part-0.parquet") -> str:
    """Write one Arrow table as a Parquet folder, replacing what was there."""
    fs, path = filesystem_for(uri)
    replace_dir(fs, path, lambda tmp: pq.write_table(table, f"{tmp}/{name}", filesystem=fs))
    return uri


def write_dataset(ds, uri: str) -> str:
    """Execute a Ray Dataset into a Parquet folder, replacing what was there.

    Local folders are written beside the target and swapped in, so a failed
    write leaves the previous output intact.
    """
    fs, path = filesystem_for(uri)
    replace_dir(fs, path, lambda tmp: ds.write_parquet(tmp, filesystem=fs))
    return uri


def replace_dir(fs: pafs.FileSystem, path: str, write) -> None:
    """Call ``write(folder)`` and make that folder's content the new ``path``.

    Locally the write goes to a sibling temp folder that is swapped in only on
    success; on object stores the prefix is cleared first.
    """
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        Path(tmp).mkdir(parents=True)
        try:
            write(tmp)
            if Path(path).exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)
    fs.create_dir(path)
    write(path)


def read_table(uri: str, columns: Sequence[str] | None = None) -> pa.Table:
    """Read a Parquet file or folder into one Arrow table."""
    fs, path = filesystem_for(uri)
    return pq.read_table(path, columns=columns, filesystem=fs)


# ------------------------------------------------------------------- rejects
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


def _ident(name: str) -> str:
    if not name.replace("_", "").isalnum():
        raise ValueError(f"unsafe SQL identifier {name!r}")
    return f"`{name}`"


def ensure_table(conn, table: str, schema: pa.Schema, key: Sequence[str]) -> None:
    """Create ``table`` from an Arrow schema with a primary key, if missing."""
    cols = ", ".join(f"{_ident(f.name)} {_sql_type(f.type, f.name in key)}" for f in schema)
    pk = ", ".join(_ident(k) for k in key)
    with conn.cursor() as cur:
        cur.execute(f"CREATE TABLE IF NOT EXISTS {_ident(table)} ({cols}, PRIMARY KEY ({pk}))")


def upsert_mysql(url: str, table: str, data: pa.Table, key: Sequence[str], batch_rows: int = 1000) -> int:
    """Idempotent write: insert rows, replacing any with the same ``key``.

    The table is created on first use. Returns the number of rows written.
    """
    conn = mysql_connect(url)
    try:
        ensure_table(conn, table, data.schema, key)
        names = data.schema.names
        cols = ", ".join(_ident(n) for n in names)
        marks = ", ".join(["%s"] * len(names))
        updates = ", ".join(f"{_ident(n)}=VALUES({_ident(n)})" for n in names if n not in key) or \
            f"{_ident(key[0])}={_ident(key[0])}"
        sql = f"INSERT INTO {_ident(table)} ({cols}) VALUES ({marks}) ON DUPLICATE KEY UPDATE {updates}"
        rows = data.to_pylist()
        with conn.cursor() as cur:
            for i in range(0, len(rows), batch_rows):
                cur.executemany(sql, [tuple(_py(r[n]) for n in names) for r in rows[i:i + batch_rows]])
        conn.commit()
        return len(rows)
    finally:
        conn.close()


def _py(value):
    if isinstance(value, (list, dict)):
        import json

        return json.dumps(value)
    return value
