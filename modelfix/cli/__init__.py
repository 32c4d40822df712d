"""The `modelfix` command line: thin adapters (parse → call the application layer → render), one module per group
of commands. Importing this package registers every command on `app`; nothing here imports torch before a command
runs, so `modelfix --help` and `--version` answer at once."""

from .base import app, install_signal_handlers
from . import (bench, bench_guided, compare, crayon, demo, discover, evaluate, explain, inspect,  # noqa: F401,E402
               posthoc, report, train)


def main() -> None:
    install_signal_handlers()
    app()


__all__ = ["app", "main"]
