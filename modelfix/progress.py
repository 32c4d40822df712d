"""Progress bars on stderr (never stdout, which carries results); silent when disabled or not a terminal."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

stderr = Console(stderr=True)

# The CLI turns this off with --no-progress (or MODELFIX_NO_PROGRESS=1); library callers pass progress=False.
ENABLED = not os.environ.get("MODELFIX_NO_PROGRESS")


class _Silent:
    """Stands in for rich.Progress when progress is off, so callers need no branches."""

    def add_task(self, *args, **kwargs) -> int:
        return 0

    def update(self, *args, **kwargs) -> None:
        pass

    def advance(self, *args, **kwargs) -> None:
        pass


@contextlib.contextmanager
def progress_bar(enabled: bool = True) -> Iterator[Progress | _Silent]:
    if not (enabled and ENABLED):
        yield _Silent()
        return
    bar = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=stderr,
        transient=True,
    )
    with bar:
        yield bar
