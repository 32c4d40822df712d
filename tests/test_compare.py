"""`modelfix compare` on what a user brings: an image folder, a card-less .pt, a mask folder and an artifact image."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cli_helpers import assert_one_line_error, run


def test_compare_on_a_folder_a_card_less_pt_masks_and_an_artifact_image(tmp_path, shortcut_cnn):
    folder, pt = shortcut_cnn
    tag = tmp_path / "tag.png"
    Image.fromarray(np.full((4, 4), 255, dtype=np.uint8)).save(tag)  # the scenario's white 4×4 tag
    out = tmp_path / "compare"
    result = run("compare", pt, "--arch", "egem-cnn", "--num-classes", "10", "--in-channels", "1",
                 "--input-size", "28x28", "--data", folder / "train" / "images", "--masks", folder / "train" / "masks",
                 "--clean-dir", folder / "clean" / "images", "--eval-data", folder / "test" / "images",
                 "--artifact", f"image:{tag}@0:0", "--methods", "rgem,ridge,rrr,crayon-pruning", "--epochs", "1",
                 "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    rows = {row["method"]: row for row in doc["rows"]}
    assert set(rows) == {"original", "rgem", "ridge", "rrr", "crayon-pruning"}
    assert rows["crayon-pruning"]["status"] == "skipped" and "neuron verdicts" in rows["crayon-pruning"]["reason"]
    for name in ("original", "rgem", "ridge", "rrr"):
        row = rows[name]
        assert row["status"] == "ok" and row["gap"] == row["clean"] - row["poisoned"]
        assert 0 <= row["worst_clean"] <= row["clean"] and 0 <= row["worst_poisoned"] <= row["poisoned"]
    assert rows["original"]["gap"] > 0.1  # the tag pasted by the artifact image costs the shortcut model accuracy
    for name in ("rgem", "ridge", "rrr"):
        assert (out / f"{name}.safetensors").is_file()
    html = (out / "report.html").read_text()
    for name in ("rgem", "ridge", "rrr"):  # the report shows the gap of every method
        assert f"<td>{name}</td>" in html and f"{100 * rows[name]['gap']:.1f}" in html
    assert json.loads((out / "results.json").read_text())["rows"] == doc["rows"]


def test_compare_refuses_an_unknown_method_before_any_work(tmp_path, shortcut_cnn):
    _, pt = shortcut_cnn
    assert_one_line_error(run("compare", pt, "--arch", "egem-cnn", "--methods", "egem,nope", "-o", tmp_path / "o"),
                          "unknown method 'nope'")
    assert not (tmp_path / "o").exists()


def _train_shortcut(folder_root):
    """tagged-digits exported as folders, and an egem-cnn trained on it saved as a plain state dict (.pt)."""
    from modelfix.card import InputSpec, ModelCard
    from modelfix.data import load_scenario
    from modelfix.training import TrainConfig, train
    from modelfix.zoo import build_model, default_input_spec

    assert run("data", "make", "tagged-digits", "-o", folder_root).exit_code == 0
    data = load_scenario("tagged-digits", "train")
    card = ModelCard(arch="egem-cnn", num_classes=10, class_names=list(data.class_names),
                     input=InputSpec(*data.shape, default_input_spec("egem-cnn").mean, default_input_spec("egem-cnn").std))
    torch.manual_seed(0)
    model = build_model(card)
    train(model, data, TrainConfig(epochs=3, lr=3e-3, batch_size=64), progress=False)
    pt = folder_root.parent / "cnn.pt"
    torch.save(model.net.state_dict(), pt)
    return folder_root, pt



@pytest.fixture(scope="module")
def shortcut_cnn(tmp_path_factory):
    return _train_shortcut(tmp_path_factory.mktemp("compare") / "tagged")
