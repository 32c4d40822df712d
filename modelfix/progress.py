"""Progress on stderr (never stdout, which carries results): a rich bar in a terminal, log lines elsewhere.

Three formats (`set_log_format`, or the environment variable MODELFIX_LOG_FORMAT):

- `auto` (default): `rich` when stderr is a terminal, else `plain`;
- `rich`: live bars; stage-level bars stay on screen when done (transient=False) so the terminal keeps a record;
- `plain`: one line per finished stage and per epoch (`log_epoch`), flushed at once — readable in CI logs, `tee`,
  nohup files and notebooks, where a live bar prints nothing useful;
- `json`: the same events as JSON lines (`{"event": "epoch", "epoch": 3, "epochs": 10, "loss": …}`) for machines.

`ENABLED` False (the CLI's --no-progress, or MODELFIX_NO_PROGRESS=1) silences bars and lines unless a format was
chosen explicitly (`plain` or `json`): asking for logs wins over the quiet default.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from typing import IO, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

stderr = Console(stderr=True)

# The CLI turns this off with --no-progress (or MODELFIX_NO_PROGRESS=1); library callers pass progress=False.
ENABLED = not os.environ.get("MODELFIX_NO_PROGRESS")

LOG_FORMATS = ("auto", "rich", "plain", "json")
LOG_FORMAT = os.environ.get("MODELFIX_LOG_FORMAT", "auto").strip().lower() or "auto"


def set_log_format(fmt: str) -> None:
    """Choose `auto`, `rich`, `plain` or `json` for every later bar and log line (the CLI's --log-format)."""
    global LOG_FORMAT
    fmt = str(fmt).strip().lower()
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, not '{fmt}'")
    LOG_FORMAT = fmt


def _stream(stream: IO[str] | None) -> IO[str]:
    return sys.stderr if stream is None else stream  # looked up per call: tests and callers may swap sys.stderr


def log_format(stream: IO[str] | None = None) -> str:
    """The format in effect for `stream` (default stderr): `rich`, `plain` or `json`; `auto` resolves by whether
    the stream is a terminal."""
    if LOG_FORMAT in ("rich", "plain", "json"):
        return LOG_FORMAT
    isatty = getattr(_stream(stream), "isatty", None)
    return "rich" if callable(isatty) and isatty() else "plain"


# Under torchrun every process but rank 0 sets this: one progress display per run, whatever the format.
MUTED = False


def _active(enabled: bool) -> bool:
    return enabled and not MUTED and (ENABLED or LOG_FORMAT in ("plain", "json"))


def _value(value):
    """A JSON-safe value: non-finite floats become null, tensors and numpy scalars plain numbers."""
    if hasattr(value, "item") and callable(value.item):
        try:
            value = value.item()
        except (TypeError, ValueError, RuntimeError):
            value = str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value if isinstance(value, (str, int, float, bool)) or value is None else str(value)


def _text(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "–" if value is None else str(value)


def log_event(event: str, message: str, *, enabled: bool = True, stream: IO[str] | None = None, **fields) -> None:
    """One line for `event` when the format is `plain` (`message` then `key value` pairs) or `json` (`{"event":
    event, **fields}`); nothing in a terminal (the bar shows it) or when progress is off. Flushed at once."""
    if not _active(enabled):
        return
    fmt = log_format(stream)
    if fmt == "rich":
        return
    fields = {k: _value(v) for k, v in fields.items()}
    if fmt == "json":
        line = json.dumps({"event": event, **fields}, ensure_ascii=False, allow_nan=False)
    else:
        line = message + (": " + ", ".join(f"{k} {_text(v)}" for k, v in fields.items()) if fields else "")
    out = _stream(stream)
    out.write(line + "\n")
    out.flush()


def log_epoch(description: str, epoch: int, epochs: int, *, enabled: bool = True, stream: IO[str] | None = None,
              **numbers) -> None:
    """The end of one training epoch: `train epoch 3/10: loss 0.1234, val_accuracy 0.97` (plain) or
    `{"event": "epoch", "description": "train", "epoch": 3, "epochs": 10, "loss": 0.1234, …}` (json)."""
    if not _active(enabled) or log_format(stream) == "rich":
        return
    fmt_json = log_format(stream) == "json"
    fields = {"description": description, "epoch": epoch, "epochs": epochs} if fmt_json else {}
    log_event("epoch", f"{description} epoch {epoch}/{epochs}", enabled=enabled, stream=stream, **fields, **numbers)


class _Silent:
    """Stands in for rich.Progress when progress is off, so callers need no branches."""

    def add_task(self, *args, **kwargs) -> int:
        return 0

    def update(self, *args, **kwargs) -> None:
        pass

    def advance(self, *args, **kwargs) -> None:
        pass


class _Lines:
    """Stands in for rich.Progress outside a terminal: one `stage` line when a task completes (or when the bar
    closes, for a task that stopped short), with its count and seconds; nothing per step."""

    def __init__(self, stream: IO[str] | None):
        self.stream, self.tasks = stream, {}

    def add_task(self, description: str, total: float | None = None, completed: float = 0, **kwargs) -> int:
        task = len(self.tasks)
        self.tasks[task] = {"stage": str(description), "description": str(description), "total": total, "completed": completed,
                            "start": time.perf_counter(), "done": False}
        self._check(task)
        return task

    def update(self, task: int, *, advance: float = 0, completed: float | None = None, total: float | None = None,
               description: str | None = None, **kwargs) -> None:
        state = self.tasks[task]
        if total is not None:
            state["total"] = total
        if completed is not None:
            state["completed"] = completed
        state["completed"] += advance
        if description is not None:
            state["description"] = str(description)
        self._check(task)

    def advance(self, task: int, advance: float = 1) -> None:
        self.update(task, advance=advance)

    def _check(self, task: int, closing: bool = False) -> None:
        state = self.tasks[task]
        total = state["total"]
        finished = total is not None and state["completed"] >= total
        if state["done"] or not (finished or closing):
            return
        state["done"] = True
        count = state["completed"]
        log_event("stage", state["description"], stream=self.stream, stage=state["stage"],
                  done=int(count) if float(count).is_integer() else count,
                  total=None if total is None else (int(total) if float(total).is_integer() else total),
                  seconds=round(time.perf_counter() - state["start"], 3))

    def close(self) -> None:
        for task in self.tasks:
            self._check(task, closing=True)


@contextlib.contextmanager
def progress_bar(enabled: bool = True, transient: bool = False,
                 stream: IO[str] | None = None) -> Iterator[Progress | _Silent | _Lines]:
    """A rich bar on a terminal (kept on screen when done unless `transient`), `stage` log lines elsewhere
    (module docstring), or a silent stand-in when progress is off."""
    if not _active(enabled):
        yield _Silent()
        return
    if log_format(stream) != "rich":
        lines = _Lines(stream)
        try:
            yield lines
        finally:
            lines.close()
        return
    bar = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=stderr,
        transient=transient,
    )
    with bar:
        yield bar
