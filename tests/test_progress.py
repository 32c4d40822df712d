"""Progress outside a terminal: one flushed line per epoch and per finished stage (plain or JSON lines), nothing
per step, nothing in a terminal (the rich bar shows it) and nothing when progress is off."""

from __future__ import annotations

import io
import json

import pytest
import torch
from torch import nn

from modelfix import progress
from modelfix.data import Dataset
from modelfix.training import TrainConfig, train


class Pipe(io.StringIO):
    """A non-terminal stream that records how often it was flushed."""

    def __init__(self, tty: bool = False):
        super().__init__()
        self.tty, self.flushes = tty, 0

    def isatty(self) -> bool:
        return self.tty

    def flush(self) -> None:
        self.flushes += 1
        super().flush()


@pytest.fixture
def logs(monkeypatch):
    """Progress on (the tests run with MODELFIX_NO_PROGRESS=1), format auto; a Pipe to pass as `stream`."""
    monkeypatch.setattr(progress, "ENABLED", True)
    monkeypatch.setattr(progress, "LOG_FORMAT", "auto")
    return Pipe()


def lines(pipe: Pipe) -> list[str]:
    return pipe.getvalue().splitlines()


def test_plain_epoch_lines_are_flushed_one_per_call(logs):
    for epoch in (1, 2, 3):
        progress.log_epoch("train", epoch, 3, loss=0.5 / epoch, val_accuracy=0.9, note="x", stream=logs)
    assert lines(logs) == ["train epoch 1/3: loss 0.5, val_accuracy 0.9, note x",
                           "train epoch 2/3: loss 0.25, val_accuracy 0.9, note x",
                           "train epoch 3/3: loss 0.1667, val_accuracy 0.9, note x"]
    assert logs.flushes == 3


def test_json_lines_carry_the_numbers(logs):
    progress.set_log_format("json")
    progress.log_epoch("finetune rrr", 2, 5, loss=torch.tensor(0.125), penalty=float("nan"), stream=logs)
    assert [json.loads(line) for line in lines(logs)] == [
        {"event": "epoch", "description": "finetune rrr", "epoch": 2, "epochs": 5, "loss": 0.125, "penalty": None}]
    with pytest.raises(ValueError, match="log format"):
        progress.set_log_format("xml")


def test_terminal_or_disabled_prints_no_lines(logs, monkeypatch):
    tty = Pipe(tty=True)
    progress.log_epoch("train", 1, 1, loss=1.0, stream=tty)
    assert tty.getvalue() == "" and progress.log_format(tty) == "rich"
    progress.log_epoch("train", 1, 1, loss=1.0, enabled=False, stream=logs)
    monkeypatch.setattr(progress, "ENABLED", False)
    progress.log_epoch("train", 1, 1, loss=1.0, stream=logs)
    with progress.progress_bar(stream=logs) as bar:
        bar.advance(bar.add_task("quiet", total=1))
    assert logs.getvalue() == ""
    progress.set_log_format("plain")  # asked for explicitly: logs even with progress off
    progress.log_epoch("train", 1, 1, loss=1.0, stream=logs)
    assert lines(logs) == ["train epoch 1/1: loss 1"]


def test_stage_bar_outside_a_terminal_prints_one_line_per_stage(logs):
    with progress.progress_bar(stream=logs) as bar:
        first = bar.add_task("explain", total=10)
        for _ in range(5):
            bar.advance(first, 2)
        second = bar.add_task("reliance", total=8)
        bar.update(second, advance=3, description="reliance level 1")
    out = lines(logs)
    assert len(out) == 2
    assert out[0].startswith("explain: stage explain, done 10, total 10, seconds ")
    assert out[1].startswith("reliance level 1: stage reliance, done 3, total 8, seconds ")  # stopped short


@pytest.mark.parametrize("fmt", ["plain", "json"])
def test_training_logs_one_line_per_epoch(logs, fmt, capsys):
    progress.set_log_format(fmt)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 4, 4, generator=gen)
    data = Dataset(x=x, y=(x.flatten(1).sum(1) > 0).long(), class_names=["neg", "pos"], name="blobs")
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    epochs = 4
    result = train(net, data, TrainConfig(epochs=epochs, batch_size=16, lr=1e-2), val=data, description="fit")
    out = capsys.readouterr().err.splitlines()  # pytest's stderr is not a terminal
    epoch_lines = [line for line in out if (json.loads(line)["event"] == "epoch" if fmt == "json" else ": stage " not in line)]
    assert len(epoch_lines) == epochs and len(out) == epochs + 1  # plus the finished training stage
    if fmt == "json":
        records = [json.loads(line) for line in epoch_lines]
        assert [r["epoch"] for r in records] == list(range(1, epochs + 1))
        assert [r["loss"] for r in records] == pytest.approx([h["loss"] for h in result.history])
        assert [r["val_accuracy"] for r in records] == [h["val_accuracy"] for h in result.history]
    else:
        assert epoch_lines[0].startswith(f"fit epoch 1/{epochs}: ") and " loss " in epoch_lines[0]
