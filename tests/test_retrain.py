"""EGEM's Retrain baseline: one run with snapshots at the epoch grid, frozen BatchNorm, slack selection."""

import copy

import torch
from torch import nn

from modelfix.card import InputSpec
from modelfix.data import Dataset
from modelfix.repair.refinement import refinement_split
from modelfix.repair.retrain import RetrainConfig, fit_retrain
from modelfix.training import TrainConfig, train
from modelfix.zoo import Classifier


def setup():
    torch.manual_seed(0)
    x = torch.rand(120, 1, 4, 4)
    y = (x[:, 0, 0, 0] > 0.5).long()
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 2))
    model = Classifier(net, InputSpec(1, 4, 4, (0.0,), (1.0,)))
    data = Dataset(x=x, y=y)
    train(model, data, TrainConfig(epochs=3, lr=0.05, batch_size=16), progress=False)
    return model, refinement_split(model, data, samples_per_class=30, keep_incorrect=True)


def test_given_epochs_equals_a_plain_run_with_frozen_batchnorm():
    model, split = setup()
    bn_before = copy.deepcopy(model.net[1].state_dict())
    tuned, trace = fit_retrain(model, split, RetrainConfig(epochs=2, lr=1e-2, grad_clip=1.0), progress=False)
    reference = copy.deepcopy(model)
    train(reference, split.expanded("fit"), TrainConfig(optimizer="adam", lr=1e-2, epochs=2, batch_size=128,
                                                        grad_clip=1.0, freeze_bn=True), progress=False)
    for a, b in zip(tuned.state_dict().values(), reference.state_dict().values()):
        assert torch.equal(a, b)
    # frozen: running statistics and affine parameters untouched; the caller's model unchanged
    for key, value in tuned.net[1].state_dict().items():
        assert torch.equal(value, bn_before[key]), key
    assert not torch.equal(tuned.net[0].weight, model.net[0].weight)
    assert torch.equal(model.net[1].running_mean, bn_before["running_mean"])
    assert trace["epochs"] == 2 and trace["selected_by"] == "given"


def test_selection_takes_the_most_epochs_within_slack():
    model, split = setup()
    tuned, trace = fit_retrain(model, split, RetrainConfig(grid=(1, 2, 4), lr=1e-2, slack=0.05), progress=False)
    passed = [row["epochs"] for row in trace["selection"] if row["passed"]]
    assert trace["epochs"] == (passed[-1] if passed else 1)
    assert [row["epochs"] for row in trace["selection"]] == [1, 2, 4]
