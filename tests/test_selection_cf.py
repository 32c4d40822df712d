"""Selection that can see a shortcut (modelfix/repair/counterfactual.py): the counterfactual rule on planted scores,
the counterfactual validation set, λ auto's calibration, a diverging λ in a sweep, the paper rule unchanged."""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
from torch import nn

from modelfix.app.repair import repair
from modelfix.card import InputSpec
from modelfix.data import parse_artifact
from modelfix.data.dataset import Dataset
from modelfix.errors import TrainingFailed
from modelfix.repair.counterfactual import (NO_ARTIFACT, counterfactual_set, cut_artifact, holdout,
                                            CounterfactualScore, group_score, select_counterfactual, worst_group)
from modelfix.repair.finetune import calibrate_lambda, finetune
from modelfix.repair.lastlayer import RefitConfig, fit_refit
from modelfix.repair.refinement import split_for_repair
from modelfix.repair.selection import select_by_slack
from modelfix.training import TrainConfig
from modelfix.zoo import Classifier


def tiny_model(seed: int = 0, inputs: int = 4) -> Classifier:
    torch.manual_seed(seed)
    layers = [("flatten", nn.Flatten()), ("fc1", nn.Linear(inputs, 5)), ("act", nn.Tanh()), ("fc2", nn.Linear(5, 3))]
    side = int(math.isqrt(inputs))
    return Classifier(nn.Sequential(OrderedDict(layers)), InputSpec(channels=1, height=side, width=side, mean=(0.0,),
                                                                    std=(1.0,))).eval()


# ---- the rule on planted scores ------------------------------------------------------------------------------------

CLEAN = [0.90, 0.89, 0.86, 0.84, 0.70]  # candidates weakest first; reference 0.90, slack 0.05 → threshold 0.855
CF = [0.10, 0.70, 0.60, 0.80, 0.95]


def test_counterfactual_rule_picks_the_best_worst_group_within_the_slack():
    # passing: 0.90, 0.89, 0.86 (indices 0–2); 0.84 and 0.70 fail. Best cf among them: 0.70 at index 1.
    assert select_counterfactual(CF, CLEAN, 0.90, 0.05) == 1
    # the paper's slack rule on the same clean scores: the strongest passing one, index 2
    assert select_by_slack(CLEAN, 0.90, 0.05) == 2
    # absolute slack 0.07: threshold 0.83, index 3 passes and has the best cf (0.80)
    assert select_counterfactual(CF, CLEAN, 0.90, 0.07, "absolute") == 3


def test_counterfactual_rule_ties_and_nothing_passing():
    assert select_counterfactual([0.5, 0.5, 0.5], [0.90, 0.95, 0.95], 0.95, 0.05) == 1  # tie: higher clean, earlier
    assert select_counterfactual([0.2, 0.9], [0.5, 0.4], 1.0, 0.05) == 0  # none passes: the first (weakest)


def test_a_tie_at_zero_worst_group_goes_to_the_better_mean_over_groups():
    # every candidate still fails one group entirely (worst 0): the mean over groups decides, not the weakest
    scores = [CounterfactualScore(0.0, 0.40), CounterfactualScore(0.0, 0.55), CounterfactualScore(0.0, 0.50)]
    assert select_counterfactual(scores, [0.95, 0.94, 0.95], 0.95, 0.05) == 1
    # a better worst group still wins over any mean
    scores.append(CounterfactualScore(0.1, 0.30))
    assert select_counterfactual(scores, [0.95, 0.94, 0.95, 0.93], 0.95, 0.05) == 3


def test_group_score_by_hand():
    val = labelled()  # classes of 4, 5, 6 items
    cf = counterfactual_set(val, parse_artifact("pixels:tag,value=1,target=2"), seed=3)
    pasted = cf.info["poisoned"]
    pred = val.y.clone()
    pred[(val.y == 0) & pasted] = 2  # group "a + artifact" (2 items) all wrong
    pred[torch.nonzero((val.y == 2) & ~pasted).flatten()[0]] = 0  # group "c" (3 unpasted items): 2 of 3 right
    # six groups: 0, 1, 1, 1, 2/3, 1 → worst 0, mean (0 + 4 + 2/3) / 6
    score = group_score(pred, cf)
    assert score.worst == 0.0 and score.mean == pytest.approx((4 + 2 / 3) / 6, abs=1e-12)


# ---- the counterfactual set -----------------------------------------------------------------------------------------


def labelled(sizes=(4, 5, 6), side=8) -> Dataset:
    y = torch.cat([torch.full((n,), k) for k, n in enumerate(sizes)])
    x = torch.rand(len(y), 1, side, side, generator=torch.Generator().manual_seed(0)) * 0.1
    return Dataset(x=x, y=y, class_names=["a", "b", "c"])


def test_counterfactual_set_pastes_half_of_each_class_and_groups_class_by_presence():
    val = labelled()
    artifact = parse_artifact("pixels:tag,value=1,target=2")  # a 4×4 white square top left, correlated with class 2
    cf = counterfactual_set(val, artifact, seed=3)
    pasted = cf.info["poisoned"]
    for k, n in enumerate((4, 5, 6)):
        assert int(pasted[val.y == k].sum()) == n // 2  # half, rounded down, also of classes the target is not
    assert torch.equal(cf.group, 2 * val.y + pasted.long())
    assert cf.group_names[1] == "a + artifact" and cf.group_names[4] == "c"
    assert torch.equal(cf.x[~pasted], val.x[~pasted])  # the other half untouched
    assert bool((cf.x[pasted][:, :, :4, :4] == 1).all())  # the square is there on every pasted item
    assert torch.equal(cf.x[pasted][:, :, 4:, :], val.x[pasted][:, :, 4:, :])  # and nothing else changed
    # worst group by hand: predict the label everywhere, except class 0's pasted items (2 of them) → class 2
    pred = val.y.clone()
    pred[(val.y == 0) & pasted] = 2
    assert worst_group(pred, cf) == 0.0
    pred[torch.nonzero((val.y == 0) & pasted).flatten()[0]] = 0  # one of the two right: group "a + artifact" 1/2
    assert worst_group(pred, cf) == 0.5


def test_cut_artifact_takes_the_most_common_mask_box():
    data = labelled(sizes=(3, 3, 3))
    mask = torch.zeros(len(data), 1, 8, 8)
    mask[:, :, 5:7, 1:4] = 1  # most items: rows 5–6, columns 1–3
    mask[0] = 0
    mask[0, :, 0:2, 0:2] = 1  # item 0 elsewhere
    data = Dataset(x=data.x, y=data.y, mask=mask, has_mask=torch.ones(len(data), dtype=torch.bool),
                   class_names=data.class_names)
    cut = cut_artifact(data)
    assert (cut.row, cut.col, tuple(cut.footprint.shape)) == (5, 1, (2, 3))
    assert torch.equal(cut.pixels, data.x[1, :, 5:7, 1:4])  # item 1 is the first with that box
    other = torch.zeros(2, 1, 8, 8)
    pasted, footprint = cut.apply(other)
    assert torch.equal(pasted[:, :, 5:7, 1:4], data.x[1, :, 5:7, 1:4].expand(2, -1, -1, -1))
    assert float(pasted.sum()) == pytest.approx(2 * float(data.x[1, :, 5:7, 1:4].sum()))
    assert float(footprint.sum()) == 2 * 6
    assert cut_artifact(labelled()) is None  # no masks, nothing to cut


def test_holdout_is_a_seeded_partition():
    data = labelled(sizes=(10, 10, 10))
    train, val = holdout(data, 0.1, seed=1)
    assert (len(train), len(val)) == (27, 3)
    together = torch.cat([train.x, val.x])
    assert sorted(together.flatten().tolist()) == sorted(data.x.flatten().tolist())


# ---- λ auto ---------------------------------------------------------------------------------------------------------


def hand_task_and_penalty(model, x, y):
    with torch.no_grad():  # cross-entropy written out: mean over items of logsumexp(z) − z_y
        z = model.net.fc2(torch.tanh(model.net.fc1(x.flatten(1))))
        task = sum(math.log(sum(math.exp(v) for v in z[i].tolist())) - float(z[i, y[i]]) for i in range(len(y)))
        penalty = 0.5 * sum(float((p ** 2).sum()) for p in model.parameters())  # erm-l2: ½ Σ θ²
    return task / len(y), penalty


def test_lambda_auto_is_task_over_penalty_by_hand():
    model = tiny_model()
    x = torch.tensor([[[[0.5, -1.0], [2.0, 0.0]]], [[[1.0, 1.0], [-0.5, 0.25]]], [[[0.0, 0.3], [0.1, -2.0]]]])
    with torch.no_grad():
        right = model(x).argmax(1)
        model.net.fc2.weight.mul_(8)  # confident: a wrong label costs far more than ln 3
    wrong = (right + 1) % 3
    data = Dataset(x=x, y=wrong, class_names=["a", "b", "c"])
    task, penalty = hand_task_and_penalty(model, x, wrong)
    assert task > math.log(3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = calibrate_lambda("erm-l2", model, data, TrainConfig(batch_size=8, seed=0))
    assert result["lambda0"] == pytest.approx(task / penalty, rel=1e-5)
    assert result["task"] == pytest.approx(task, rel=1e-5) and result["penalty"] == pytest.approx(penalty, rel=1e-5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # no update
    # the labels it predicts: the task loss is below ln 3, and ln 3 is the scale
    fitted = Dataset(x=x, y=right, class_names=["a", "b", "c"])
    task, penalty = hand_task_and_penalty(model, x, right)
    assert task < math.log(3)
    result = calibrate_lambda("erm-l2", model, fitted, TrainConfig(batch_size=8, seed=0))
    assert result["lambda0"] == pytest.approx(math.log(3) / penalty, rel=1e-5)
    assert result["task"] == pytest.approx(task, rel=1e-4)


def test_repair_defaults_to_lambda_auto_with_a_held_out_slice():
    model = tiny_model()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(40, 1, 2, 2, generator=gen)
    with torch.no_grad():
        y = model(x).argmax(1)
    data = Dataset(x=x, y=y, class_names=["a", "b", "c"])
    result = repair(model, data, "erm-l2", progress=False, epochs=1, batch_size=8)
    sweep = result.details["sweep"]
    lam0 = sweep["calibration"]["lambda0"]
    assert sweep["lambdas"] == pytest.approx([0.1 * lam0, lam0, 10 * lam0])
    assert any("held out" in w for w in result.warnings)  # no --val: 4 of 40 items validate
    assert any("no artifact is known" in w for w in result.warnings) and result.selection.rule == NO_ARTIFACT


# ---- divergence ----------------------------------------------------------------------------------------------------


def test_a_diverging_lambda_is_recorded_and_the_others_kept():
    model = tiny_model()
    x = torch.randn(24, 1, 2, 2, generator=torch.Generator().manual_seed(4))
    data = Dataset(x=x, y=torch.arange(24) % 3, class_names=["a", "b", "c"])
    config = TrainConfig(epochs=1, batch_size=8, optimizer="adam", lr=1e-2)
    # λ = 1e300 makes λ·½Σθ² infinite in float32 at the first step: TrainingFailed inside that run
    result = finetune(model, data, "erm-l2", config, lambdas=[0.0, 1e300, 1e-3], val=data, progress=False)
    runs = result.runs
    assert [r["diverged"] for r in runs] == [False, True, False]
    assert "loss became" in runs[1]["error"] and runs[1]["final_loss"] is None
    assert result.chosen in (0, 2) and runs[result.chosen]["chosen"]
    assert all(torch.isfinite(p).all() for p in result.model.parameters())
    with pytest.raises(TrainingFailed, match="every λ"):
        finetune(model, data, "erm-l2", config, lambdas=[1e300, 1e301], val=data, progress=False)


# ---- post hoc: the paper rule unchanged, the counterfactual one recorded ------------------------------------------------


def pool(model, n=90, seed=1) -> Dataset:
    x = torch.randn(n, 1, 2, 2, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        y = model(x).argmax(1)
    return Dataset(x=x, y=y, class_names=["a", "b", "c"])


def test_paper_rule_gives_the_old_choice_and_counterfactual_records_every_score():
    model = tiny_model(seed=5)
    clean = pool(model)
    assert int(clean.class_counts().min()) >= 2
    old, trace = fit_refit(model, split_for_repair(model, clean, 30, seed=0), RefitConfig(method="rgem"),
                           progress=False)
    paper = repair(model, None, "rgem", clean=clean, progress=False, samples_per_class=30, select="paper",
                   artifact="pixels:0:0,value=1")
    assert paper.selection.value == trace["lambda"] and paper.selection.rule == "slack 0.05 (relative)"
    assert all(torch.equal(a, b) for a, b in zip(old.state_dict().values(), paper.model.state_dict().values()))

    cf = repair(model, None, "rgem", clean=clean, progress=False, samples_per_class=30,
                artifact="pixels:0:0,value=1")
    sel = cf.selection
    assert sel.rule.startswith("counterfactual") and sel.clean_scores == paper.selection.scores
    assert len(sel.cf_scores) == len(sel.values) and sel.scores == sel.cf_scores
    assert sel.chosen == select_counterfactual(sel.cf_scores, sel.clean_scores, cf.details["val_orig"], 0.05)

    none = repair(model, None, "rgem", clean=clean, progress=False, samples_per_class=30)
    assert none.selection.rule == NO_ARTIFACT and none.selection.value == trace["lambda"]
    assert any("no artifact is known" in w for w in none.warnings)


# ---- the commands ------------------------------------------------------------------------------------------------------


def test_cli_select_and_lambda_auto(shortcut, tmp_path):
    import json

    from cli_helpers import run

    result = run("refit", shortcut, "--clean-dir", "decoy-digits:val", "--samples-per-class", "20", "--select", "paper",
                 "-o", tmp_path / "paper.safetensors", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["selection"]["rows"][0]["cf_score"] is None
    result = run("refit", shortcut, "--clean-dir", "decoy-digits:val", "--samples-per-class", "20",
                 "-o", tmp_path / "cf.safetensors", "--json")  # the card's artifact: corner-patch
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["trace"]["rule"].startswith("counterfactual") and doc["selection"]["rows"][0]["cf_score"] is not None
    result = run("finetune", shortcut, "--method", "erm-l2", "--lambda", "auto", "--epochs", "1", "--val",
                 "decoy-digits:clean", "-o", tmp_path / "l2.safetensors", "--json")
    assert result.exit_code == 0, result.stderr
    sweep = json.loads(result.stdout)["sweep"]
    assert sweep["select_by"] == "counterfactual" and len(sweep["runs"]) == 3
    assert sweep["lambdas"][1] == pytest.approx(sweep["calibration"]["lambda0"])


def test_rrr_without_any_option_closes_most_of_the_decoy_gap(shortcut, tmp_path):
    """The issue's check: `finetune MODEL --method rrr` with no --lambda and no --val on the decoy-digits shortcut.
    The held-out slice carries the true-colour patch on every item, so λ is chosen by the accuracy with the patch
    pasted in a random colour; the contaminated − permuted gap, measured by `evaluate` on the test digits, must close
    by more than half."""
    import json

    from cli_helpers import run

    def gap(path) -> float:
        result = run("evaluate", path, "--data", "decoy-digits:test", "--poison", "1", "--labels", "correlated,random",
                     "--json")
        assert result.exit_code == 0, result.stderr
        contaminated, permuted = json.loads(result.stdout)["levels"]
        return contaminated["accuracy"] - permuted["accuracy"]

    out = tmp_path / "rrr.safetensors"
    result = run("finetune", shortcut, "--method", "rrr", "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert len(doc["sweep"]["runs"]) == 3 and doc["sweep"]["carried"]
    assert doc["selection"]["parameter"] == "λ"
    before, after = gap(shortcut), gap(out)
    assert before > 0.2 and after < 0.5 * before, (before, after)
