"""One rich console (stderr) and progress-bar factory shared by every stage."""

from __future__ import annotations

import os
import sys

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

# Logs of batch jobs are not terminals; rich would wrap them at 80 columns.
console = Console(stderr=True, width=None if sys.stderr.isatty() else 120)


def progress(transient: bool = False, disable: bool = False) -> Progress:
    """A progress bar with count, elapsed and remaining time.

    ``BRAINSEG_NO_PROGRESS=1`` disables it (useful in logs of batch jobs).
    """
    disable = disable or os.environ.get("BRAINSEG_NO_PROGRESS") == "1"
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=transient,
        disable=disable,
    )


def warn(message: str) -> None:
    # soft_wrap: a file path in a log must stay on one line to be found and copied.
    console.print("[yellow]warning:[/yellow] ", end="")
    console.print(message, highlight=False, markup=False, soft_wrap=True)
