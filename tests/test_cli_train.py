"""`train --method`, `finetune`, `annotate` and `methods` end to end on the embedded default, and their bad inputs."""

import json

import numpy as np
import pytest
import torch
from cli_helpers import assert_one_line_error, run
from PIL import Image

from modelfix.checkpoint import load_model
from modelfix.data import load_data
from modelfix.repair.annotate import mask_size
from modelfix.repair.methods import METHODS

ADAM = ("--optimizer", "adam", "--lr", "1e-3")


def gap(model) -> float:
    """Accuracy with the patch in the true label's colour minus with a random colour (the shortcut's size)."""
    result = run("evaluate", model, "--data", "decoy-digits:test", "--poison", "1", "--labels", "correlated,random",
                 "--json")
    assert result.exit_code == 0, result.stderr
    contaminated, permuted = json.loads(result.stdout)["levels"]
    return contaminated["accuracy"] - permuted["accuracy"]


@pytest.mark.slow
def test_finetune_with_masks_shrinks_the_shortcut_gap_compared_with_erm(shortcut, tmp_path):
    erm, rrr = tmp_path / "erm.safetensors", tmp_path / "rrr.safetensors"
    result = run("finetune", shortcut, "--method", "erm", "--data", "decoy-digits:train", *ADAM, "--epochs", "3",
                 "-o", erm)
    assert result.exit_code == 0, result.stderr
    result = run("finetune", shortcut, "--method", "rrr", "--data", "decoy-digits:train", "--val",
                 "decoy-digits:val-permuted", "--lambda", "1e-6,1e-5", *ADAM, "--epochs", "3", "-o", rrr,
                 "--report", tmp_path / "report", "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    runs = doc["sweep"]["runs"]
    assert [r["lambda"] for r in runs] == [1e-6, 1e-5]
    assert doc["sweep"]["chosen"] == max(range(2), key=lambda i: (runs[i]["val_accuracy"], -runs[i]["val_loss"]))
    assert doc["data"]["with_mask"] == doc["data"]["n"]  # the scenario's patch footprints are the masks
    before, after_erm, after_rrr = gap(shortcut), gap(erm), gap(rrr)
    assert before > 0.25
    assert after_rrr < after_erm - 0.1, (before, after_erm, after_rrr)
    report = (tmp_path / "report" / "report.md").read_text()
    assert "**(chosen)**" in report and "1e-05" in report
    card = json.loads(rrr.with_suffix("").with_suffix(".card.json").read_text())
    assert card["history"][-1]["command"] == "finetune" and card["history"][-1]["method"] == "rrr"
    assert card["provenance"]["parent"] == str(shortcut)


def test_train_with_a_method_records_it(tmp_path):
    out = tmp_path / "tap.safetensors"
    result = run("train", "--arch", "egem-cnn-ref", "--method", "tap", "--lambda", "1e-3", "--data",
                 "decoy-digits:train", "--epochs", "1", "--optimizer", "adam", "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["method"] == "tap" and doc["sweep"]["lambdas"] == [1e-3]
    assert doc["config"]["optimizer"] == "adam" and doc["config"]["momentum"] == 0.9
    assert doc["sweep"]["runs"][0]["final_penalty"] > 0
    _, card = load_model(out)
    assert card.history[-1]["method"] == "tap"


def test_method_training_defaults_apply_unless_overridden(tmp_path):
    result = run("train", "--method", "rrr", "--data", "decoy-digits:train", "--epochs", "1", "-o",
                 tmp_path / "m.safetensors", "--json")
    assert result.exit_code == 0, result.stderr
    config = json.loads(result.stdout)["config"]
    assert (config["optimizer"], config["lr"], config["momentum"]) == ("sgd", 1e-3, 0.9)  # TAP's setup for RRR
    result = run("train", "--method", "retrain", "--data", "decoy-digits:train", "--epochs", "1", "--grad-clip", "5",
                 "-o", tmp_path / "r.safetensors", "--json")
    config = json.loads(result.stdout)["config"]
    assert (config["optimizer"], config["grad_clip"], config["freeze_bn"]) == ("adam", 5.0, True)


def test_methods_lists_every_method_with_its_paper(tmp_path):
    result = run("methods", "--json")
    assert result.exit_code == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert set(rows) == set(METHODS)
    assert {"tap", "rrr", "rbr", "retrain", "erm-l2", "egem", "rgem"} <= set(rows)
    assert rows["tap"]["needs_masks"] and rows["tap"]["lambda"] == "lam" and "Zhang" in rows["tap"]["paper"]
    assert rows["rrr"]["hyperparameters"]["target"] == "log-prob-sum"
    table = run("methods").stdout
    assert "tap" in table and "Right for the Right" in table


# ---- annotate -----------------------------------------------------------------------------------------------------


def write_folder(root, n_per_class=3, size=12):
    rng = np.random.default_rng(0)
    for cls in ("0", "1"):
        (root / cls).mkdir(parents=True)
        for i in range(n_per_class):
            Image.fromarray((rng.random((size, size)) * 255).astype(np.uint8)).save(root / cls / f"img{i}.png")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny mlp trained on a two-class 12×12 folder."""
    root = tmp_path_factory.mktemp("folder")
    write_folder(root / "data")
    path = root / "teacher.safetensors"
    result = run("train", "--arch", "mlp", "--data", root / "data", "--epochs", "2", "-o", path)
    assert result.exit_code == 0, result.stderr
    return path, root / "data"


@pytest.mark.parametrize("random", [False, True])
def test_annotate_writes_a_mirrored_mask_folder_with_tau_d_pixels(teacher, tmp_path, random):
    model, data = teacher
    masks = tmp_path / "masks"
    result = run("annotate", model, "--data", data, "--tau", "0.05", "-o", masks, *(["--random"] if random else []))
    assert result.exit_code == 0, result.stderr
    files = sorted(p.relative_to(masks).as_posix() for p in masks.rglob("*.png"))
    assert files == sorted(p.relative_to(data).as_posix() for p in data.rglob("*.png"))
    loaded = load_data(data, mask_dir=masks)
    assert bool(loaded.has_mask.all())
    assert (loaded.mask.flatten(1).sum(1) == mask_size(0.05, 144)).all()  # round(0.05 · 144) = 7


def test_annotate_bundle_feeds_finetune_on_a_scenario(tmp_path, shortcut):
    bundle = tmp_path / "masks.npz"
    result = run("annotate", shortcut, "--data", "decoy-digits:train", "--tau", "0.01", "-o", bundle)
    assert result.exit_code == 0, result.stderr
    data = load_data("decoy-digits:train", mask_dir=bundle)
    assert (data.mask.flatten(1).sum(1) == 8).all()  # round(0.01 · 784)
    assert not torch.equal(data.mask, load_data("decoy-digits:train").mask)
    out = tmp_path / "tap.safetensors"
    result = run("finetune", shortcut, "--method", "rrr", "--data", "decoy-digits:train", "--masks", bundle,
                 "--lambda", "1e-6", *ADAM, "--epochs", "1", "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["data"]["masks"] == str(bundle)


# ---- bad input ----------------------------------------------------------------------------------------------------


def assert_nothing_written(folder, *keep):
    assert sorted(p.name for p in folder.iterdir()) == sorted(keep)


@pytest.mark.parametrize("args,fragment", [
    (("--method", "tap", "--data", "decoy-digits:clean"), "needs masks"),
    (("--method", "tap"), "no conv feature maps"),
    (("--method", "egem"), "post-hoc"),
    (("--method", "nope"), "unknown method"),
    (("--method", "rrr", "--lambda", "x"), "--lambda"),
    (("--method", "erm", "--lambda", "1"), "no penalty weight"),
    (("--method", "tap", "--rrr-target", "loss"), "--rrr-target"),
    (("--method", "rrr", "--rrr-target", "nope"), "RRR target"),
    (("--method", "rrr", "--select-by", "vibes", "--lambda", "1,2", "--val", "decoy-digits:val"), "--select-by"),
])
def test_finetune_bad_options(shortcut, tmp_path, args, fragment):
    assert_one_line_error(run("finetune", shortcut, *args, "--epochs", "1", "-o", tmp_path / "o.safetensors"),
                          fragment)
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize("layers,fragment", [("conv9", "not a module"), ("fc1", "not spatial")])
def test_tap_layer_errors_before_training(tmp_path, layers, fragment):
    model = tmp_path / "cnn.safetensors"
    assert run("train", "--arch", "egem-cnn-ref", "--data", "decoy-digits:val", "--epochs", "1", "-o", model).exit_code == 0
    result = run("finetune", model, "--method", "tap", "--layers", layers, "--data", "decoy-digits:train", "-o",
                 tmp_path / "o.safetensors")
    assert_one_line_error(result, fragment)
    assert_nothing_written(tmp_path, "cnn.safetensors", "cnn.card.json")


def test_mask_folder_that_does_not_mirror_the_data(teacher, tmp_path):
    model, data = teacher
    (tmp_path / "masks" / "0").mkdir(parents=True)
    Image.fromarray(np.zeros((12, 12), np.uint8)).save(tmp_path / "masks" / "0" / "elsewhere.png")
    result = run("finetune", model, "--method", "rrr", "--data", data, "--masks", tmp_path / "masks", "-o",
                 tmp_path / "o.safetensors")
    assert_one_line_error(result, "elsewhere.png", "has no image")
    assert not (tmp_path / "o.safetensors").exists()


def test_mask_bundle_for_other_data_is_refused(shortcut, tmp_path):
    bundle = tmp_path / "masks.npz"
    assert run("annotate", shortcut, "--data", "decoy-digits:val", "--random", "-o", bundle).exit_code == 0
    result = run("finetune", shortcut, "--method", "rrr", "--data", "decoy-digits:train", "--masks", bundle, "-o",
                 tmp_path / "o.safetensors")
    assert_one_line_error(result, "masks.npz", "items")
    assert_nothing_written(tmp_path, "masks.npz")


def test_finetune_nan_exits_1_with_epoch_and_last_finite_loss(shortcut, tmp_path):
    out = tmp_path / "o.safetensors"
    result = run("finetune", shortcut, "--method", "erm-l2", "--lambda", "1e30", "--optimizer", "sgd", "--lr", "1e10",
                 "--epochs", "2", "-o", out)
    assert_one_line_error(result, "epoch", "last finite loss", code=1)
    assert not out.exists()


def test_finetune_refuses_to_overwrite_its_input(shortcut):
    assert_one_line_error(run("finetune", shortcut, "--method", "erm", "--epochs", "1", "-o", shortcut))


@pytest.mark.parametrize("args,fragment", [(("--tau", "0"), "tau"), (("--tau", "1.5"), "tau")])
def test_annotate_bad_tau(shortcut, tmp_path, args, fragment):
    assert_one_line_error(run("annotate", shortcut, *args, "-o", tmp_path / "m.npz"), fragment)
    assert_nothing_written(tmp_path)


def test_annotate_scenario_to_a_folder_is_refused(shortcut, tmp_path):
    assert_one_line_error(run("annotate", shortcut, "-o", tmp_path / "masks"), "bundle")
    assert_nothing_written(tmp_path)
