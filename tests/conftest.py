"""Shared fixtures: where the MNIST idx files are (tests that need them skip cleanly when they are absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

MNIST_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def find_mnist_root() -> Path | None:
    """$MODELFIX_DATA, else ../shared/data beside the clone, if it holds the four MNIST files (in MNIST/raw/ or
    directly); None otherwise."""
    candidates = []
    if os.environ.get("MODELFIX_DATA"):
        candidates.append(Path(os.environ["MODELFIX_DATA"]))
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "data")
    for root in candidates:
        for folder in (root / "MNIST" / "raw", root):
            if all((folder / f"{n}.gz").is_file() or (folder / n).is_file() for n in MNIST_NAMES):
                return root
    return None


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    """A data root holding the MNIST idx files; skips the test when there is none."""
    root = find_mnist_root()
    if root is None:
        pytest.skip("MNIST idx files not found (set MODELFIX_DATA to a folder holding MNIST/raw/*.gz)")
    return root


@pytest.fixture(scope="session")
def shortcut(tmp_path_factory):
    """An mlp trained on decoy digits through the CLI: it reads the label off the corner patch. Shared by the CLI
    tests, which only read it (writing over an input is refused)."""
    import json

    from cli_helpers import run

    path = tmp_path_factory.mktemp("model") / "shortcut.safetensors"
    result = run("train", "--arch", "mlp", "--data", "decoy-digits:train", "--epochs", "15", "--lr", "0.003",
                 "--batch-size", "64", "-o", path, "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["train_accuracy"] > 0.95
    return path
