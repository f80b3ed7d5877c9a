"""The working dir a job uploads: what is excluded, how big it is, and whether it holds secrets."""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path

MB = 1024 * 1024
# gitignore-style patterns, passed to Ray's runtime_env["excludes"] as well
EXCLUDES = [
    ".git",
    ".venv",
    "venv",
    "runs",
    "data",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    ".mypy_cache",
    "*.egg-info",
    ".adbray",
    ".devbundle",
    "node_modules",
    ".ipynb_checkpoints",
    "*.pyc",
    "*.parquet",
    "*.csv",
    "*.tsv",
    "*.npy",
    "*.npz",
    "*.pt",
    "*.pth",
    "*.ckpt",
    "*.safetensors",
    "*.bin",
    "*.onnx",
    "*.tar",
    "*.tar.gz",
    "*.tgz",
    "*.zip",
    "*.mp4",
    "*.avi",
    "*.mkv",
    "*.wav",
    "*.flac",
]
SECRET_PATTERNS = [
    ".env",
    ".env.*",
    "*.pem",
    "*.key",
    "*.p12",
    "*.pfx",
    "*.jks",
    "id_rsa*",
    "id_ed25519*",
    "id_ecdsa*",
    ".netrc",
    ".pgpass",
    ".my.cnf",
    "credentials",
    "credentials.*",
    "*.credentials",
    "*_token",
    "*.token",
    "auth_token",
    "secrets.*",
    "service-account*.json",
]
DEFAULT_MAX_UPLOAD_MB = float(os.environ.get("ADBRAY_MAX_UPLOAD_MB", "100"))


class WorkdirError(ValueError):
    """The working dir must not be uploaded as it is."""


def _matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatch(name, p) for p in patterns)


def files(root: Path, excludes=EXCLUDES) -> list[tuple[Path, int]]:
    """(relative path, size) of every file that would be uploaded."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not _matches(d, excludes))
        for name in sorted(filenames):
            path = Path(dirpath, name)
            if _matches(name, excludes) or path.is_symlink():
                continue
            out.append((path.relative_to(root), path.stat().st_size))
    return out


def secrets_in(listing) -> list[Path]:
    """Files whose names look like secrets (.env, *.pem, credential and token files)."""
    return [p for p, _ in listing if _matches(p.name, SECRET_PATTERNS)]


def check(root: Path, max_mb: float = DEFAULT_MAX_UPLOAD_MB, allow_secrets: bool = False) -> dict:
    """Size and secret checks before upload; WorkdirError (one line) when either fails."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise WorkdirError(f"working dir {root} does not exist")
    listing = files(root)
    total = sum(size for _, size in listing)
    if total > max_mb * MB:
        largest = sorted(listing, key=lambda x: -x[1])[:5]
        shown = ", ".join(f"{p} ({s / MB:.1f} MB)" for p, s in largest)
        raise WorkdirError(
            f"working dir {root} is {total / MB:.1f} MB, over the {max_mb:g} MB upload limit; "
            f"largest: {shown} (move data to object storage or exclude it)"
        )
    found = secrets_in(listing)
    if found and not allow_secrets:
        shown = ", ".join(str(p) for p in found[:5])
        raise WorkdirError(
            f"refusing to upload files that look like secrets: {shown} (remove them, or pass --allow-secrets)"
        )
    return {"root": str(root), "files": len(listing), "bytes": total, "excludes": list(EXCLUDES)}
