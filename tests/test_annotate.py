"""Teacher annotations: exact pixel counts, lowest-saliency selection, the saliency itself, seeding, mask writing."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from modelfix.card import InputSpec
from modelfix.data import Dataset, load_data, save_folder
from modelfix.errors import ModelfixError
from modelfix.repair.annotate import annotate, lowest_fraction_mask, saliency, write_masks
from modelfix.zoo import Classifier


def tiny_linear(channels=2, size=4, classes=3, seed=0, dtype=torch.float64) -> Classifier:
    torch.manual_seed(seed)
    net = nn.Sequential(OrderedDict([("flatten", nn.Flatten()), ("fc", nn.Linear(channels * size * size, classes))]))
    spec = InputSpec(channels, size, size, mean=(0.3, 0.1)[:channels], std=(0.5, 2.0)[:channels])
    return Classifier(net, spec).to(dtype)


def tiny_cnn(seed=0) -> Classifier:
    torch.manual_seed(seed)
    net = nn.Sequential(OrderedDict([
        ("conv", nn.Conv2d(1, 3, 3, padding=1)), ("bn", nn.BatchNorm2d(3)), ("relu", nn.ReLU()),
        ("flatten", nn.Flatten()), ("fc", nn.Linear(3 * 5 * 5, 4))]))
    model = Classifier(net, InputSpec(1, 5, 5, mean=(0.2,), std=(0.7,)))
    with torch.no_grad():  # non-trivial running statistics, so eval mode differs from train mode
        model.net.bn.running_mean.uniform_(-0.5, 0.5)
        model.net.bn.running_var.uniform_(0.5, 2.0)
    return model


# ---- selection ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tau", [0.01, 0.05, 0.1, 0.3, 0.5, 0.9])
def test_mask_marks_exactly_round_tau_d_pixels_even_with_ties(tau):
    gen = torch.Generator().manual_seed(1)
    scores = torch.randint(0, 3, (6, 1, 28, 28), generator=gen).float()  # three values: ties everywhere
    scores[0] = 0.0  # an all-tied image
    mask = lowest_fraction_mask(scores, tau)
    k = max(1, round(tau * 784))
    assert mask.shape == scores.shape
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert mask.sum(dim=(1, 2, 3)).tolist() == [float(k)] * 6


def test_mask_marks_at_least_one_pixel():
    mask = lowest_fraction_mask(torch.rand(3, 1, 5, 5), 1e-4)  # round(0.0025) = 0 → 1
    assert mask.sum(dim=(1, 2, 3)).tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("tau", [0.05, 0.2, 0.5])
def test_mask_is_the_lowest_scores_with_earliest_pixel_winning_ties(tau):
    gen = torch.Generator().manual_seed(2)
    scores = torch.randint(0, 5, (4, 1, 6, 7), generator=gen).float()
    mask = lowest_fraction_mask(scores, tau)
    k = max(1, round(tau * 42))
    for b in range(4):
        flat = scores[b].flatten().tolist()
        chosen = sorted(range(42), key=lambda i: (flat[i], i))[:k]  # brute force: by score, then pixel index
        expected = torch.zeros(42)
        expected[chosen] = 1.0
        assert torch.equal(mask[b].flatten(), expected)


@pytest.mark.parametrize("tau", [0.0, 1.0, -0.1, 1.5, float("nan"), "x"])
def test_tau_outside_the_open_unit_interval_is_refused(tau):
    with pytest.raises(ModelfixError, match="--tau"):
        lowest_fraction_mask(torch.rand(1, 1, 4, 4), tau)


# ---- saliency ----------------------------------------------------------------------------------------------------


def test_saliency_of_a_linear_model_matches_the_closed_form():
    # logits = W z + b, z = (x − mean)/std, so ∂Σ_k log p_k/∂z = Σ_k W_k − K·pᵀW; channels summed in |·|.
    model = tiny_linear()
    x = torch.rand(5, 2, 4, 4, dtype=torch.float64)
    got = saliency(model, x, batch_size=2)
    w = model.net.fc.weight.detach()  # K×D
    p = torch.softmax(model(x).detach(), dim=1)  # N×K
    g = w.sum(0) - 3 * p @ w  # N×D
    expected = g.reshape(5, 2, 4, 4).abs().sum(dim=1, keepdim=True)
    assert got.shape == (5, 1, 4, 4)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


def test_saliency_matches_finite_differences_in_eval_mode_and_restores_flags():
    model = tiny_cnn().double().train()
    x = torch.rand(3, 1, 5, 5, dtype=torch.float64)
    got = saliency(model, x, batch_size=1)  # one image per batch: only correct if BatchNorm is in eval mode
    assert model.training and model.net.bn.training  # flags restored

    def scalar(xi):
        with torch.no_grad():
            model.eval()
            value = torch.log_softmax(model(xi), dim=1).sum()
            model.train()
        return float(value)

    h = 1e-6
    std = 0.7
    for b in range(3):
        for i, j in [(0, 0), (2, 3), (4, 1)]:
            plus, minus = x[b:b + 1].clone(), x[b:b + 1].clone()
            plus[0, 0, i, j] += h
            minus[0, 0, i, j] -= h
            dz = (scalar(plus) - scalar(minus)) / (2 * h) * std  # ∂/∂z = std · ∂/∂x
            assert got[b, 0, i, j].item() == pytest.approx(abs(dz), rel=1e-5, abs=1e-7)
    assert torch.equal(got, saliency(model, x, batch_size=3))


# ---- annotate ----------------------------------------------------------------------------------------------------


def small_data(n=6, seed=0) -> Dataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 1, 5, 5), generator=gen).float() / 255
    return Dataset(x=x, y=torch.arange(n) % 2, class_names=["a", "b"], name="small")


def test_annotate_replaces_the_mask_with_the_teacher_mask():
    model, data = tiny_cnn().eval(), small_data()
    out = annotate(model, data, tau=0.2)
    assert torch.equal(out.mask, lowest_fraction_mask(saliency(model, data.x), 0.2))
    assert out.has_mask.all() and out.mask.sum(dim=(1, 2, 3)).eq(5).all()
    assert torch.equal(out.x, data.x) and not data.has_mask.any()  # the input is untouched
    assert out.info["annotation"]["tau"] == 0.2 and out.info["checksum"] == out.checksum()


def test_random_annotation_is_seeded_and_ignores_the_model():
    data = small_data(n=20)
    a = annotate(None, data, tau=0.2, random=True, seed=3)
    b = annotate(tiny_cnn(), data, tau=0.2, random=True, seed=3)
    c = annotate(None, data, tau=0.2, random=True, seed=4)
    assert torch.equal(a.mask, b.mask) and not torch.equal(a.mask, c.mask)
    assert a.mask.sum(dim=(1, 2, 3)).eq(5).all() and a.has_mask.all()
    with pytest.raises(ModelfixError, match="teacher"):
        annotate(None, data, tau=0.2)


# ---- writing -----------------------------------------------------------------------------------------------------


def plain_folder(root: Path, data: Dataset) -> Path:
    """DIR/<class>/<name>.png, the ordinary user layout."""
    for i in range(len(data)):
        folder = root / data.class_names[int(data.y[i])]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((data.x[i, 0] * 255).round().byte().numpy()).save(folder / f"img{i}.png")
    return root


@pytest.mark.parametrize("layout", ["plain", "saved"])
def test_mask_folder_round_trips_through_load_data(tmp_path, layout):
    source = small_data()
    root = plain_folder(tmp_path / "data", source) if layout == "plain" else save_folder(source, tmp_path / "data")
    data = load_data(root)
    annotated = annotate(None, data, tau=0.3, random=True, seed=1)
    out = write_masks(annotated, tmp_path / "masks")
    back = load_data(root, mask_dir=out)
    assert torch.equal(back.mask, annotated.mask) and back.has_mask.all()
    assert torch.equal(back.x, data.x)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "masks"]  # no temporary folder left


def test_mask_folder_writer_leaves_nothing_on_failure(tmp_path, monkeypatch):
    data = load_data(plain_folder(tmp_path / "data", small_data()))
    annotated = annotate(None, data, tau=0.3, random=True)
    calls = {"n": 0}
    real_save = Image.Image.save

    def failing_save(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full")
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        write_masks(annotated, tmp_path / "masks")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_mask_writer_refusals(tmp_path):
    data = load_data(plain_folder(tmp_path / "data", small_data()))
    annotated = annotate(None, data, tau=0.3, random=True)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("keep")
    with pytest.raises(ModelfixError, match="not empty"):
        write_masks(annotated, tmp_path / "full")
    assert (tmp_path / "full" / "x.txt").read_text() == "keep"
    with pytest.raises(ModelfixError, match="inside the data"):
        write_masks(annotated, tmp_path / "data" / "masks")
    scenario_like = Dataset(x=torch.rand(2, 1, 5, 5), y=torch.tensor([0, 1]))
    with pytest.raises(ModelfixError, match="bundle"):
        write_masks(scenario_like, tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_bundle_round_trips_for_data_without_a_folder(tmp_path):
    annotated = annotate(None, small_data(), tau=0.1, random=True, seed=5)
    path = write_masks(annotated, tmp_path / "masks.npz")
    back = load_data(path)
    assert torch.equal(back.mask, annotated.mask) and torch.equal(back.x, annotated.x) and back.has_mask.all()
    assert back.mask.sum(dim=(1, 2, 3)).eq(max(1, round(0.1 * 25))).all()
