"""`prune-egem` and `refit` end to end on the embedded default, and their bad inputs: one line, exit 2, nothing written."""

import json

import pytest
import torch
from cli_helpers import assert_one_line_error, run
from safetensors import safe_open

from modelfix.checkpoint import load_model
from modelfix.data import load_data


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    """An egem-cnn trained briefly on decoy digits."""
    path = tmp_path_factory.mktemp("model") / "cnn.safetensors"
    result = run("train", "--arch", "egem-cnn", "--data", "decoy-digits:train", "--epochs", "3", "--lr", "0.003",
                 "--batch-size", "64", "-o", path)
    assert result.exit_code == 0, result.stderr
    return path




def test_prune_egem_writes_a_folded_checkpoint_and_report(cnn, tmp_path):
    out = tmp_path / "egem.safetensors"
    # the paper's slack rule prunes here (the counterfactual rule keeps α = 1 on this model: nothing to fold)
    result = run("prune-egem", cnn, "--clean-dir", "decoy-digits:val", "--samples-per-class", "30", "-o", out,
                 "--report", tmp_path / "report", "--json", "--select", "paper")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    trace = doc["trace"]
    assert trace["points"] == ["pool1", "flatten", "relu3"]  # the paper's MNIST points
    assert [row["alpha"] for row in trace["selection"]][0] == 1.0 and len(trace["selection"]) == 14
    assert trace["val_acc"] >= 0.95 * trace["val_orig"] - 1e-9
    assert {row["name"] for row in trace["layers"]} <= {"pool1", "flatten", "relu3"}
    assert not doc["fold"]["kept"]  # every EGEM scale on this net folds exactly
    with safe_open(str(out), "pt") as f:
        assert not [k for k in f.keys() if k.startswith("modelfix.patch.")]
    model, card = load_model(out)
    assert card.history[-1]["command"] == "prune-egem" and card.provenance["parent"] == str(cnn)
    assert "selection" in (tmp_path / "report" / "report.md").read_text()


def test_pca_egem_keeps_conv_patches_that_reload(cnn, tmp_path):
    out = tmp_path / "pca.safetensors"
    result = run("prune-egem", cnn, "--clean-dir", "decoy-digits:val", "--method", "pca-egem", "--alpha", "0.3",
                 "--layers", "pool1,pool2", "--samples-per-class", "30", "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["trace"]["selected_by"] == "given"
    kept = {entry["target"] for entry in doc["fold"]["kept"]}
    assert "pool2" in kept  # conv sum-ratio patches cannot fold (pool1 has τ = 1: no patch)
    model, card = load_model(out)
    assert card.patches and {p["target"] for p in card.patches} == kept
    # strict folding refuses and writes nothing
    strict = tmp_path / "strict.safetensors"
    result = run("prune-egem", cnn, "--clean-dir", "decoy-digits:val", "--method", "pca-egem", "--alpha", "0.3",
                 "--layers", "pool1,pool2", "--samples-per-class", "30", "--fold", "-o", strict)
    assert_one_line_error(result, "fold")
    assert not strict.exists()


@pytest.mark.parametrize("method", ["rgem", "ridge"])
def test_refit_changes_only_the_last_layer(cnn, tmp_path, method):
    out = tmp_path / f"{method}.safetensors"
    result = run("refit", cnn, "--clean-dir", "decoy-digits:val", "--method", method, "--samples-per-class", "30",
                 "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    before, _ = load_model(cnn)
    after, card = load_model(out)
    changed = [k for k, v in after.net.state_dict().items() if not torch.equal(v, before.net.state_dict()[k])]
    assert set(changed) <= {"fc2.weight", "fc2.bias"} and changed
    assert card.history[-1]["method"] == method


def test_bad_inputs_fail_in_one_line(cnn, tmp_path):
    out = tmp_path / "x.safetensors"
    assert_one_line_error(run("prune-egem", cnn, "-o", out), "--clean-dir")
    assert_one_line_error(run("prune-egem", cnn, "--clean-dir", "decoy-digits:val", "--slack", "1.5", "-o", out), "--slack")
    assert_one_line_error(run("prune-egem", cnn, "--clean-dir", "decoy-digits:val", "--layers", "nope*", "-o", out),
                          "nope")
    single = tmp_path / "single.npz"
    d = load_data("decoy-digits:val")
    import numpy as np

    keep = (d.y == 3).numpy()
    np.savez(single, x=d.x.numpy()[keep], y=d.y.numpy()[keep])
    assert_one_line_error(run("prune-egem", cnn, "--clean-dir", single, "-o", out), "class")
    empty = tmp_path / "empty.npz"
    np.savez(empty, x=np.zeros((0, 1, 28, 28), np.float32), y=np.zeros((0,), np.int64))
    assert_one_line_error(run("refit", cnn, "--clean-dir", empty, "-o", out))
    assert_one_line_error(run("refit", cnn, "--clean-dir", "decoy-digits:val", "--lambda", "-1", "-o", out), "--lambda")
    assert not out.exists()
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*"))
