"""The command line end to end on the embedded default, and every bad input: one line, exit 2, nothing written."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from cli_helpers import assert_one_line_error, run, runner
from PIL import Image

from modelfix.cli import app





def test_train_writes_checkpoint_and_card(shortcut):
    assert shortcut.exists()
    card = json.loads((shortcut.parent / "shortcut.card.json").read_text())
    assert card["arch"] == "mlp" and card["num_classes"] == 10
    assert card["artifact"] == "corner-patch"
    assert card["history"][0]["command"] == "train"
    assert card["dataset"]["scenario"] == "decoy-digits"


def test_evaluate_shows_the_shortcut(shortcut, tmp_path):
    result = run("evaluate", shortcut, "--data", "decoy-digits:test", "--poison", "0,1", "--labels",
                 "correlated,random", "--json", "-o", tmp_path / "eval")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["schema"] == "modelfix.results/v1"
    clean, contaminated, permuted = doc["levels"]
    assert (clean["labels"], contaminated["labels"], permuted["labels"]) == (None, "correlated", "random")
    assert permuted["n_poisoned"] == clean["n"]
    # The shortcut: the patch is read as the label. When it encodes the true label the model is nearly perfect;
    # a random colour sends accuracy far down.
    assert contaminated["accuracy"] > 0.9
    assert contaminated["macro_group_accuracy"] - permuted["macro_group_accuracy"] > 0.25
    on_disk = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert on_disk["levels"][2]["accuracy"] == permuted["accuracy"]
    report = (tmp_path / "eval" / "report.md").read_text()
    assert f"{100 * permuted['accuracy']:.2f}" in report


def test_evaluate_defaults_to_the_cards_scenario_and_artifact(shortcut):
    result = run("evaluate", shortcut, "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["data"]["spec"] == "decoy-digits:test"
    assert doc["settings"]["artifact"] == "corner-patch"
    assert [(row["level"], row["labels"]) for row in doc["levels"]] == [(0.0, None), (1.0, "random")]


def test_evaluate_table_on_stdout(shortcut):
    result = run("evaluate", shortcut, "--poison", "0,0.5,1")
    assert result.exit_code == 0, result.stderr
    assert "worst-group" in result.stdout and "0.5" in result.stdout


def test_inspect_json(shortcut):
    result = run("inspect", shortcut, "--json")
    assert result.exit_code == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["arch"] == "mlp"
    assert any(layer["output_shape"] == [1, 512] or layer["output_shape"] == [512] for layer in info["layers"])


def test_data_make_then_evaluate_the_folder(shortcut, tmp_path):
    target = tmp_path / "exported"
    result = run("data", "make", "decoy-digits", "-o", target, "--split", "test-contaminated")
    assert result.exit_code == 0, result.stderr
    folder = target / "test-contaminated"
    assert (folder / "images").is_dir() and (folder / "masks").is_dir()
    result = run("evaluate", shortcut, "--data", folder, "--poison", "0", "--json")
    assert result.exit_code == 0, result.stderr
    from_folder = json.loads(result.stdout)["levels"][0]["accuracy"]
    direct = json.loads(run("evaluate", shortcut, "--data", "decoy-digits:test-contaminated", "--poison", "0",
                            "--json").stdout)["levels"][0]["accuracy"]
    assert abs(from_folder - direct) < 0.02  # PNG quantises the upsampled digits to 1/255 steps


def test_python_dash_m_and_version():
    result = subprocess.run([sys.executable, "-m", "modelfix", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("modelfix ")


# ---- bad input ----------------------------------------------------------------------------------------------------


def test_missing_checkpoint(tmp_path):
    assert_one_line_error(run("evaluate", tmp_path / "nope.safetensors"), "nope.safetensors")


@pytest.mark.parametrize("levels", ["1.5", "-0.2", "0,abc", ""])
def test_bad_poison_levels(shortcut, levels):
    assert_one_line_error(run("evaluate", shortcut, "--poison", levels), "--poison")


def test_unknown_artifact_spec(shortcut):
    assert_one_line_error(run("evaluate", shortcut, "--artifact", "glitter"), "glitter")


def test_unknown_scenario(shortcut):
    assert_one_line_error(run("evaluate", shortcut, "--data", "no-such-thing"), "no-such-thing")


def test_empty_folder(shortcut, tmp_path):
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run("evaluate", shortcut, "--data", tmp_path / "empty"), "empty")


def write_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(path)


def test_mask_size_differs_from_image(shortcut, tmp_path):
    write_png(tmp_path / "images" / "3" / "a.png", np.zeros((28, 28)))
    write_png(tmp_path / "masks" / "3" / "a.png", np.zeros((14, 14)))
    assert_one_line_error(run("evaluate", shortcut, "--data", tmp_path), "a.png")


def test_mask_without_image(shortcut, tmp_path):
    write_png(tmp_path / "images" / "3" / "a.png", np.zeros((28, 28)))
    write_png(tmp_path / "masks" / "3" / "b.png", np.zeros((28, 28)))
    assert_one_line_error(run("evaluate", shortcut, "--data", tmp_path), "b.png")


def test_image_class_missing_from_model(shortcut, tmp_path):
    write_png(tmp_path / "cat" / "a.png", np.zeros((28, 28)))
    assert_one_line_error(run("evaluate", shortcut, "--data", tmp_path), "cat")


def test_image_size_differs_from_model(shortcut, tmp_path):
    write_png(tmp_path / "3" / "a.png", np.zeros((32, 32)))
    assert_one_line_error(run("evaluate", shortcut, "--data", tmp_path), "28")


def test_corrupt_idx_file(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz"):
        (raw / name).write_bytes(b"not an idx file at all")
    out = tmp_path / "m.safetensors"
    result = run("train", "--data", "decoy-mnist:train", "--data-root", tmp_path, "-o", out)
    assert_one_line_error(result, "idx")
    assert not out.exists()


def test_checkpoint_mismatching_the_architecture(shortcut, tmp_path):
    from safetensors.torch import load_file

    state = {k: v for k, v in load_file(shortcut).items()}
    path = tmp_path / "plain.pt"
    torch.save(state, path)
    result = run("evaluate", path, "--arch", "tap-cnn", "--data", "decoy-digits:test")
    assert result.exit_code == 2
    assert "tap-cnn" in result.stderr and "Traceback" not in result.stderr
    assert "fc1.weight" in result.stderr  # the file's own keys, so the user sees which architecture it really is


def test_pickled_model_is_refused_without_trust(tmp_path):
    path = tmp_path / "full.pt"
    torch.save(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10)), path)
    assert_one_line_error(run("inspect", path, "--arch", "mlp"), "--trust-checkpoint")


def test_train_refuses_non_safetensors_output_and_leaves_nothing(tmp_path):
    assert_one_line_error(run("train", "--epochs", "1", "-o", tmp_path / "m.pt"), ".safetensors")
    assert list(tmp_path.iterdir()) == []


def test_train_nan_exits_1_with_epoch(tmp_path):
    out = tmp_path / "m.safetensors"
    result = run("train", "--epochs", "2", "--lr", "1e30", "--optimizer", "sgd", "-o", out)
    assert result.exit_code == 1
    assert "epoch" in result.stderr and "last finite loss" in result.stderr
    assert not out.exists()


def test_debug_shows_the_traceback(tmp_path):
    result = runner.invoke(app, ["--debug", "evaluate", str(tmp_path / "nope.safetensors")])
    assert result.exit_code != 0 and result.exception is not None


def test_data_make_refuses_non_empty_output(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    assert_one_line_error(run("data", "make", "decoy-digits", "-o", tmp_path / "x"), "not empty")
    assert (tmp_path / "x" / "keep.txt").read_text() == "mine"


def test_overwriting_the_input_checkpoint_is_refused(shortcut):
    from modelfix.checkpoint import load_model, save_model
    from modelfix.errors import ModelfixError

    before = shortcut.read_bytes()
    model, card = load_model(shortcut)
    with pytest.raises(ModelfixError):
        save_model(model, card, shortcut, inputs=[shortcut])
    assert shortcut.read_bytes() == before
