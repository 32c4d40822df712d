"""The examples printed under `--help` run as written (the core chain on the embedded data, in a scratch folder):
`train` writes runs/shortcut.safetensors, `finetune` repairs it with its defaults (λ auto), `evaluate` reads it."""

from __future__ import annotations

import shlex

import typer

from cli_helpers import run
from modelfix.cli import app

COMMANDS = typer.main.get_command(app).commands


def example(name: str) -> list[str]:
    text = COMMANDS[name].epilog or ""
    assert text.startswith("Example: modelfix "), (name, text)
    return shlex.split(text[len("Example: modelfix "):])


def test_train_finetune_evaluate_examples_run_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("train", "finetune", "evaluate"):
        result = run(*example(name))
        assert result.exit_code == 0, (name, result.stdout, result.stderr)
    assert (tmp_path / "runs" / "shortcut.safetensors").is_file() and (tmp_path / "runs" / "rrr.safetensors").is_file()
