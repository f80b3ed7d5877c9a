"""What every template entry point shares: common options and error handling.

    @click.command()
    @template_options
    def main(config, overrides, address, run_dir): ...

    if __name__ == "__main__":
        run_main(main)

Errors are one line on stderr and a non-zero exit; the JSON summary is the
last stdout line on success.
"""
from __future__ import annotations

import os
import sys

import click

from .config import ConfigError
from .connect import ClusterUnreachable, MissingToken, VersionMismatch
from .io import CorruptParquet, corrupt_parquet_error


def template_options(fn):
    """``--config``, ``--set`` (repeatable), ``--address``, ``--run-dir``, ``--shared-mount``."""
    fn = click.option("--shared-mount", default=None, metavar="DIR", expose_value=False, callback=_declare_mount,
                      help="A folder mounted at the same path on every node (NAS): local run folders "
                           "below it are allowed on a cluster.")(fn)
    fn = click.option("--run-dir", default=None,
                      help="Output folder: oss://BUCKET/PATH on a cluster (default: the cluster's storage, "
                           "else runs/<template>/<run_id>).")(fn)
    fn = click.option("--address", default=None,
                      help="Ray address: auto, ray://host:10001 or http://host:8265.")(fn)
    fn = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                      help="Override a config field, e.g. --set train.num_workers=2.")(fn)
    fn = click.option("--config", "config", default=None, type=click.Path(),
                      help="Config YAML (default: the template's configs/local.yaml).")(fn)
    return fn


def _declare_mount(ctx, param, value):
    """``--shared-mount DIR`` declares DIR in ``$ADBRAY_SHARED_MOUNT`` (read by
    :func:`pipelines.template.shared_disk_problem`; jobs of this process inherit it)."""
    if value:
        os.environ["ADBRAY_SHARED_MOUNT"] = ":".join(filter(None, [os.environ.get("ADBRAY_SHARED_MOUNT"), value]))


class RunFailed(RuntimeError):
    """The run did not do what it says (e.g. too many rejects)."""


def run_main(command: click.Command, argv=None) -> int:
    """Invoke a click command; known errors become one stderr line and exit code."""
    try:
        _invoke(command, argv)
        return 0
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.ClickException as e:
        click.echo(f"error: {e.format_message()}", err=True)
        return 2
    except (ConfigError, ValueError) as e:
        click.echo(f"error: {e}", err=True)
        return 2
    except (ClusterUnreachable, MissingToken, VersionMismatch, RunFailed, FileNotFoundError, CorruptParquet) as e:
        click.echo(f"error: {e}", err=True)
        return 1


def _invoke(command: click.Command, argv) -> None:
    """Run the command; a Ray task that failed reading a Parquet file (a multi-line
    RayTaskError) becomes the one-line CorruptParquet naming the file."""
    try:
        command.main(args=argv, standalone_mode=False)
    except Exception as e:
        bad = corrupt_parquet_error(e)
        if bad is None or bad is e:
            raise
        raise bad from None


def exit_with(command: click.Command, argv=None) -> None:
    """``sys.exit(run_main(command, argv))`` for ``__main__`` blocks."""
    sys.exit(run_main(command, argv))
