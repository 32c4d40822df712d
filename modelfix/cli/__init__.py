"""The `modelfix` command line: thin adapters (parse → call the application layer → render), one module per group
of commands. Importing this package registers every command on `app`; nothing here imports torch before a command
runs, so `modelfix --help` and `--version` answer at once."""

from .base import app, install_signal_handlers, run_app
from . import (bench, bench_guided, compare, config, crayon, demo, discover, evaluate, explain,  # noqa: F401,E402
               inspect, posthoc, report, train)

config.add_config_everywhere(app)  # last: every command registered above gets --config


def main() -> None:
    install_signal_handlers()
    run_app()  # app(), inside a process group under torchrun


__all__ = ["app", "main"]
