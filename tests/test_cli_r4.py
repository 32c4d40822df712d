"""The R4 family, PGD-Ex and IBP-Ex through `train`/`finetune`, `evaluate --fragility`, and their bad inputs."""

import json

import pytest
import torch
from cli_helpers import assert_one_line_error, run

from modelfix.card import InputSpec, ModelCard
from modelfix.checkpoint import save_model
from modelfix.zoo import build_model

FAMILY = ("r4-cert", "r4-rand", "r4-adv", "smooth-rrr", "pgd-ex", "ibp-ex", "ibp-ex-rrr")


def _options(method: str) -> tuple[str, ...]:
    """Only the options the method takes (the others are refused, as tested below)."""
    options = ["--epochs", "1", "--batch-size", "256"]
    if method in ("r4-rand", "smooth-rrr"):
        options += ["--samples", "2"]
    if method in ("r4-adv", "pgd-ex"):
        options += ["--steps", "2"]
    return tuple(options)


@pytest.mark.parametrize("method", FAMILY)
def test_every_interval_and_perturbation_method_trains_through_the_cli(method, tmp_path):
    out = tmp_path / f"{method}.safetensors"
    result = run("train", "--arch", "mlp", "--data", "decoy-digits:train", "--method", method, *_options(method),
                 "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    run_doc = json.loads(result.stdout)["sweep"]["runs"][0]
    assert run_doc["final_penalty"] is not None and run_doc["final_penalty"] > 0
    assert out.is_file()


def test_ibp_ex_ramp_is_logged_per_epoch_and_refused_elsewhere(tmp_path):
    result = run("train", "--arch", "mlp", "--data", "decoy-digits:train", "--method", "ibp-ex", "--ramp",
                 "--alpha", "1", "--eps", "0.2", "--eps-start", "0.1", "--epochs", "2", "--batch-size", "512",
                 "-o", tmp_path / "m.safetensors", "--json")
    assert result.exit_code == 0, result.stderr
    epochs = json.loads(result.stdout)["sweep"]["runs"][0]["epochs"]
    assert [e["alpha"] for e in epochs] == pytest.approx([1.0, 0.75])
    assert [e["eps"] for e in epochs] == pytest.approx([0.1, 0.2])
    bad = run("train", "--arch", "mlp", "--data", "decoy-digits:train", "--method", "rrr", "--ramp", "--epochs", "1",
              "-o", tmp_path / "r.safetensors")
    assert_one_line_error(bad)
    assert "--ramp does not apply to method 'rrr'" in bad.stderr


@pytest.mark.parametrize("method", ["r4-cert", "ibp-ex", "pgd-ex", "r4-rand"])
def test_a_box_radius_that_is_not_positive_is_refused(method, shortcut, tmp_path):
    out = tmp_path / "m.safetensors"
    result = run("finetune", shortcut, "--method", method, "--eps", "0", "--epochs", "1", "-o", out)
    assert_one_line_error(result)
    assert "--eps must be > 0" in result.stderr and not out.exists()


@pytest.mark.parametrize("method", ["r4-cert", "ibp-ex-rrr", "smooth-rrr"])
def test_mask_methods_refuse_data_without_masks(method, shortcut, tmp_path):
    out = tmp_path / "m.safetensors"
    result = run("finetune", shortcut, "--method", method, "--data", "decoy-digits:clean", "--epochs", "1", "-o", out)
    assert_one_line_error(result)
    assert "needs masks" in result.stderr and not out.exists()


def test_an_unsupported_layer_is_named_with_the_supported_list(tmp_path):
    """densenet121's dense blocks concatenate features, which interval bounds do not cover."""
    import numpy as np

    torch.manual_seed(0)
    card = ModelCard(arch="densenet121", num_classes=2, input=InputSpec(1, 32, 32, (0.5,), (0.5,)))
    path = save_model(build_model(card), card, tmp_path / "dense.safetensors")
    before = path.read_bytes()
    mask = np.zeros((4, 1, 32, 32), np.float32)
    mask[:, :, :4, :4] = 1
    bundle = tmp_path / "data.npz"
    np.savez(bundle, x=np.random.default_rng(0).random((4, 1, 32, 32), dtype=np.float32), y=np.array([0, 1, 0, 1]),
             mask=mask)
    out = tmp_path / "out.safetensors"
    result = run("finetune", path, "--method", "r4-cert", "--data", bundle, "--epochs", "1", "-o", out)
    assert_one_line_error(result)
    assert "DenseNet" in result.stderr and "supported: Sequential" in result.stderr and "ResNet" in result.stderr
    assert not out.exists() and path.read_bytes() == before


def test_evaluate_fragility_reports_masked_core_and_ratio(shortcut, tmp_path):
    result = run("evaluate", shortcut, "--data", "decoy-digits:test-permuted", "--poison", "0", "--fragility", "0.1",
                 "-o", tmp_path / "run", "--json")
    assert result.exit_code == 0, result.stderr
    frag = json.loads(result.stdout)["fragility"]
    assert frag["masked"] > 0 and frag["core"] > 0
    assert frag["ratio"] == pytest.approx(frag["masked"] / frag["core"])
    assert frag["source"] == "masks" and frag["n"] > 0
    assert "Explanation fragility" in (tmp_path / "run" / "report.md").read_text()
    bad = run("evaluate", shortcut, "--fragility", "-1")
    assert_one_line_error(bad)
    assert "--fragility must be > 0" in bad.stderr
