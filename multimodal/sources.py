"""Sources and routing: list files (folder, oss:// / s3:// prefix, manifest) and route them
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
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.io import filesystem_for, is_remote

EXTENSIONS = {
    "images": {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"},
    "video": {".mp4", ".mov", ".m4v", ".avi", ".mkv", ".webm"},
    "audio": {".wav", ".flac", ".ogg", ".oga"},
    "text": {".txt", ".jsonl"},
}
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


def read_manifest(manifest: str, endpoint: str | None = None) -> pa.Table:
    """A Parquet or CSV manifest with a ``path`` column (``size`` optional, -1 = unknown)."""
    fs, path = filesystem_for(manifest, endpoint)
    if manifest.endswith(".csv"):
        with fs.open_input_stream(path) as f:
            table = pacsv.read_csv(f)
    else:
        table = pq.read_table(path, filesystem=fs)
    if "path" not in table.column_names:
        raise ValueError(f"manifest {manifest} has no 'path' column (columns: {table.column_names})")
    paths = [str(p) for p in table.column("path").to_pylist() if p]
    sizes = table.column("size").to_pylist() if "size" in table.column_names else [-1] * len(paths)
    return pa.table({"path": paths, "size": [int(s) if s is not None else -1 for s in sizes]},
                    schema=pa.schema([("path", pa.string()), ("size", pa.int64())]))


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
    if head[4:8] == b"ftyp":
        return "video", "mp4"
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
