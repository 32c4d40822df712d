"""CRAYON on the command line: feedback gallery / saliency / simulate, prune-crayon, finetune --method
crayon-attention, and their bad inputs (one line, exit 2, nothing written)."""

import json

import pytest
import torch
from cli_helpers import assert_one_line_error, run

from modelfix.checkpoint import load_model
from modelfix.data import load_data
from modelfix.feedback import read_neuron_feedback, read_sample_feedback


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    path = tmp_path_factory.mktemp("mlp") / "mlp.safetensors"
    result = run("train", "--arch", "mlp", "--data", "decoy-digits:train", "--epochs", "4", "--lr", "0.003", "-o", path)
    assert result.exit_code == 0, result.stderr
    return path


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    """tap-cnn: its default feedback layer (pool2, 100 channels of 6×6) is spatial and feeds the last Linear."""
    path = tmp_path_factory.mktemp("cnn") / "cnn.safetensors"
    result = run("train", "--arch", "tap-cnn", "--data", "decoy-digits:val", "--epochs", "1", "-o", path)
    assert result.exit_code == 0, result.stderr
    return path


def test_gallery_writes_one_grid_per_neuron_and_a_template(cnn, tmp_path):
    out = tmp_path / "gallery"
    result = run("feedback", "gallery", cnn, "--data", "decoy-digits:val", "--top-k", "3", "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["layer"] == "pool2" and summary["channels"] == 100
    assert len(list(out.glob("neuron_*.png"))) == 100 and (out / "index.html").is_file()
    blank = read_neuron_feedback(out / "neurons.csv", 100, "pool2")
    assert blank.prune == [] and len(blank.keep) == 100


def test_simulated_neurons_drive_prune_crayon_and_the_output_is_a_stock_checkpoint(cnn, tmp_path):
    verdicts = tmp_path / "neurons.csv"
    result = run("feedback", "simulate", cnn, "--kind", "neurons", "--data", "decoy-digits:val", "--top-k", "5",
                 "-o", verdicts, "--json")
    assert result.exit_code == 0, result.stderr
    counts = json.loads(result.stdout)["counts"]
    assert counts["no"] + counts["yes"] == 100
    fb = read_neuron_feedback(verdicts, 100)
    assert fb.layer == "pool2" and len(fb.prune) == counts["no"]
    # prune a known set, so the test does not depend on how many neurons the simulation flagged
    (tmp_path / "pick.yaml").write_text("layer: pool2\nprune: [3, 7, 42]\n")
    out = tmp_path / "pruned.safetensors"
    result = run("prune-crayon", cnn, "--feedback", tmp_path / "pick.yaml", "--data", "decoy-digits:val",
                 "--epochs", "2", "-o", out, "--report", tmp_path / "rep", "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["trace"]["pruned"] == [3, 7, 42] and doc["trace"]["layer"] == "pool2"
    model, card = load_model(out)
    assert not card.patches  # folded: plain weights
    weight = model.net.fc.weight.detach()
    for j in (3, 7, 42):
        assert torch.count_nonzero(weight[:, j * 36:(j + 1) * 36]) == 0
    assert torch.count_nonzero(weight[:, 0:36]) > 0
    assert "3, 7, 42" in (tmp_path / "rep" / "report.md").read_text()
    random_out = tmp_path / "random.safetensors"
    result = run("prune-crayon", cnn, "--feedback", tmp_path / "pick.yaml", "--random", "--data",
                 "decoy-digits:val", "--epochs", "0", "-o", random_out, "--json")
    assert result.exit_code == 0, result.stderr
    assert len(json.loads(result.stdout)["trace"]["pruned"]) == 3


def test_saliency_and_simulated_sample_feedback_drive_crayon_attention(mlp, tmp_path):
    result = run("feedback", "saliency", mlp, "--data", "decoy-digits:val", "-o", tmp_path / "maps")
    assert result.exit_code == 0, result.stderr
    assert len(list((tmp_path / "maps").glob("overlay_*.png"))) == 179
    samples = tmp_path / "samples.csv"
    result = run("feedback", "simulate", mlp, "--kind", "samples", "--region", "corners", "--data",
                 "decoy-digits:val", "-o", samples, "--json")
    assert result.exit_code == 0, result.stderr
    counts = json.loads(result.stdout)["counts"]
    assert counts["yes"] == 0 and counts["no"] > 0  # the paper's DecoyMNIST rule gives no "yes"
    verdicts = read_sample_feedback(samples).for_data(load_data("decoy-digits:val"))
    assert verdicts.count("no") == counts["no"]
    out = tmp_path / "ca.safetensors"
    result = run("finetune", mlp, "--method", "crayon-attention", "--feedback", samples, "--data", "decoy-digits:val",
                 "--beta", "3", "--epochs", "1", "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["hyperparameters"] == {"beta": 3.0} and doc["data"]["feedback"] == str(samples)
    assert doc["sweep"]["runs"][0]["final_penalty"] > 0


# ---- bad input ----------------------------------------------------------------------------------------------------


def test_prune_crayon_bad_feedback(cnn, tmp_path):
    out = tmp_path / "o.safetensors"
    (tmp_path / "unknown.yaml").write_text("layer: pool2\nprune: [100]\n")
    assert_one_line_error(run("prune-crayon", cnn, "--feedback", tmp_path / "unknown.yaml", "--data",
                              "decoy-digits:val", "-o", out), "unknown neuron 100")
    (tmp_path / "bad.csv").write_text("layer,neuron,verdict\npool2,1,yes\npool2,two,no\n")
    assert_one_line_error(run("prune-crayon", cnn, "--feedback", tmp_path / "bad.csv", "--data",
                              "decoy-digits:val", "-o", out), "row 3")
    (tmp_path / "conv.yaml").write_text("layer: conv2\nprune: [1]\n")
    assert_one_line_error(run("prune-crayon", cnn, "--feedback", tmp_path / "conv.yaml", "--data",
                              "decoy-digits:val", "-o", out), "not followed by a linear layer")
    assert_one_line_error(run("prune-crayon", cnn, "--data", "decoy-digits:val", "-o", out), "--feedback")
    assert not out.exists()


def test_prune_crayon_without_no_verdicts_warns_that_nothing_changes(cnn, tmp_path):
    (tmp_path / "keep.yaml").write_text("layer: pool2\nkeep: [1, 2]\n")
    result = run("prune-crayon", cnn, "--feedback", tmp_path / "keep.yaml", "--data", "decoy-digits:val",
                 "-o", tmp_path / "o.safetensors")
    assert result.exit_code == 0, result.stderr
    assert "warning" in result.stderr and "nothing pruned" in result.stderr
    assert "pruned 0 of" in result.stdout and "nan" not in result.stdout


def test_crayon_attention_bad_feedback(mlp, tmp_path):
    out = tmp_path / "o.safetensors"
    assert_one_line_error(run("finetune", mlp, "--method", "crayon-attention", "--data", "decoy-digits:val",
                              "-o", out), "--feedback")
    (tmp_path / "s.csv").write_text("sample,verdict\n0,no\n5000,no\n")
    assert_one_line_error(run("finetune", mlp, "--method", "crayon-attention", "--feedback", tmp_path / "s.csv",
                              "--data", "decoy-digits:val", "-o", out), "5000")
    assert_one_line_error(run("finetune", mlp, "--method", "rrr", "--feedback", tmp_path / "s.csv",
                              "--data", "decoy-digits:val", "-o", out), "--feedback")
    assert not out.exists()


def test_simulate_refuses_non_spatial_neurons_and_data_without_masks(mlp, tmp_path):
    assert_one_line_error(run("feedback", "simulate", mlp, "--kind", "neurons", "-o", tmp_path / "n.csv"),
                          "not spatial")
    assert_one_line_error(run("feedback", "simulate", mlp, "--kind", "samples", "--data", "decoy-digits:clean",
                              "-o", tmp_path / "s.csv"), "masks")
    assert_one_line_error(run("feedback", "simulate", mlp, "--kind", "both", "-o", tmp_path / "s.csv"), "--kind")
    assert list(tmp_path.iterdir()) == []
