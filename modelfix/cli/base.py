"""The Typer apps, the root options, and the one error contract every command shares (`handles_errors`).

User text is never read as Rich markup: the consoles `out`/`err` have markup off (styled words are rich `Text`), so
a class named `[link=file:///etc/passwd]x[/link]` or a file `scans [old]/a.png` prints as written.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import traceback
import warnings
from typing import Annotated, Callable

import typer
from rich.console import Console
from rich.text import Text

from .. import __version__, progress
from ..errors import ModelfixError, ModelfixWarning

app = typer.Typer(
    name="modelfix",
    help="Repair image classifiers that learned a spurious shortcut, and prove what changed.",
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    add_completion=False,
    no_args_is_help=True,
)
data_app = typer.Typer(help="Built-in scenarios and data export.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks (measured numbers go to docs/benchmarks.md).", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(bench_app, name="bench")

# markup=False: every string these print (class names, file names, specs) is the user's, and must print as written;
# the few styled words are rich Text with a style, never markup
out = Console(soft_wrap=True, markup=False)
err = Console(stderr=True, soft_wrap=True, markup=False)
alert = Console(stderr=True, soft_wrap=True, markup=False)  # errors and interruptions: printed by every torchrun process (run_app)
state = {"debug": False}


class Terminated(BaseException):
    """SIGTERM, raised where the process is, so staged outputs are removed as on Ctrl-C."""


def on_sigterm(signum, frame) -> None:
    raise Terminated()


def install_signal_handlers() -> None:
    signal.signal(signal.SIGTERM, on_sigterm)


def say(text: str) -> None:
    """A result line on stdout, printed as written (no markup, no highlighting)."""
    out.print(text, markup=False, highlight=False)


def warn(text: str) -> None:
    """A warning line on stderr that cannot be missed."""
    err.print(Text.assemble(("warning:", "bold yellow"), " ", text), highlight=False)


def _version(value: bool) -> None:
    if value:
        print(f"modelfix {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bars on stderr.")] = False,
    log_format: Annotated[str, typer.Option("--log-format", help="auto (a bar on a terminal, else one line per epoch and stage), rich, plain or json (JSON lines).")] = "auto",
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = False,
) -> None:
    """modelfix: repair image classifiers that learned a spurious shortcut, and prove what changed."""
    state["debug"] = debug
    progress.ENABLED = not no_progress
    progress.set_log_format(log_format)


def handles_errors(fn: Callable) -> Callable:
    """Turn a user-caused error into one line on stderr and its exit code (2, or 1 for a failed run); Ctrl-C into
    130 and SIGTERM into 143; anything else into exit 1. `--debug` adds the traceback, never changes the code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        json_output = kwargs.get("json_output", False)
        try:
            with warnings.catch_warnings():  # restores Python's warning printer when the command ends
                warnings.simplefilter("always", ModelfixWarning)
                warnings.showwarning = _show_warning
                return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except ModelfixError as exc:
            fail(*settle(str(exc), exc.exit_code), json_output)
        except KeyboardInterrupt:
            alert.print("interrupted", markup=False)
            raise typer.Exit(130)
        except Terminated:
            failure = announced_failure()  # under torchrun: stopped because another process failed
            if failure is not None:
                fail(*failure, json_output)
            alert.print("terminated", markup=False)
            raise typer.Exit(143)
        except RecursionError:
            fail(*settle("input nested too deeply to read (a JSON or YAML file?)", 2), json_output)
        except Exception as exc:  # a bug, or something we did not foresee: still one line unless --debug
            fail(*settle(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", 1),
                 json_output)

    return wrapper


_python_showwarning = warnings.showwarning


def _show_warning(message, category, *args, **kwargs) -> None:
    """The library's ModelfixWarning as one `warning:` line; any other warning as Python prints it."""
    if issubclass(category, ModelfixWarning):
        warn(str(message))
    else:
        _python_showwarning(message, category, *args, **kwargs)


def settle(message: str, code: int) -> tuple[str, int]:
    """Under torchrun, the error every process prints: this one's, or the first failing rank's (docs/distributed.md);
    the message and code unchanged in one process."""
    if "torch.distributed" not in sys.modules:  # no process group can exist (and torch stays unimported)
        return message, code
    from .. import distributed

    return distributed.report_failure(message, code)


def announced_failure() -> tuple[str, int] | None:
    """Under torchrun, the failure another process announced (docs/distributed.md), else None."""
    if "torch.distributed" not in sys.modules:
        return None
    from .. import distributed

    return distributed.announced_failure()


def run_app() -> None:
    """`app()`, inside a torch.distributed process group when torchrun started this process as one of several:
    rank 0 alone prints results and progress; at the end every process learns whether another failed, and a
    process that finished well exits with that failure's code."""
    # torchrun's variables, read here so that a plain run does not import torch
    if "RANK" not in os.environ or os.environ.get("WORLD_SIZE", "1") in ("", "1"):
        app()
        return
    from .. import distributed

    distributed.init()
    if not distributed.is_main():  # one copy of results, logs and warnings, from rank 0; errors from every process
        progress.MUTED = True
        sys.stdout = open(os.devnull, "w")
        err.file = open(os.devnull, "w")
    try:
        app()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    if code == 0:
        try:
            distributed.check_peers()
        except ModelfixError as exc:
            alert.print(Text.assemble(("error:", "red"), " ", str(exc)), highlight=False)
            code = exc.exit_code
    distributed.finish()
    distributed.shutdown()
    sys.exit(code)


def fail(message: str, code: int, json_output: bool) -> None:
    if state["debug"]:
        traceback.print_exc()
    if json_output:
        print(json.dumps({"error": {"message": message, "exit_code": code}}))
    alert.print(Text.assemble(("error:", "red"), " ", message), highlight=False)  # every torchrun process
    raise typer.Exit(code)


def finish_repair(document: dict, output, report, json_output: bool, strict: bool, describe: Callable[[], None]) -> None:
    """Every repair command's ending: the JSON document (heatmaps left out), or `describe()`'s tables and where the
    files went; then the verdict and the warnings."""
    if json_output:
        print(json.dumps({k: v for k, v in document.items() if k != "heatmaps"}))
    else:
        describe()
        say(f"wrote {output}" + (f" and {report}/report.html" if report is not None else ""))
    render_outcome(document, strict)


def render_outcome(document: dict, strict: bool = False) -> None:
    """After every repair: the verdict line (or why there is none) and each warning on stderr; with `strict`, a
    warning makes the exit code 1 (the outputs are written, so they can be inspected)."""
    if document.get("verdict"):
        err.print("verdict: " + document["verdict"], markup=False, highlight=False)
    else:
        err.print("no evaluation data: pass --eval-data (and --artifact) to see clean and poisoned accuracy before and "
                  "after", markup=False, highlight=False)
    for warning in document.get("warnings") or []:
        warn(warning)
    if strict and document.get("warnings"):
        err.print(f"--strict: {len(document['warnings'])} warning(s)", markup=False)
        raise typer.Exit(1)
