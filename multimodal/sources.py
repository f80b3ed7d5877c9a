"""Sources and routing: list files (folder, oss:// / s3:// prefix, or a manifest with the user's
label/metadata columns) and route them
to a modality by extension AND magic bytes, so a ``.jpg`` holding text is caught.

Listing produces only paths and sizes; bytes are read later, one file at a time, inside
Ray tasks, so a large folder streams through in bounded memory.
"""
from __future__ import annotations

import os
import posixpath
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.config import redact
from pipelines.input import REASON, InputError, column
from pipelines.io import filesystem_for, first_line, is_remote

EXTENSIONS = {
    "images": {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"},
    "video": {".mp4", ".mov", ".m4v", ".avi", ".mkv", ".webm"},
    "audio": {".wav", ".flac", ".ogg", ".oga", ".mp3", ".m4a", ".aac"},
    "text": {".txt", ".jsonl"},
}
AUDIO_BRANDS = {b"M4A ", b"M4B ", b"M4P ", b"F4A ", b"F4B "}  # ISO-BMFF major brands of audio-only files
ROUTED_SCHEMA = pa.schema([
    ("path", pa.string()), ("size", pa.int64()), ("modality", pa.string()),
    ("format", pa.string()), ("reason", pa.string()),
])


# ------------------------------------------------------------------ file access
def read_head(uri: str, n: int, endpoint: str | None = None) -> bytes:
    """The first ``n`` bytes of a file."""
    fs, path = filesystem_for(uri, endpoint)
    with fs.open_input_file(path) as f:
        return f.read(n)


class FileTooLarge(ValueError):
    """A file over the size cap of its stage (reason ``too_large: ...``)."""


def read_bytes(uri: str, endpoint: str | None = None, max_bytes: int | None = None) -> bytes:
    """The whole file (use for images and text; video and audio are read from a local path).

    With ``max_bytes``, a larger file is a FileTooLarge, checked before anything is read.
    """
    fs, path = filesystem_for(uri, endpoint)
    with fs.open_input_file(path) as f:
        if max_bytes is not None and f.size() > max_bytes:
            raise FileTooLarge(f"too_large: {f.size()} bytes, over the {max_bytes}-byte cap")
        return f.read()


@contextmanager
def local_path(uri: str, endpoint: str | None = None):
    """A local filename for ``uri`` (for decoders that only open files: OpenCV, libsndfile): the
    path itself, or a streamed copy of a remote object in a temp folder of the calling process,
    i.e. on the node that decodes it (call this inside the Ray task, never on the driver)."""
    fs, path = filesystem_for(uri, endpoint)
    if isinstance(fs, pafs.LocalFileSystem):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="mm-src-") as tmp:
        local = os.path.join(tmp, "data" + posixpath.splitext(path)[1])
        with open(local, "wb") as out, fs.open_input_stream(path) as src:
            shutil.copyfileobj(src, out, length=4 << 20)
        yield local


# ---------------------------------------------------------------------- listing
def list_files(source: str, endpoint: str | None = None) -> pa.Table:
    """All regular files under a folder or object-store prefix: ``path``, ``size`` (sorted).

    Dot-files and dot-folders are skipped.
    """
    fs, root = filesystem_for(source, endpoint)
    root = root.rstrip("/") or "/"
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"input not found: {source}")
    if info.type == pafs.FileType.File:
        infos = [info]
    else:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    rows = []
    for i in infos:
        if i.type != pafs.FileType.File:
            continue
        rel = i.path[len(root):] if i.path.startswith(root) else i.base_name
        if any(part.startswith(".") for part in rel.split("/") if part):
            continue
        rows.append((_uri_for(source, i.path), int(i.size or 0)))
    rows.sort()
    return pa.table({"path": [r[0] for r in rows], "size": [r[1] for r in rows]},
                    schema=pa.schema([("path", pa.string()), ("size", pa.int64())]))


def _uri_for(source: str, fs_path: str) -> str:
    scheme = urlparse(source).scheme
    return f"{scheme}://{fs_path}" if scheme in ("oss", "s3") else fs_path


MANIFEST_SCHEMA = pa.schema([
    column("path", pa.string(), "the media file: a local path, `oss://` or `s3://` URI; a relative path is "
                                "resolved against the manifest's folder; its extension says the modality"),
    column("size", pa.int64(), "file size in bytes (read from storage when empty or absent)", required=False),
])
MANIFEST_STAGE = "manifest"


@dataclass
class Manifest:
    """A manifest read on the driver: the usable ``files`` (``path``, ``size``; -1 = unknown), the user's
    other columns for each of them (``extras``: ``path`` + those columns, same rows as ``files``), the
    ``rejects`` records of unusable rows, and ``rows`` (all data rows read)."""

    files: pa.Table
    extras: pa.Table
    rejects: list[dict]
    rows: int
    _index: dict | None = field(default=None, init=False, repr=False)

    def carried(self, paths) -> pa.Table:
        """The user's columns (without ``path``) for each of ``paths`` (in that order; repeats allowed)."""
        if self._index is None:
            self._index = {p: i for i, p in enumerate(self.extras.column("path").to_pylist())}
        rows = pa.array([self._index[str(p)] for p in paths], pa.int64())
        return self.extras.drop_columns(["path"]).take(rows)

    def extra_fields(self) -> list[pa.Field]:
        return [f for f in self.extras.schema if f.name != "path"]


def read_manifest(inp, reserved=frozenset(), endpoint: str | None = None) -> Manifest:
    """The manifest ``inp.path`` (a Parquet/CSV file or folder, or ``inp.table`` of ``mysql://``), read
    on the driver, mapped with ``inp.columns`` onto :data:`MANIFEST_SCHEMA`.

    Every other column is carried (as ``manifest_<name>`` when ``reserved``, i.e. an output column,
    has that name). A row whose path is empty or whose size is not a number, or that repeats an
    earlier row's path, is a reject (stage ``manifest``) named ``<manifest file>#row=<n>`` (n counts
    data rows from 1). InputError (one line, naming the column and the file) when the path column
    is missing."""
    from pipelines.input import conform, user_names

    endpoint = endpoint or getattr(inp, "endpoint", None)
    mapping = user_names(MANIFEST_SCHEMA, inp.columns)
    tables, ids = [], []
    for where, table, local in _manifest_tables(inp, endpoint):
        user = mapping["path"]
        if user not in table.column_names:
            hint = f" (your {user!r}, from input.columns)" if user != "path" else \
                "; map yours with --set input.columns.path=YOUR_COLUMN"
            raise InputError(f"input.path {where}: no column {user!r} for the required 'path'{hint} "
                             f"(columns there: {', '.join(table.column_names[:20])})")
        if local is not None:
            table = _resolve_paths(table, user, local)
        tables.append(table)
        ids += [f"{where}#row={i + 1}" for i in range(table.num_rows)]
    if not tables:
        raise InputError(f"input.path {redact(inp.path)}: no manifest files")
    try:
        raw = pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise InputError(f"input.path {redact(inp.path)}: its files' columns differ: {first_line(e)}") from None
    used = set(mapping.values())
    renames = {c: f"manifest_{c}" if c in reserved else c for c in raw.column_names if c not in used}
    raw = raw.rename_columns([renames.get(c, c) for c in raw.column_names])
    extras = list(renames.values())
    table = conform(raw, MANIFEST_SCHEMA, mapping, carry=extras)
    rejects, first_row, keep = [], {}, []
    for i, (path, reason) in enumerate(zip(table.column("path").to_pylist(), table.column(REASON).to_pylist())):
        if reason is None and path in first_row:
            reason = f"path {path} is listed again (first at {ids[first_row[path]]})"
        if reason is not None:
            rejects.append({"path": ids[i], "modality": None, "stage": MANIFEST_STAGE, "reason": reason})
            continue
        first_row[path] = i
        keep.append(i)
    good = table.take(pa.array(keep, pa.int64()))
    files = pa.table({"path": good.column("path"), "size": pc.fill_null(good.column("size"), -1)},
                     schema=pa.schema([("path", pa.string()), ("size", pa.int64())]))
    carried = pa.table({"path": good.column("path"), **{c: good.column(c) for c in extras}})
    return Manifest(files, carried, rejects, table.num_rows)


def _manifest_tables(inp, endpoint: str | None):
    """``(where, table, folder for relative paths or None)`` for each file of the manifest (or its
    MySQL table), in order."""
    from pipelines.input import mysql_url, source_format

    fmt = source_format(inp.path, inp.format)
    if fmt == "mysql":
        from pipelines.io import mysql_connect, sql_table

        where = f"{redact(inp.path)} table {inp.table}"
        if not inp.table:
            raise InputError(f"input.path {redact(inp.path)} is MySQL: set input.table")
        try:
            conn = mysql_connect(mysql_url(inp.path))
            try:
                with conn.cursor() as cur:
                    cur.execute(f"SELECT * FROM {sql_table(inp.table, 'input.table')}")
                    names = [d[0] for d in cur.description]
                    rows = list(cur.fetchall())
            finally:
                conn.close()
        except Exception as e:  # noqa: BLE001 - the user's database: one line naming it
            raise InputError(f"input {where}: {first_line(e)}") from None
        values = {n: [r[n] if isinstance(r, dict) else r[i] for r in rows] for i, n in enumerate(names)}
        yield where, pa.table(values) if names else pa.table({}), None
        return
    try:
        listed = list_files(inp.path, endpoint).column("path").to_pylist()
    except FileNotFoundError:
        raise InputError(f"input.path {redact(inp.path)}: not found") from None
    for uri in listed:
        if posixpath.basename(uri).startswith("_"):
            continue  # _SUCCESS, _metadata
        fs, where = filesystem_for(uri, endpoint)
        try:
            if fmt == "csv":
                with fs.open_input_stream(where, compression="detect") as f:
                    table = pacsv.read_csv(f)
            else:
                table = pq.read_table(where, filesystem=fs)
        except (OSError, pa.ArrowInvalid) as e:
            raise InputError(f"input.path {uri}: cannot read it as {fmt}: {first_line(e)}") from None
        folder = uri.rsplit("/", 1)[0] if is_remote(uri) else os.path.dirname(os.path.abspath(uri))
        yield uri, table, folder


def _resolve_paths(table: pa.Table, column_name: str, folder: str) -> pa.Table:
    """``column_name``'s relative paths joined onto ``folder`` (the manifest file's folder)."""
    col = table.column(column_name)
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        return table

    def resolve(p):
        if p is None or not p.strip() or is_remote(p) or os.path.isabs(p):
            return p
        return f"{folder}/{p}" if is_remote(folder) else os.path.normpath(os.path.join(folder, p))

    values = pa.array([resolve(p) for p in col.to_pylist()], col.type)
    return table.set_column(table.column_names.index(column_name), column_name, values)


# ---------------------------------------------------------------------- routing
def sniff(head: bytes) -> tuple[str | None, str]:
    """Modality and format from magic bytes: ``("images", "jpeg")``, ``("text", "text")``,
    or ``(None, "unknown")``."""
    if head.startswith(b"\xff\xd8\xff"):
        return "images", "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "images", "png"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "images", "gif"
    if head.startswith(b"BM") and len(head) >= 14:
        return "images", "bmp"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "images", "tiff"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "images", "webp"
    if head.startswith(b"RIFF") and head[8:12] == b"WAVE":
        return "audio", "wav"
    if head.startswith(b"RIFF") and head[8:12] == b"AVI ":
        return "video", "avi"
    if head.startswith(b"fLaC"):
        return "audio", "flac"
    if head.startswith(b"OggS"):
        return "audio", "ogg"
    if head.startswith(b"ID3"):
        return "audio", "mp3"
    if head.startswith(b"\xff\xfe"):  # a UTF-16/32 LE byte-order mark (also an MPEG-1 Layer I sync, which is rare)
        return "text", "text"
    if len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0:  # MPEG audio frame sync
        return "audio", ("aac" if head[1] & 0x06 == 0 else "mp3")   # layer bits 00: AAC in ADTS
    if head[4:8] == b"ftyp":
        return ("audio", "m4a") if head[8:12] in AUDIO_BRANDS else ("video", "mp4")
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "video", "matroska"
    if looks_like_text(head):
        return "text", "text"
    return None, "unknown"


def looks_like_text(head: bytes) -> bool:
    """No NUL bytes (unless a UTF-16 BOM) and mostly printable: plausibly text."""
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        return True
    if b"\x00" in head:
        return False
    control = sum(1 for b in head if b < 32 and b not in (9, 10, 13, 12, 27))
    return control <= len(head) * 0.05


def route_one(path: str, size: int, head: bytes) -> dict:
    """One routed record: modality/format, or a ``reason`` when the file is rejected."""
    ext = posixpath.splitext(urlparse(path).path if is_remote(path) else path)[1].lower()
    want = next((m for m, exts in EXTENSIONS.items() if ext in exts), None)
    rec = {"path": path, "size": size, "modality": want, "format": None, "reason": None}
    if want is None:
        rec["reason"] = f"unsupported extension {ext or '(none)'!r}"
        return rec
    if size == 0 or not head:
        rec["reason"] = "empty file (0 bytes)"
        return rec
    found, fmt = sniff(head)
    if want == "audio" and fmt == "mp4":  # an ISO-BMFF file of a generic brand: .m4a says audio
        found, fmt = "audio", "m4a"
    rec["format"] = fmt
    if found != want:
        what = "text" if found == "text" else (f"{found} ({fmt})" if found else "unrecognised bytes")
        rec["reason"] = f"extension {ext} says {want} but content is {what} (magic {head[:8].hex()})"
    return rec


class Router:
    """``map_batches`` stage: read a few bytes of each file and route it."""

    def __init__(self, sniff_bytes: int = 64, endpoint: str | None = None):
        self.sniff_bytes = sniff_bytes
        self.endpoint = endpoint

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = []
        for path, size in zip(batch.column("path").to_pylist(), batch.column("size").to_pylist()):
            try:
                head = read_head(path, self.sniff_bytes, self.endpoint)
                if size is None or size < 0:
                    size = _size_of(path, self.endpoint)
                out.append(route_one(path, size, head))
            except (OSError, ValueError) as e:
                out.append({"path": path, "size": size, "modality": None, "format": None,
                            "reason": f"cannot read: {e}"})
        return pa.Table.from_pylist(out, schema=ROUTED_SCHEMA)


def _size_of(uri: str, endpoint: str | None) -> int:
    fs, path = filesystem_for(uri, endpoint)
    return int(fs.get_file_info(path).size or 0)


def blocks(table: pa.Table, rows_per_block: int) -> list[pa.Table]:
    """Split a table into blocks of ``rows_per_block`` rows (at least one, possibly empty)."""
    n = table.num_rows
    return [table.slice(i, rows_per_block) for i in range(0, n, rows_per_block)] or [table]
