"""The refinement split (stratified ceil-20 % validation before oversampling) and the slack rule."""

import math

import pytest
import torch
from torch import nn

from modelfix.card import InputSpec
from modelfix.data import Dataset
from modelfix.errors import DataError, ModelfixError
from modelfix.repair.refinement import refinement_split, weighted_accuracy
from modelfix.repair.selection import check_slack, select_by_slack, selection_table, threshold
from modelfix.zoo import Classifier


class Oracle(nn.Module):
    """Predicts the class written in pixel (0, 0) (so which samples are 'correct' is under the test's control)."""

    def __init__(self, k=3):
        super().__init__()
        self.k = k
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        label = x[:, 0, 0, 0].round().long().clamp(0, self.k - 1)
        return nn.functional.one_hot(label, self.k).float() + 0 * self.dummy


def dataset(counts, wrong=()):
    ys = torch.cat([torch.full((n,), k) for k, n in enumerate(counts)])
    x = torch.zeros(len(ys), 1, 2, 2)
    x[:, 0, 0, 0] = ys.float()
    x[:, 0, 1, 1] = torch.arange(len(ys)).float()  # a per-item id
    for i in wrong:
        x[i, 0, 0, 0] = (ys[i] + 1) % len(counts)
    return Dataset(x=x, y=ys, class_names=[str(k) for k in range(len(counts))])


def model(k=3):
    return Classifier(Oracle(k), InputSpec(1, 2, 2, (0.0,), (1.0,))).eval()


def test_split_is_stratified_disjoint_and_oversampled():
    data = dataset([10, 3, 40], wrong=[0, 1])
    split = refinement_split(model(), data, samples_per_class=20, seed=1)
    ids = lambda d: set(d.x[:, 0, 1, 1].long().tolist())  # noqa: E731
    assert not ids(split.fit) & ids(split.val)
    assert {0, 1} & (ids(split.fit) | ids(split.val)) == set()  # wrongly predicted items are dropped
    n_val = math.ceil(0.2 * 20)
    for k, unique in ((0, 8), (1, 3), (2, 20)):  # class 2 is capped at N = 20 unique samples
        val_k, fit_k = split.val.y == k, split.fit.y == k
        assert int(val_k.sum()) == math.ceil(0.2 * unique)
        assert int(fit_k.sum()) == unique - math.ceil(0.2 * unique)
        assert int(split.val_counts[val_k].sum()) == n_val
        assert int(split.fit_counts[fit_k].sum()) == 20 - n_val
        # oversampling is as even as possible: multiplicities differ by at most one
        counts = split.fit_counts[fit_k]
        assert int(counts.max() - counts.min()) <= 1
    assert split.summary["correct"] <= 51 and split.summary["fit_size"] == 48
    assert len(split.expanded("val")) == 12
    again = refinement_split(model(), data, samples_per_class=20, seed=1)
    assert torch.equal(again.fit.x, split.fit.x) and torch.equal(again.val_counts, split.val_counts)


def test_weighted_accuracy_equals_duplication():
    data = dataset([4, 4, 4], wrong=[0, 5])
    counts = torch.tensor([3, 1, 1, 1, 1, 2, 1, 1, 1, 1, 1, 1])
    expanded = data.subset(torch.repeat_interleave(torch.arange(12), counts))
    plain = float((model()(expanded.x).argmax(1) == expanded.y).float().mean())
    assert weighted_accuracy(model(), data, counts) == pytest.approx(plain)
    assert plain == pytest.approx(1 - 5 / 15)


@pytest.mark.parametrize("counts, wrong, message", [
    ([0, 0, 0], (), "empty"),
    ([5, 0, 0], (), "only 1 class"),
    ([2, 2, 0], (0, 1, 2, 3), "none of the clean samples"),
    ([5, 1, 5], (), "class '1' has only 1 usable"),
    ([5, 5, 0], range(5), "only 1 class"),
])
def test_bad_pools_fail_clearly(counts, wrong, message):
    with pytest.raises(DataError, match=message):
        refinement_split(model(), dataset(counts, wrong), samples_per_class=10)


def test_slack_rule_picks_the_strongest_candidate_within_slack():
    # candidates weakest first; non-monotone: the last passing one wins
    accs = [1.0, 0.99, 0.97, 0.90, 0.96, 0.5]
    assert select_by_slack(accs, 1.0, 0.05) == 4
    assert select_by_slack(accs, 1.0, 0.0) == 0
    assert select_by_slack(accs, 1.0, 0.02) == 1
    assert select_by_slack([0.8, 0.7], 1.0, 0.05) == 0  # none passes: the weakest
    assert select_by_slack(accs, 0.98, 0.02, mode="absolute") == 4
    assert threshold(0.9, 0.1) == pytest.approx(0.81)
    with pytest.raises(ModelfixError, match="--slack"):
        check_slack(1.5)
    with pytest.raises(ModelfixError, match="--slack"):
        select_by_slack(accs, 1.0, -0.1)


def test_selection_table_rows_and_index_follow_the_slack_rule():
    index, rows = selection_table("alpha", [1.0, 0.5, 0.1], [0.90, 0.86, 0.80], 0.90, 0.05)
    assert index == 1  # 0.86 ≥ 0.95·0.90 = 0.855, 0.80 is not
    assert rows == [{"alpha": 1.0, "val_acc": 0.90, "passed": True}, {"alpha": 0.5, "val_acc": 0.86, "passed": True},
                    {"alpha": 0.1, "val_acc": 0.80, "passed": False}]
