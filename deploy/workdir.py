"""The working dir a job uploads: what is excluded, how big it is, and whether it holds secrets.

The listing is what Ray 2.60's uploader packs (``ray._private.runtime_env.packaging``): it walks
the dir with ``runtime_env["excludes"]`` plus every ``.gitignore`` (unless
``RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1``) and ``.rayignore`` on the way, gitignore semantics, and it
follows symlinks. So the size limit and the secret check count exactly the files Ray uploads, using
Ray's own matchers; a symlink that points outside the working dir (or loops) is refused, and a link
is a secret when its name or its target's looks like one. Secret names are gitignore patterns
matched case-insensitively against the path (``.aliyun/config.json`` at any depth).
"""

from __future__ import annotations

import logging
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
# gitignore patterns, matched against the lower-cased path relative to the working dir
SECRET_PATTERNS = [
    ".env",
    ".env.*",
    "*.env",
    ".envrc",
    "*.pem",
    "*.key",
    "*.p12",
    "*.pfx",
    "*.jks",
    "*.keystore",
    "*.ppk",
    "id_rsa*",
    "id_dsa*",
    "id_ecdsa*",
    "id_ed25519*",
    ".ssh/",
    ".netrc",
    ".pgpass",
    ".my.cnf",
    ".git-credentials",
    ".pypirc",
    ".npmrc",
    ".htpasswd",
    ".ossutilconfig",
    "**/.aliyun/config.json",
    "**/.docker/config.json",
    "**/.kube/config",
    "kubeconfig",
    "*.kubeconfig",
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


_QUIET = logging.getLogger("adbray.workdir")
_QUIET.addHandler(logging.NullHandler())
_QUIET.propagate = False


def _secret_spec():
    from ray._private.thirdparty.pathspec import PathSpec

    return PathSpec.from_lines("gitwildmatch", SECRET_PATTERNS)


def is_secret(rel: Path | str) -> bool:
    """Whether a path (relative to the working dir) looks like a secret, whatever its case."""
    return _secret_spec().match_file(str(rel).lower())


def _walk(root: Path, excludes) -> list[tuple[Path, int, Path | None]]:
    """(relative path, size, real relative path when a link leads there, else None) of every file Ray
    would pack."""
    from ray._private.runtime_env.packaging import _get_excludes, get_excludes_from_ignore_files

    include_gitignore = os.environ.get("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "0") != "1"
    matchers = [_get_excludes(root, list(excludes))]
    out: list[tuple[Path, int, Path | None]] = []
    folders: set[Path] = set()  # real paths of the folders being walked: a link back to one loops

    def visit(path: Path) -> None:  # as packaging._dir_travel, links resolved
        new = get_excludes_from_ignore_files(path, include_gitignore=include_gitignore, logger=_QUIET)
        matchers.extend(new)
        try:
            if any(m(path) for m in matchers):
                return
            if path.is_symlink() and _link_target(root, path) is None:  # dangling: Ray skips it
                return
            if path.is_dir():
                real = path.resolve()
                if real in folders:
                    raise WorkdirError(
                        f"refusing to upload symlink {path.relative_to(root)} -> {real}: it loops back into a "
                        "folder that contains it (Ray would walk it forever)"
                    )
                folders.add(real)
                for sub in sorted(path.iterdir()):
                    visit(sub)
                folders.discard(real)
            elif path.is_file():
                rel, real = path.relative_to(root), path.resolve().relative_to(root)
                out.append((rel, path.stat().st_size, real if real != rel else None))
        finally:
            del matchers[len(matchers) - len(new):]

    visit(root)
    return out


def _link_target(root: Path, link: Path) -> Path | None:
    """The link's target relative to the working dir; WorkdirError when it leaves it or loops."""
    rel = link.relative_to(root)
    try:
        target = link.resolve(strict=True)
    except FileNotFoundError:
        return None
    except (RuntimeError, OSError):
        raise WorkdirError(f"refusing to upload symlink {rel}: it loops") from None
    if target != root and root not in target.parents:
        raise WorkdirError(
            f"refusing to upload symlink {rel} -> {target}: it points outside the working dir {root} "
            "(Ray uploads what a link points to; remove it or list it in .rayignore)"
        )
    return target.relative_to(root)


def files(root: Path, excludes=EXCLUDES) -> list[tuple[Path, int]]:
    """(relative path, size) of every file that would be uploaded (what Ray's packaging packs)."""
    return [(p, size) for p, size, _ in _walk(Path(root).resolve(), excludes)]


def secrets_in(listing) -> list[str]:
    """Uploaded files whose path, or whose real path behind a symlink, looks like a secret."""
    spec = _secret_spec()
    found = []
    for entry in listing:
        path, real = entry[0], entry[2] if len(entry) > 2 else None
        linked = real is not None and spec.match_file(str(real).lower())
        if spec.match_file(str(path).lower()) or linked:
            found.append(f"{path} (-> {real})" if linked else str(path))
    return found


def check(root: Path, max_mb: float = DEFAULT_MAX_UPLOAD_MB, allow_secrets: bool = False) -> dict:
    """Size and secret checks before upload; WorkdirError (one line) when either fails."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise WorkdirError(f"working dir {root} does not exist")
    listing = _walk(root, EXCLUDES)
    total = sum(size for _, size, _ in listing)
    if total > max_mb * MB:
        largest = sorted(listing, key=lambda x: -x[1])[:5]
        shown = ", ".join(f"{p} ({s / MB:.1f} MB)" for p, s, _ in largest)
        raise WorkdirError(
            f"working dir {root} is {total / MB:.1f} MB, over the {max_mb:g} MB upload limit; "
            f"largest: {shown} (move data to object storage or exclude it)"
        )
    found = secrets_in(listing)
    if found and not allow_secrets:
        shown = ", ".join(found[:5])
        raise WorkdirError(
            f"refusing to upload files that look like secrets: {shown} (remove them, or pass --allow-secrets)"
        )
    return {"root": str(root), "files": len(listing), "bytes": total, "excludes": list(EXCLUDES)}
