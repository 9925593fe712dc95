"""The ``brainseg`` command group, and how every command reports a user's mistake: one line
on stderr and exit status 1, never a traceback."""

from __future__ import annotations

import functools
import sys

import click

from brainseg_dist.console import console
from brainseg_dist.errors import BrainsegError


def reports_errors(fn):
    """Turn library errors into a clear message on stderr and exit status 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BrainsegError as exc:
            _print_error(str(exc))
        except OSError as exc:
            # The file system refused (disk full, permissions, a path through a file):
            # a fault of the environment, named, not a bug of the program.
            if exc.filename is None:
                raise
            _print_error(f"{exc.filename}: {exc.strerror or exc}")

    return wrapper


def _print_error(message: str) -> None:
    console.print("[bold red]error:[/bold red] ", end="")
    console.print(message, highlight=False, markup=False, soft_wrap=True)
    sys.exit(1)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="brainseg-dist")
def main() -> None:
    """Segment FLAIR abnormalities (lower-grade gliomas) in brain MRI with a 2D U-Net."""
