"""`--config FILE` on every command, and `modelfix rerun`.

A config is a YAML mapping of the command's options (`lr: 0.01`, `lambda: [1, 10]`, `eval-data: decoy-digits:test`;
dashes or underscores, with or without the leading `--`). It becomes Click's default map for the command, so a flag
typed on the command line still wins. A card's sidecar (`OUT.card.json`) works as a config too: its last history
entry records the command's fully resolved options (`invocation`), which is also what `rerun` replays.
"""

from __future__ import annotations

import functools
import inspect
import json
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer

from ..errors import ModelfixError
from .base import app, handles_errors, say
from .options import extended_signature

MAX_BYTES = 1 << 20  # a config is a few lines; refuse anything that is clearly not one
state: dict = {"invocation": None}


def read_config(path: Path) -> tuple[str | None, dict]:
    """(command the file was written by or None, {option: value}) from a YAML config or a card sidecar."""
    from ..safe_json import loads as json_loads

    path = Path(path)
    if not path.is_file():
        raise ModelfixError(f"--config {path}: no such file")
    if path.stat().st_size > MAX_BYTES:
        raise ModelfixError(f"--config {path}: larger than {MAX_BYTES} bytes; not a config")
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".json":
        document = json_loads(text, f"--config {path}")
        history = document.get("history") if isinstance(document, dict) else None
        if history:  # a card: replay its last command
            invocation = (history[-1] or {}).get("invocation") or {}
            if not invocation:
                raise ModelfixError(f"--config {path}: the card's last history entry records no invocation",
                                    hint="cards written by this version of modelfix record one")
            return invocation.get("command"), dict(invocation.get("params") or {})
        return None, document if isinstance(document, dict) else {}
    import yaml

    try:
        document = yaml.safe_load(text)  # safe_load: no !!python tags, ever
    except (yaml.YAMLError, RecursionError) as e:
        raise ModelfixError(f"--config {path}: not valid YAML ({type(e).__name__})") from None
    if document is None:
        return None, {}
    if not isinstance(document, dict):
        raise ModelfixError(f"--config {path}: a config is a mapping of option: value")
    return None, document


def default_map(command, options: dict, source: str) -> dict:
    """{parameter name: value} for `command` from a config's keys (option names in any spelling)."""
    names = {}
    for param in command.params:
        names[param.name] = param.name
        for opt in getattr(param, "opts", []):
            names[opt.lstrip("-").replace("-", "_")] = param.name
    mapped = {}
    for key, value in options.items():
        name = names.get(str(key).lstrip("-").replace("-", "_"))
        if name is None:
            raise ModelfixError(f"--config {source}: '{key}' is not an option of `modelfix {command.name}`")
        if isinstance(value, list):
            value = ",".join(str(v) for v in value)  # list options are comma-separated on the command line
        mapped[name] = value
    return mapped


def apply_config(ctx: typer.Context, param: typer.CallbackParam, value: Optional[Path]) -> Optional[Path]:
    """Eager: read the config before the other options, so they take their defaults from it."""
    if value is None:
        return None
    try:
        _, options = read_config(value)
        ctx.default_map = {**(ctx.default_map or {}), **default_map(ctx.command, options, str(value))}
    except ModelfixError as e:
        raise typer.BadParameter(str(e).split(": ", 1)[-1], ctx=ctx, param=param) from None
    return value


ConfigOpt = Annotated[Optional[Path], typer.Option("--config", is_eager=True, callback=apply_config,
                                                   help="Options from a YAML file (or a card sidecar); flags typed here win.",
                                                   rich_help_panel="Runtime")]


ThreadsOpt = Annotated[Optional[int], typer.Option("--threads", help="torch threads (default 1: on a shared or loaded machine 2 threads ran 3–4× slower than 1; 0: every core).", rich_help_panel="Runtime")]


def with_config(command: Callable, name: str) -> Callable:
    """`command` with `--config` and `--threads`: the runtime is configured (allocator policy, threads;
    `modelfix.runtime`) and the resolved options are recorded (the card's `invocation`) before it runs."""
    own_threads = "threads" in inspect.signature(command).parameters  # a benchmark that sets its threads keeps its own
    added = ([] if own_threads else [("threads", ThreadsOpt, None)]) + [("config", ConfigOpt, None)]

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from .. import runtime
        from ..app import outputs  # here, not at the top: the CLI imports no torch before a command runs

        config = kwargs.pop("config", None)
        outputs.session_inputs[:] = [config] if config is not None else []  # a config is an input too
        threads = (kwargs.get("threads") or None) if own_threads else kwargs.pop("threads", None)
        if threads is not None and threads < 0:
            raise typer.BadParameter(f"must be >= 0, not {threads}", param_hint="--threads")
        runtime.configure(threads)
        state["invocation"] = {"command": name, "params": {k: (str(v) if isinstance(v, Path) else v)
                                                           for k, v in kwargs.items()}}
        return command(*args, **kwargs)

    wrapper.__signature__ = extended_signature(command, added)
    return wrapper


def add_config_everywhere(typer_app: typer.Typer) -> None:
    """Give every registered command (and sub-app command) `--config` and `--threads`."""
    for info in typer_app.registered_commands:
        if info.callback is not None:
            info.callback = with_config(info.callback, info.name or info.callback.__name__.replace("_", "-"))
    for group in typer_app.registered_groups:
        add_config_everywhere(group.typer_instance)


@app.command(epilog="Example: modelfix rerun runs/rrr.safetensors -o runs/rrr-again.safetensors")
@handles_errors
def rerun(
    ctx: typer.Context,
    model_path: Annotated[Path, typer.Argument(metavar="OUT", help="A checkpoint modelfix wrote (its card records how).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Where the repeated run writes its checkpoint.")],
    report: Annotated[Optional[Path], typer.Option("--report", help="Where the repeated run writes its report (default: none).")] = None,
) -> None:
    """Repeat the command that wrote OUT, with the options its card records (a new -o, the same everything else)."""
    from ..checkpoint import sidecar_path

    # the repeated command does not know OUT's sidecar is what it replays: protect both here
    from ..app.outputs import OutputPlan

    OutputPlan(model=output, inputs=[model_path]).check()
    side = sidecar_path(model_path)
    if not side.is_file():
        raise ModelfixError(f"{model_path}: no card sidecar {side.name} beside it", hint="rerun reads OUT.card.json")
    command_name, params = read_config(side)
    if not command_name:
        raise ModelfixError(f"{side}: the card records no command to repeat")
    root = typer.main.get_command(app)
    command = root.get_command(ctx, command_name)
    if command is None:
        raise ModelfixError(f"{side}: the recorded command '{command_name}' does not exist in this version")
    params = {**params, "output": str(output), "report": str(report) if report else None}
    say(f"rerun: modelfix {command_name} with the options recorded in {side}")
    # the recorded values become the command's defaults, so Click converts and checks them as if typed
    with command.make_context(command_name, [], parent=ctx, default_map=params) as sub:
        command.invoke(sub)


def recorded_invocation() -> dict | None:
    """The running command's resolved options (JSON-safe), for the card."""
    invocation = state.get("invocation")
    return json.loads(json.dumps(invocation, default=str)) if invocation else None
