"""Give a worker raylet its own disk: run a command in a private mount namespace.

``python -m deploy.isolate --mask /tmp --mask RUNS --keep VENV --keep CODE -- ray start ...``
must already run inside ``unshare --mount --propagation private`` (see :func:`command`). Each
``--mask`` folder gets a fresh tmpfs, so what the command (and every process it starts: the
raylet and its workers) writes there is seen by nobody else, as on a separate machine. Each
``--keep`` folder under a mask is bind-mounted back (the code, the venv and the cluster's state
stay readable). Masks are applied shortest path first, so a mask under a kept folder (the
run-folder root inside a checkout under /tmp) is masked again. The command then runs with ``/``
as its working directory (a cwd inside a masked folder would still reach the shared disk).
Ray's object store (/dev/shm), the network (GCS, MariaDB, Redis, the object-storage stand-in)
are untouched.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def unshare_problem() -> str | None:
    """None when this machine can make private mount namespaces, else why not (one line)."""
    if not sys.platform.startswith("linux"):
        return "private mount namespaces need Linux"
    if not shutil.which("unshare"):
        return "the `unshare` command (util-linux) is missing"
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                            "mount -t tmpfs adbray-probe /mnt && umount /mnt"],
                           capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        return f"no private mount namespace here ({(probe.stderr or 'not permitted').strip().splitlines()[-1]})"
    return None


def command(cmd: list[str], masks: list[str], keeps: list[str]) -> list[str]:
    """``cmd`` wrapped so that it runs with ``masks`` private and ``keeps`` shared (see module doc)."""
    args = [a for m in masks for a in ("--mask", m)] + [a for k in keeps for a in ("--keep", k)]
    return ["unshare", "--mount", "--propagation", "private",
            sys.executable, "-m", "deploy.isolate", *args, "--", *cmd]


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True)


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def apply(masks: list[str], keeps: list[str]) -> None:
    """Mount a tmpfs over each mask and bind each kept folder under it back (in this namespace)."""
    hold = tempfile.mkdtemp(prefix=".adbray-hold-", dir="/dev/shm")
    try:
        for i, mask in enumerate(sorted({os.path.realpath(m) for m in masks}, key=len)):
            Path(mask).mkdir(parents=True, exist_ok=True)
            inside = [k for k in sorted({os.path.realpath(k) for k in keeps}, key=len)
                      if _under(k, mask) and k != mask and os.path.isdir(k)]
            saved = f"{hold}/{i}"
            if inside:
                os.mkdir(saved)
                _mount("--rbind", mask, saved)
            _mount("-t", "tmpfs", "-o", "mode=1777", "adbray-private", mask)
            for k in inside:
                Path(k).mkdir(parents=True, exist_ok=True)
                _mount("--rbind", f"{saved}/{os.path.relpath(k, mask)}", k)
            if inside:
                subprocess.run(["umount", "-l", saved], check=True, capture_output=True)
                os.rmdir(saved)
    finally:
        try:  # rmdir, never rmtree: a folder still bound to a mask must not be emptied
            os.rmdir(hold)
        except OSError:
            pass


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m deploy.isolate")
    parser.add_argument("--mask", action="append", default=[])
    parser.add_argument("--keep", action="append", default=[])
    parser.add_argument("cmd", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    apply(args.mask, args.keep)
    os.chdir("/")
    os.execvp(cmd[0], cmd)


if __name__ == "__main__":
    main()
