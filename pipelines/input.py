"""Bring your own data: the ``input`` config section every template shares, and reading it.

A template declares what it reads as a pyarrow schema (:func:`column` fields: type, required or
not, what it is used for). The user points ``input.path`` at a Parquet or CSV file or folder, an
``oss://``/``s3://`` prefix, or ``mysql://host:port/db`` (+ ``input.table``; the password from
``$MYSQL_PWD`` or ``$ADBRAY_MYSQL_PASSWORD_FILE``, never the command line), and maps their column
names onto the template's with ``input.columns`` (``{template_name: user_name}``).

- :func:`check_input` reads only the column names (a Parquet footer, a CSV header, ``LIMIT 0``) and
  raises :class:`InputError`, one line naming the missing column and the file, before any cluster work.
- :func:`read_input` is the lazy Ray Dataset of the source, renamed to the template's names and cast
  to its types; a row whose value cannot be read as its column's type, or whose required column is
  empty, is kept with a ``reject_reason`` instead of failing the run.
- :func:`split_rejects` separates those rows into the run's ``rejects`` records.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Literal
from urllib.parse import urlparse

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from .config import StrictModel, redact
from .io import first_line

REASON = "reject_reason"
FORMATS = ("parquet", "csv", "mysql")


class InputError(ValueError):
    """The user's input cannot be used as configured (one line)."""


class InputConfig(StrictModel):
    """The ``input`` section: where the user's data is and how its columns map onto the template's."""

    path: str | None = Field(None, description="file, folder, oss:// prefix or mysql://host:port/db; "
                                               "unset: the template generates its own data")
    format: Literal["parquet", "csv", "mysql"] | None = Field(None, description="inferred from path")
    table: str | None = Field(None, description="the MySQL table (format mysql)")
    columns: dict[str, str] = Field(default_factory=dict,
                                    description="template column -> your column, e.g. {user_id: uid}")
    max_reject_ratio: float = Field(0.05, ge=0, le=1, description="fail the run (after writing) above this "
                                                                   "share of rejected input rows")

    def is_table(self, path: str) -> bool:
        """Whether ``path`` is a table to check against the template's schema before any cluster work
        (always, here; a template whose input may also be a folder of other files, e.g. multimodal's
        media files, says which paths are tables)."""
        return True

    def workers_read(self, path: str) -> bool:
        """Whether the cluster's workers read ``path`` (a local one must then be on a disk they share);
        a template that reads an input on the driver only (multimodal's manifest) says so."""
        return True


def column(name: str, type_: pa.DataType, doc: str, required: bool = True) -> pa.Field:
    """One column of a template's input schema; ``doc`` says what it is, its unit and what it is used for."""
    return pa.field(name, type_, nullable=not required, metadata={"doc": doc})


def is_required(field: pa.Field) -> bool:
    return not field.nullable


def schema_markdown(schema: pa.Schema) -> str:
    """The schema as a Markdown table (for a template's guide)."""
    rows = ["| column | type | required | meaning |", "|---|---|---|---|"]
    for f in schema:
        doc = (f.metadata or {}).get(b"doc", b"").decode()
        rows.append(f"| `{f.name}` | {f.type} | {'yes' if is_required(f) else 'no'} | {doc} |")
    return "\n".join(rows)


# ------------------------------------------------------------------ where and what
def is_mysql(path: str, fmt: str | None = None) -> bool:
    """Whether the source is a MySQL table (``format: mysql`` or a ``mysql://`` URL); no I/O."""
    return fmt == "mysql" or (not fmt and urlparse(str(path)).scheme in ("mysql", "mysql+pymysql"))


def source_format(path: str, fmt: str | None = None, files: list[str] | None = None) -> str:
    """``parquet``, ``csv`` or ``mysql``: the configured format, else inferred from the path (a folder's
    files are listed unless ``files`` already holds them)."""
    if fmt:
        return fmt
    if is_mysql(path):
        return "mysql"
    if str(path).lower().endswith((".csv", ".csv.gz")):
        return "csv"
    if str(path).lower().endswith(".parquet"):
        return "parquet"
    files = _data_files(path) if files is None else files
    if files and all(f.lower().endswith((".csv", ".csv.gz")) for f in files):
        return "csv"
    return "parquet"


def _data_files(path: str) -> list[str]:
    """The data files of a file or folder (hidden and ``_`` files skipped), as URIs or local paths."""
    import pyarrow.fs as pafs

    from .io import filesystem_for

    fs, where = filesystem_for(path)
    info = fs.get_file_info(where)
    if info.type == pafs.FileType.NotFound:
        raise InputError(f"input.path {redact(path)}: not found")
    if info.type == pafs.FileType.File:
        return [str(path)]
    found = fs.get_file_info(pafs.FileSelector(where, recursive=True))
    base = str(path).rstrip("/")
    return sorted(f"{base}/{f.path[len(where):].lstrip('/')}" for f in found
                  if f.type == pafs.FileType.File and not f.base_name.startswith((".", "_")))


def mysql_url(url: str) -> str:
    """``url`` with the password from ``$MYSQL_PWD`` or ``$ADBRAY_MYSQL_PASSWORD_FILE`` when it has none."""
    p = urlparse(url)
    if p.password is not None:
        return url
    password = os.environ.get("MYSQL_PWD")
    if password is None and os.environ.get("ADBRAY_MYSQL_PASSWORD_FILE"):
        with open(os.environ["ADBRAY_MYSQL_PASSWORD_FILE"]) as f:
            password = f.read().strip()
    if not password:
        return url
    user = p.username or "root"
    return p._replace(netloc=f"{user}:{password}@{p.hostname}{f':{p.port}' if p.port else ''}").geturl()


def source_columns(path: str, fmt: str | None = None, table: str | None = None) -> tuple[list[str], str]:
    """``(column names, where they were read: the first file or the table)`` without reading the data."""
    if is_mysql(path, fmt):
        from .io import mysql_connect, sql_table

        if not table:
            raise InputError(f"input.path {redact(path)} is MySQL: set input.table")
        where = f"{redact(path)} table {table}"
        try:
            conn = mysql_connect(mysql_url(path))
        except Exception as e:  # noqa: BLE001 - the user's database: one line naming it
            raise InputError(f"input {where}: cannot connect: {first_line(e)}") from None
        try:
            with conn.cursor() as cur:
                cur.execute(f"SELECT * FROM {sql_table(table, 'input.table')} LIMIT 0")
                return [d[0] for d in cur.description], where
        except Exception as e:  # noqa: BLE001
            raise InputError(f"input {where}: {first_line(e)}") from None
        finally:
            conn.close()
    files = _data_files(path)
    if not files:
        raise InputError(f"input.path {redact(path)}: no data files")
    fmt = source_format(path, fmt, files)
    first = files[0]
    from .io import filesystem_for

    fs, where = filesystem_for(first)
    try:
        if fmt == "csv":
            import pyarrow.csv as pacsv

            with fs.open_input_stream(where, compression="detect") as f:
                reader = pacsv.open_csv(f, read_options=pacsv.ReadOptions(block_size=1 << 16))
                return list(reader.schema.names), first
        import pyarrow.parquet as pq

        with fs.open_input_file(where) as f:
            return list(pq.read_schema(f).names), first
    except (OSError, pa.ArrowInvalid) as e:
        raise InputError(f"input {first}: cannot read it as {fmt}: {first_line(e)}") from None


def user_names(schema: pa.Schema, columns: dict[str, str]) -> dict[str, str]:
    """``{template column: the user's column}`` for every schema column (unmapped: the same name)."""
    return {name: columns.get(name, name) for name in schema.names}


def check_mapping(columns: dict[str, str], schemas: Sequence[pa.Schema]) -> None:
    """InputError (one line) when ``input.columns`` maps a name no input of the template has."""
    known = [n for schema in schemas for n in schema.names]
    unknown = sorted(set(columns) - set(known))
    if unknown:
        raise InputError(f"input.columns maps {unknown[0]!r}, which is not a column of this template's input "
                         f"(columns: {', '.join(dict.fromkeys(known))})")


def check_input(cfg: InputConfig, schema: pa.Schema, path: str | None = None, what: str = "input.path") -> list[str]:
    """Check that the source has every required column (after ``cfg.columns``); InputError (one line,
    naming the column and the file) otherwise. Returns the source's columns."""
    path = path or cfg.path
    names, where = source_columns(path, cfg.format, cfg.table)
    for name, user in user_names(schema, cfg.columns).items():
        if user not in names and is_required(schema.field(name)):
            hint = f" (your {user!r}, from input.columns)" if user != name else \
                f"; map yours with --set input.columns.{name}=YOUR_COLUMN"
            raise InputError(f"{what} {where}: no column {user!r} for the required {name!r}{hint} "
                             f"(columns there: {', '.join(names[:20])})")
    return names


# ---------------------------------------------------------------- reading
def read_input(cfg: InputConfig, schema: pa.Schema, path: str | None = None, carry: Sequence[str] = (),
               id_columns: Sequence[str] = ()):
    """The source as a lazy Ray Dataset with the template's column names and types, plus ``carry``
    (the user's extra columns kept as they are) and ``reject_reason`` (null for a good row).
    ``id_columns`` name a rejected row in its reason records (default: the first schema column)."""
    import ray

    from .io import filesystem_for, read_mysql, read_parquet, sql_table

    path = path or cfg.path
    fmt = source_format(path, cfg.format)
    names = check_input(cfg, schema, path)
    mapping = user_names(schema, cfg.columns)
    wanted = [u for u in mapping.values() if u in names] + [c for c in carry if c in names]
    if fmt == "mysql":
        select = ", ".join(f"`{c}`" for c in dict.fromkeys(wanted))
        ds = read_mysql(mysql_url(path), f"SELECT {select} FROM {sql_table(cfg.table, 'input.table')}")
    elif fmt == "csv":
        import pyarrow.csv as pacsv

        fs, where = filesystem_for(path)
        as_text = pacsv.ConvertOptions(column_types={c: pa.string() for c in wanted}, strings_can_be_null=True,
                                       include_columns=list(dict.fromkeys(wanted)))
        ds = ray.data.read_csv(where, filesystem=fs, convert_options=as_text)
    else:  # a corrupt file is one line naming it (pipelines.io.read_parquet)
        ds = read_parquet(path).select_columns(list(dict.fromkeys(wanted)))
    return ds.map_batches(conform, batch_format="pyarrow",
                          fn_kwargs={"schema": schema, "mapping": mapping, "carry": list(carry),
                                     "id_columns": list(id_columns) or [schema.names[0]]})


def conform(table: pa.Table, schema: pa.Schema, mapping: dict[str, str], carry: Sequence[str] = (),
            id_columns: Sequence[str] = ()) -> pa.Table:
    """One batch in the template's names and types, ``carry`` columns as they are, ``reject_reason``
    for rows that cannot be used (a value of the wrong type, an empty required column), and ``reject_id``
    (the raw ``id_columns`` joined by ``/``)."""
    n = table.num_rows
    reasons = np.full(n, None, dtype=object)
    out = {}
    for f in schema:
        user = mapping.get(f.name, f.name)
        if user not in table.column_names:
            out[f.name] = pa.nulls(n, f.type)
            if is_required(f):
                reasons[pd.isna(reasons)] = f"no column {user!r}"
            continue
        raw = table.column(user).combine_chunks()
        values, bad = cast_column(raw, f.type)
        label = f.name if user == f.name else f"{f.name} (your {user!r})"
        for i in np.flatnonzero(bad & pd.isna(reasons)):
            reasons[i] = f"{label}: cannot read {_short(raw[i].as_py())} as {f.type}"
        if is_required(f):
            empty = np.asarray(values.is_null().to_numpy(zero_copy_only=False))
            if pa.types.is_string(f.type):
                empty |= np.asarray(pc.fill_null(pc.equal(pc.utf8_trim_whitespace(values), ""), False))
            empty &= pd.isna(reasons)
            reasons[empty] = f"{label} is empty"
        out[f.name] = values
    for c in carry:
        if c in table.column_names and c not in out:
            out[c] = table.column(c).combine_chunks()
    ids = [pc.cast(table.column(mapping.get(c, c)), pa.string()) if mapping.get(c, c) in table.column_names
           else pa.nulls(n, pa.string()) for c in id_columns]  # the raw values: a rejected id may not cast
    ids = [pc.if_else(pc.fill_null(pc.equal(i, ""), True), "?", i) for i in ids]  # a blank id part: '?'
    out["reject_id"] = pc.binary_join_element_wise(*ids, "/") if ids \
        else pa.array([str(i) for i in range(n)], pa.string())
    out[REASON] = pa.array(reasons, pa.string())
    return pa.table(out)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def cast_column(values: pa.Array, type_: pa.DataType) -> tuple[pa.Array, np.ndarray]:
    """``(values as type_, mask of values that could not be read)``: a failed value becomes null.
    Numbers read as timestamps are seconds since the epoch (UTC); text timestamps are ISO 8601."""
    n = len(values)
    if values.type == type_:
        return values, np.zeros(n, bool)
    if pa.types.is_timestamp(type_) and (pa.types.is_timestamp(values.type) or pa.types.is_date(values.type)):
        return pc.cast(values, type_, safe=False), np.zeros(n, bool)  # a finer unit: truncated, not rejected
    numeric_time = pa.types.is_timestamp(type_) and (pa.types.is_integer(values.type)
                                                      or pa.types.is_floating(values.type))
    if not numeric_time:
        try:
            return pc.cast(values, type_, safe=True), np.zeros(n, bool)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            pass
    series = values.to_pandas()
    textual = pd.api.types.is_string_dtype(series) or series.dtype == object
    if textual:  # blank text is a missing value, not a bad one
        series = series.where(~series.astype("string").str.strip().eq("").fillna(False).to_numpy(bool))
    present = series.notna().to_numpy()
    if pa.types.is_timestamp(type_):
        seconds = pd.to_numeric(series, errors="coerce")  # numbers (or numeric text): epoch seconds
        parsed = pd.to_datetime(seconds, unit="s", utc=True, errors="coerce")
        text = present & seconds.isna().to_numpy()
        if text.any():
            parsed[text] = pd.to_datetime(series[text].astype("string").str.strip(), utc=True, errors="coerce",
                                          format="mixed")
        if type_.tz is None:
            parsed = parsed.dt.tz_localize(None)
        result = pa.array(parsed, type=type_, from_pandas=True)
    elif pa.types.is_integer(type_) or pa.types.is_floating(type_):
        number = pd.to_numeric(series.astype("string").str.strip() if textual else series, errors="coerce")
        if pa.types.is_integer(type_):
            number = number.where(number == np.floor(number))
        result = pa.array(number, type=type_, from_pandas=True)
    elif pa.types.is_boolean(type_):
        words = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
        result = pa.array(series.astype("string").str.strip().str.lower().map(words), type=type_, from_pandas=True)
    elif pa.types.is_string(type_) or pa.types.is_large_string(type_):
        result = pa.array(series.astype("string"), type=type_, from_pandas=True)
    else:
        raise InputError(f"input: no reader for {type_} columns")
    bad = present & np.asarray(result.is_null().to_numpy(zero_copy_only=False))
    return result, bad


def split_rejects(ds, stage: str = "input"):
    """``(good rows without the bookkeeping columns, rejects records)`` of a :func:`read_input` Dataset,
    computed once (materialized)."""
    marked = ds.materialize()
    good = marked.map_batches(_good_rows, batch_format="pyarrow")
    rejects = marked.map_batches(_reject_rows, batch_format="pyarrow", fn_kwargs={"stage": stage})
    return good, rejects


def _good_rows(table: pa.Table) -> pa.Table:
    return table.filter(pc.is_null(table[REASON])).drop_columns([REASON, "reject_id"])


def _reject_rows(table: pa.Table, stage: str) -> pa.Table:
    from .io import REJECT_SCHEMA

    bad = table.filter(pc.is_valid(table[REASON]))
    return pa.table({"id": bad["reject_id"], "stage": pa.array([stage] * bad.num_rows, pa.string()),
                     "reason": bad[REASON]}, schema=REJECT_SCHEMA)


def split_table(table: pa.Table, stage: str = "input") -> tuple[pa.Table, pa.Table]:
    """:func:`split_rejects` for one in-memory table (a conformed batch)."""
    return _good_rows(table), _reject_rows(table, stage)


def ingest(cfg: InputConfig, schema: pa.Schema, run, name: str, path: str | None = None, carry: Sequence[str] = (),
           id_columns: Sequence[str] = ()):
    """Read the user's input where it is (``path`` or ``input.path``), validated and in the template's
    shape, and write it as output ``name`` of the run folder (Parquet) with its bad rows as
    ``<name>_rejects``; the StepResult says where the data came from (``outputs["<name>_source"]``) and
    fails the run (after writing) above ``input.max_reject_ratio``."""
    from .io import reject_ratio_failure, write_dataset
    from .template import StepResult

    path = path or cfg.path
    good, rejects = split_rejects(read_input(cfg, schema, path, carry, id_columns), stage=f"input {name}")
    write_dataset(good, run.path(name))
    write_dataset(rejects, run.path(f"{name}_rejects"))
    rows, rejected = good.count(), rejects.count()
    failure = reject_ratio_failure(rejected, rows + rejected, cfg.max_reject_ratio, f"{name} rows",
                                   "input.max_reject_ratio", run.path(f"{name}_rejects"))
    outputs = {name: run.path(name), f"{name}_rejects": run.path(f"{name}_rejects"), f"{name}_source": redact(path)}
    return StepResult(outputs, {f"{name}_rows": rows, f"{name}_rejects": rejected}, rows=rows, rejects=rejected,
                      failure=failure)
